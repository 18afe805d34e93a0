"""Head ranking by greedy blurring: the batched version equals the paper's loop."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from intr.models.intr import build_intr
from intr.models.prompt_cam import PromptCAM
from intr.faithfulness import true_class_probability
from intr.ranking import (rank_heads_by_blurring, rank_heads_naive, rank_pair_heads_by_blurring,
                          rank_pair_heads_naive, target_probability_from_logit)

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 6}


def random_model(seed: int) -> PromptCAM:
    """A double-precision Prompt-CAM whose heads matter unequally (large prompts)."""
    torch.manual_seed(seed)
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model = PromptCAM(backbone, num_classes=4)
    with torch.no_grad():
        model.class_prompts.mul_(5.0)
        model.presence_head.weight.mul_(3.0)
    return model.double().eval()


def images_and_targets(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.tensor([0, 3, 1, 3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blurring_rank_matches_naive_loop(seed: int) -> None:
    model = random_model(seed)
    images, target = images_and_targets(seed)
    fast = rank_heads_by_blurring(model, images, target)
    naive = rank_heads_naive(model, images, target)
    # The heads do differ, so the order is decided by the model and not by ties.
    assert (fast.prob_after_blur.max(dim=1).values - fast.prob_after_blur.min(dim=1).values).min() > 1e-2
    assert torch.equal(fast.order, naive.order)
    assert torch.equal(fast.rank, naive.rank)
    torch.testing.assert_close(fast.prob_after_blur, naive.prob_after_blur, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.prob, naive.prob, rtol=0, atol=1e-6)
    with torch.no_grad():
        expected_prob = model(images).softmax(dim=1).gather(1, target.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(fast.prob, expected_prob.float(), rtol=0, atol=1e-6)


def test_rank_is_a_permutation_and_last_removed_head_sees_everything_blurred() -> None:
    model = random_model(5)
    images, target = images_and_targets(5)
    ranking = rank_heads_by_blurring(model, images, target)
    B, H = ranking.rank.shape
    assert (B, H) == (4, model.num_heads)
    assert ranking.rank.sort(dim=1).values.tolist() == [list(range(1, H + 1))] * B
    assert ranking.order.sort(dim=1).values.tolist() == [list(range(H))] * B
    # Round r's head gets rank H - r: rank 1 is the head removed last.
    assert torch.equal(ranking.rank.gather(1, ranking.order), torch.arange(H, 0, -1).expand(B, -1))
    last = ranking.order[:, -1]
    with torch.no_grad():
        logits, _ = model.forward_with_maps(images, target.view(-1, 1),
                                            blur=torch.ones(B, 1, H, dtype=torch.bool))
    all_blurred = logits.softmax(dim=1).gather(1, target.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(ranking.prob_after_blur.gather(1, last.view(-1, 1)).squeeze(1),
                               all_blurred.float(), rtol=0, atol=1e-6)
    # Round 1 blurs the head whose blurring alone keeps the probability highest.
    with torch.no_grad():
        single = []
        for h in range(H):
            blur = torch.zeros(B, 1, H, dtype=torch.bool)
            blur[:, 0, h] = True
            lg, _ = model.forward_with_maps(images, target.view(-1, 1), blur=blur)
            single.append(lg.softmax(dim=1).gather(1, target.view(-1, 1)).squeeze(1))
    assert torch.equal(ranking.order[:, 0], torch.stack(single, dim=1).argmax(dim=1))


def test_target_probability_from_logit_at_the_actual_logit_is_the_softmax_probability():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 3, 6, 2, 2])
    actual = logits.gather(1, target.view(-1, 1))
    torch.testing.assert_close(target_probability_from_logit(actual, logits, target).squeeze(1),
                               logits.softmax(1)[torch.arange(5), target])
    torch.testing.assert_close(true_class_probability(logits, target), logits.softmax(1)[torch.arange(5), target])
    # Raising only the target's logit by log 3 triples its odds against the rest.
    p = logits.softmax(1)[torch.arange(5), target]
    raised = target_probability_from_logit(actual + math.log(3), logits, target).squeeze(1)
    torch.testing.assert_close(raised / (1 - raised), 3 * p / (1 - p))


# ----------------------------------------------------------------------------- pair ranking


def random_intr(seed: int) -> torch.nn.Module:
    """A double-precision INTR on a tiny ViT whose heads matter unequally (large queries and presence head)."""
    torch.manual_seed(seed)
    vit = {"name": "vit_tiny_patch16_224", "kwargs": {**TINY, "num_heads": 4}}
    transformer = {"d_model": 32, "heads": 4, "encoder_layers": 1, "decoder_layers": 2, "ffn": 64, "dropout": 0.0}
    model = build_intr({"backbone": vit, "transformer": transformer}, 4, image_size=32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("backbone."):
                p.add_(torch.randn_like(p) * 0.1)
        model.query_embed.weight.mul_(30.0)
        model.presence_head.weight.mul_(10.0)
    return model.double().eval()


TINY_MODELS = {"prompt_cam": random_model, "intr": random_intr}
# Each image's class A and two look-alikes B; image 2 has one look-alike, padded with a repeat.
PAIRS_A = torch.tensor([0, 3, 1, 2])
PAIRS_B = torch.tensor([[1, 2], [0, 1], [2, 2], [3, 0]])


@pytest.mark.parametrize("method", TINY_MODELS)
@pytest.mark.parametrize("seed", [0, 1])
def test_pair_blurring_rank_matches_naive_loop(method: str, seed: int) -> None:
    model = TINY_MODELS[method](seed)
    images, _ = images_and_targets(seed)
    fast = rank_pair_heads_by_blurring(model, images, PAIRS_A, PAIRS_B)
    naive = rank_pair_heads_naive(model, images, PAIRS_A, PAIRS_B)
    H = model.num_heads
    assert fast.rank.shape == (4, 2, H)
    # The heads do differ, so the order is decided by the model and not by ties.
    spread = fast.margin_after_blur.max(dim=2).values - fast.margin_after_blur.min(dim=2).values
    assert spread.min() > 1e-2
    assert torch.equal(fast.order, naive.order)
    assert torch.equal(fast.rank, naive.rank)
    torch.testing.assert_close(fast.margin_after_blur, naive.margin_after_blur, rtol=0, atol=1e-5)
    with torch.no_grad():
        logits = model(images).float()
    expected = logits.gather(1, PAIRS_A.view(-1, 1)) - logits.gather(1, PAIRS_B)
    torch.testing.assert_close(fast.margin, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(naive.margin, expected, rtol=0, atol=1e-5)
    # The padded repeat ranks exactly as its original.
    assert torch.equal(fast.rank[2, 0], fast.rank[2, 1])


@pytest.mark.parametrize("method", TINY_MODELS)
def test_pair_ranking_blurs_both_rows_and_last_head_sees_every_head_blurred(method: str) -> None:
    model = TINY_MODELS[method](3)
    images, _ = images_and_targets(3)
    ranking = rank_pair_heads_by_blurring(model, images, PAIRS_A, PAIRS_B[:, :1])
    B, H = len(images), model.num_heads
    assert ranking.rank.sort(dim=2).values.tolist() == [[list(range(1, H + 1))]] * B
    assert torch.equal(ranking.rank.gather(2, ranking.order), torch.arange(H, 0, -1).expand(B, 1, -1))
    queried = torch.stack([PAIRS_A, PAIRS_B[:, 0]], dim=1)
    with torch.no_grad():
        logits, _ = model.forward_with_maps(images, queried, blur=torch.ones(B, 2, H, dtype=torch.bool))
    all_blurred = (logits.gather(1, queried[:, :1]) - logits.gather(1, queried[:, 1:])).squeeze(1).float()
    last = ranking.order[:, 0, -1:]
    torch.testing.assert_close(ranking.margin_after_blur[:, 0].gather(1, last).squeeze(1), all_blurred,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", TINY_MODELS)
def test_blur_context_of_several_rows_equals_one_context_per_row(method: str) -> None:
    model = TINY_MODELS[method](4)
    images, _ = images_and_targets(4)
    targets = torch.tensor([[0, 2], [3, 1], [1, 1], [2, 0]])
    with torch.no_grad():
        joint = model.blur_context(images, targets)
        single = [model.blur_context(images, targets[:, r]) for r in range(2)]
        # Row 2 * b + r of the joint context is image b's row r.
        for r in range(2):
            torch.testing.assert_close(joint.normal[r::2], single[r].normal, rtol=0, atol=1e-10)
            torch.testing.assert_close(joint.blurred[r::2], single[r].blurred, rtol=0, atol=1e-10)
            torch.testing.assert_close(joint.logits[r::2], single[r].logits, rtol=0, atol=1e-10)
            assert torch.equal(joint.target[r::2], targets[:, r])
            out = single[r].normal.unsqueeze(1)
            rows = torch.arange(4) * 2 + r
            torch.testing.assert_close(joint.finish(out, rows), single[r].finish(out), rtol=0, atol=1e-10)
