"""Head ranking by greedy blurring (Prompt-CAM's procedure, also used for INTR).

In the last attention layer, a head is "blurred" for the target class's
prompt (or query) by setting that row's pre-softmax attention logits to zero,
which makes its attention uniform.  Each round blurs the one extra head whose
blurring lowers the target-class probability least; the order of removal
gives the rank, and the heads removed last (rank 1) are the traits.

Exact and fast: everything before the last layer does not depend on the
blurring, so a model's ``blur_context`` computes it once (or reads it from
the caller's ``trunk_of``, which extraction shares across tables), together with each
head's normal and blurred outputs for the target row.  A candidate blur set
then only selects per head between the two, and every candidate of a round,
for every image, goes through the rest of the last layer in one batch.
``rank_heads_naive`` is the paper's plain loop that reruns the whole model
per candidate; the tests pin the two to the same ranks.

Pair ranking (our addition, not in either paper): blurring a head in A's row
alone cannot be specific to a look-alike B (B's logit does not move), so for a
directed pair (A, B) a head is blurred in A's *and* B's rows together, and the
greedy rule runs on the A - B logit margin instead of A's probability: each
round blurs the head whose blurring lowers the margin least.  Heads that see
what A and B share move both logits alike and cancel; heads that see the
differing part are left last.  ``rank_pair_heads_by_blurring`` is the batched
version (one pass up to the last layer per image serves A and all its
look-alikes), ``rank_pair_heads_naive`` the plain loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from intr.models.protocol import Trunk


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
def rank_heads_by_blurring(model, images: torch.Tensor | None, target: torch.Tensor,
                           trunk: Trunk | None = None) -> HeadRanking:
    """Rank the last layer's heads for each image's target class, batched.

    Args:
        model: a model with ``blur_context(images, target)`` (Prompt-CAM, INTR).
        images: (B, 3, H, W).
        target: (B,) class ids whose prompt/query is ranked (usually the label).
        trunk: the images' ``model.trunk_of``, in place of running it (``images`` is then not read).
    """
    ctx = model.blur_context(images, target, trunk=trunk)
    B, H, _ = ctx.normal.shape
    eye = torch.eye(H, dtype=torch.bool, device=target.device)
    blurred = torch.zeros(B, H, dtype=torch.bool, device=target.device)
    order = torch.empty(B, H, dtype=torch.long, device=target.device)
    probs = torch.empty(B, H, dtype=torch.float32, device=target.device)
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


# ----------------------------------------------------------------------------- pairs


@dataclass
class PairHeadRanking:
    """Result for a batch of images, each with its class A and L look-alikes B.

    ``order[b, l, r]`` is the head blurred (in A's and B's rows) in round r for
    the pair (A of image b, its l-th look-alike); ``rank[b, l, h]`` head h's
    rank (1 = removed last, the most pair-specific); ``margin_after_blur[b, l, h]``
    the A - B logit margin right after head h was blurred (with all heads
    blurred before it); ``margin[b, l]`` the unblurred margin.
    """

    order: torch.Tensor
    rank: torch.Tensor
    margin_after_blur: torch.Tensor
    margin: torch.Tensor


def _finish_pair_ranking(order: torch.Tensor, margins: torch.Tensor, margin: torch.Tensor) -> PairHeadRanking:
    """Ranks and per-head margins from the (B, L, H) order of removal and the margins of each round."""
    B, L, H = order.shape
    single = _finish_ranking(order.view(B * L, H), margins.view(B * L, H), margin.view(-1))
    return PairHeadRanking(order, single.rank.view(B, L, H), single.prob_after_blur.view(B, L, H), margin)


@torch.no_grad()
def rank_pair_heads_by_blurring(model, images: torch.Tensor | None, class_a: torch.Tensor,
                                class_b: torch.Tensor, trunk: Trunk | None = None) -> PairHeadRanking:
    """Rank the last layer's heads for every (image, A, look-alike B) by the A - B margin, batched.

    Exact: A's and B's rows do not interact after the last attention layer, so the
    margin of a blur set is A's logit with that set blurred in A's row minus B's
    logit with it blurred in B's row; every candidate of a round, for every pair,
    goes through the rest of the last layer in one batch.

    Args:
        model: a model with ``blur_context(images, target)`` taking (B, R) targets (Prompt-CAM, INTR).
        images: (B, 3, H, W).
        class_a: (B,) class A of each image (usually the label).
        class_b: (B, L) look-alikes of A (pad with a repeat where images have fewer).
        trunk: the images' ``model.trunk_of``, in place of running it (``images`` is then not read).
    """
    B, L = class_b.shape
    ctx = model.blur_context(images, torch.cat([class_a.view(-1, 1), class_b], dim=1), trunk=trunk)  # B * (1 + L)
    H, dev = ctx.normal.shape[1], class_b.device
    # Context row of A and of B for every pair (image-major, then look-alike).
    row_a = (torch.arange(B, device=dev) * (1 + L)).repeat_interleave(L)
    row_b = row_a + torch.arange(1, L + 1, device=dev).repeat(B)
    rows = torch.cat([row_a, row_b])  # (2P,) the rows a candidate batch is finished on
    eye = torch.eye(H, dtype=torch.bool, device=dev)
    blurred = torch.zeros(B * L, H, dtype=torch.bool, device=dev)
    order = torch.empty(B * L, H, dtype=torch.long, device=dev)
    margins = torch.empty(B * L, H, dtype=torch.float32, device=dev)
    for r in range(H):
        candidates = (blurred.unsqueeze(1) | eye).repeat(2, 1, 1)  # (2P, K=H, H), same sets in A's and B's rows
        head_out = torch.where(candidates.unsqueeze(-1), ctx.blurred[rows].unsqueeze(1),
                               ctx.normal[rows].unsqueeze(1))
        logit = ctx.finish(head_out, rows).float()  # (2P, K)
        m = (logit[:B * L] - logit[B * L:]).masked_fill(blurred, float("-inf"))
        choice = m.argmax(dim=1)
        order[:, r] = choice
        margins[:, r] = m.gather(1, choice.view(-1, 1)).squeeze(1)
        blurred[torch.arange(B * L, device=dev), choice] = True
    logits = ctx.logits.float()
    margin = logits[row_a].gather(1, class_a.repeat_interleave(L).view(-1, 1)).squeeze(1) \
        - logits[row_b].gather(1, class_b.reshape(-1, 1)).squeeze(1)
    return _finish_pair_ranking(order.view(B, L, H), margins.view(B, L, H), margin.view(B, L))


@torch.no_grad()
def rank_pair_heads_naive(model, images: torch.Tensor, class_a: torch.Tensor,
                          class_b: torch.Tensor) -> PairHeadRanking:
    """The plain loop: rerun the whole model for every candidate head, pair by pair (the reference)."""
    B, L = class_b.shape
    H, dev = model.num_heads, images.device
    order = torch.empty(B, L, H, dtype=torch.long, device=dev)
    margins = torch.empty(B, L, H, dtype=torch.float32, device=dev)
    margin = torch.empty(B, L, dtype=torch.float32, device=dev)
    for b in range(B):
        for j in range(L):
            image, a, o = images[b:b + 1], int(class_a[b]), int(class_b[b, j])
            queried = torch.tensor([[a, o]], device=dev)
            blurred = torch.zeros(1, 2, H, dtype=torch.bool, device=dev)
            for r in range(H):
                best, best_m = -1, float("-inf")
                for h in range(H):
                    if blurred[0, 0, h]:
                        continue
                    trial = blurred.clone()
                    trial[0, :, h] = True  # the same head in A's and B's rows
                    logits, _ = model.forward_with_maps(image, queried, blur=trial)
                    m = (logits[0, a] - logits[0, o]).item()
                    if m > best_m:
                        best, best_m = h, m
                blurred[0, :, best] = True
                order[b, j, r], margins[b, j, r] = best, best_m
            logits = model(image).float()
            margin[b, j] = logits[0, a] - logits[0, o]
    return _finish_pair_ranking(order, margins, margin)
