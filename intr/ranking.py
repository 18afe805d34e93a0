"""Head ranking by greedy blurring (Prompt-CAM's procedure, also used for INTR).

In the last attention layer, a head is "blurred" for the target class's
prompt (or query) by setting that row's pre-softmax attention logits to zero,
which makes its attention uniform.  Each round blurs the one extra head whose
blurring lowers the target-class probability least; the order of removal
gives the rank, and the heads removed last (rank 1) are the traits.

Exact and fast: everything before the last layer does not depend on the
blurring, so a model's ``blur_context`` computes it once, together with each
head's normal and blurred outputs for the target row.  A candidate blur set
then only selects per head between the two, and every candidate of a round,
for every image, goes through the rest of the last layer in one batch.
``rank_heads_naive`` is the paper's plain loop that reruns the whole model
per candidate; the tests pin the two to the same ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeadRanking:
    """Result for a batch of (image, target class).

    ``order[b, r]`` is the head blurred in round r; ``rank[b, h]`` is head h's
    rank (1 = most important, removed last); ``prob_after_blur[b, h]`` the
    target probability right after head h was blurred (with all heads blurred
    before it); ``prob`` the unblurred target probability.
    """

    order: torch.Tensor
    rank: torch.Tensor
    prob_after_blur: torch.Tensor
    prob: torch.Tensor


def target_probability_from_logit(target_logit: torch.Tensor, logits: torch.Tensor,
                                  target: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the target when only its own logit changes.

    Args:
        target_logit: (B, K) candidate values of the target class logit.
        logits: (B, C) the other classes' logits (the target's entry is ignored).
        target: (B,) target class ids.
    """
    others = logits.float().scatter(1, target.view(-1, 1), float("-inf")).logsumexp(dim=1, keepdim=True)
    return torch.sigmoid(target_logit.float() - others)


def _finish_ranking(order: torch.Tensor, probs: torch.Tensor, prob: torch.Tensor) -> HeadRanking:
    B, H = order.shape
    rank = torch.empty_like(order)
    rounds = torch.arange(H, device=order.device).expand(B, -1)
    rank.scatter_(1, order, H - rounds)
    prob_after = torch.empty_like(probs)
    prob_after.scatter_(1, order, probs)
    return HeadRanking(order, rank, prob_after, prob)


@torch.no_grad()
def rank_heads_by_blurring(model, images: torch.Tensor, target: torch.Tensor) -> HeadRanking:
    """Rank the last layer's heads for each image's target class, batched.

    Args:
        model: a model with ``blur_context(images, target)`` (Prompt-CAM, INTR).
        images: (B, 3, H, W).
        target: (B,) class ids whose prompt/query is ranked (usually the label).
    """
    ctx = model.blur_context(images, target)
    B, H, _ = ctx.normal.shape
    eye = torch.eye(H, dtype=torch.bool, device=images.device)
    blurred = torch.zeros(B, H, dtype=torch.bool, device=images.device)
    order = torch.empty(B, H, dtype=torch.long, device=images.device)
    probs = torch.empty(B, H, dtype=torch.float32, device=images.device)
    for r in range(H):
        candidates = blurred.unsqueeze(1) | eye  # (B, K=H, H): blur set if head k is added
        head_out = torch.where(candidates.unsqueeze(-1), ctx.blurred.unsqueeze(1), ctx.normal.unsqueeze(1))
        p = target_probability_from_logit(ctx.finish(head_out), ctx.logits, target)  # (B, K)
        p = p.masked_fill(blurred, float("-inf"))
        choice = p.argmax(dim=1)
        order[:, r] = choice
        probs[:, r] = p.gather(1, choice.view(-1, 1)).squeeze(1)
        blurred[torch.arange(B), choice] = True
    prob = target_probability_from_logit(ctx.logits.gather(1, target.view(-1, 1)), ctx.logits, target).squeeze(1)
    return _finish_ranking(order, probs, prob)


@torch.no_grad()
def rank_heads_naive(model, images: torch.Tensor, target: torch.Tensor) -> HeadRanking:
    """The paper's loop: rerun the whole model for every candidate head, image by image."""
    rankings = []
    for b in range(images.shape[0]):
        image, t = images[b:b + 1], target[b:b + 1]
        H = model.num_heads
        blurred = torch.zeros(1, 1, H, dtype=torch.bool, device=images.device)
        order, probs = [], []
        for _ in range(H):
            best, best_p = -1, float("-inf")
            for h in range(H):
                if blurred[0, 0, h]:
                    continue
                trial = blurred.clone()
                trial[0, 0, h] = True
                logits, _ = model.forward_with_maps(image, t.view(1, 1), blur=trial)
                p = torch.softmax(logits.float(), dim=1)[0, t].item()
                if p > best_p:
                    best, best_p = h, p
            blurred[0, 0, best] = True
            order.append(best)
            probs.append(best_p)
        logits = model(image)
        prob = torch.softmax(logits.float(), dim=1)[0, t]
        rankings.append(_finish_ranking(torch.tensor([order], device=images.device),
                                        torch.tensor([probs], device=images.device), prob))
    return HeadRanking(*(torch.cat([getattr(r, f) for r in rankings]) for f in
                         ("order", "rank", "prob_after_blur", "prob")))
