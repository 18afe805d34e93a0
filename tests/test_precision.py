"""Mixed precision: bf16 autocast on CPU runs every autocast path, and head ranks survive it.

``INTR_CPU_BF16=1`` turns on the bf16 autocast a GPU run uses (``intr.precision``),
so dtype mistakes of the CUDA paths show here.  Head ranking computes the last
block's candidate rows in float32 under autocast: ranks then equal the float32
ranks wherever float32 itself separates the heads by more than what a bf16
trunk moves them.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import intr.extract as ex
from intr import precision
from intr.ranking import (rank_heads_by_blurring, rank_heads_naive, rank_pair_heads_by_blurring)
from intr.train import train
from test_ranking import PAIRS_A, PAIRS_B, images_and_targets, random_intr, random_model

FLOAT32_MODELS = {"prompt_cam": lambda seed: random_model(seed).float(),
                  "intr": lambda seed: random_intr(seed).float()}
BF16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731


def trunk_resolution(ctx) -> float:
    """How far a bf16 trunk moves the candidates' logits (and A - B margins): bf16's step at the largest logit."""
    return 2.0 ** -8 * float(ctx.logits.abs().max())


def greedy_round_gaps(ctx, rows: torch.Tensor | None, pairs: int | None) -> torch.Tensor:
    """Per ranking and round, the float32 gap between the best and the second-best candidate.

    Args:
        ctx: a float32 BlurContext.
        rows: for pair ranking, the (2P,) context rows of A then B of every pair; None for single ranking.
        pairs: P for pair ranking (the score is A's minus B's logit), None for single ranking (A's logit).
    """
    normal, blurred = (ctx.normal, ctx.blurred) if rows is None else (ctx.normal[rows], ctx.blurred[rows])
    n = normal.shape[0] if pairs is None else pairs
    H = normal.shape[1]
    eye, done = torch.eye(H, dtype=torch.bool), torch.zeros(n, H, dtype=torch.bool)
    gaps = torch.full((n, H), float("inf"))
    for r in range(H - 1):
        sets = (done.unsqueeze(1) | eye).repeat(1 if pairs is None else 2, 1, 1)
        logit = ctx.finish(torch.where(sets.unsqueeze(-1), blurred.unsqueeze(1), normal.unsqueeze(1)), rows)
        score = (logit if pairs is None else logit[:n] - logit[n:]).masked_fill(done, float("-inf"))
        top2 = score.topk(2, dim=1).values
        gaps[:, r] = top2[:, 0] - top2[:, 1]
        done[torch.arange(n), score.argmax(1)] = True
    return gaps.min(dim=1).values


def float32_ranks_and_separated(model, images: torch.Tensor, target: torch.Tensor):
    """The float32 head ranking, and per ranking whether every greedy round's gap exceeds bf16's step."""
    exact = rank_heads_by_blurring(model, images, target)
    with torch.no_grad():
        ctx = model.blur_context(images, target)
        return exact, greedy_round_gaps(ctx, None, None) > trunk_resolution(ctx)


@pytest.mark.parametrize("method", FLOAT32_MODELS)
def test_head_ranks_under_bf16_autocast_equal_the_float32_ranks(method: str) -> None:
    separated = []
    for seed in range(4):
        model = FLOAT32_MODELS[method](seed)
        images, target = images_and_targets(seed)
        images = images.float()
        exact, clear = float32_ranks_and_separated(model, images, target)
        with BF16():
            mixed = rank_heads_by_blurring(model, images, target)
        assert mixed.prob_after_blur.dtype == torch.float32 and mixed.prob_after_blur.isfinite().all()
        assert torch.equal(mixed.rank[clear], exact.rank[clear])
        torch.testing.assert_close(mixed.prob_after_blur[clear], exact.prob_after_blur[clear], rtol=0, atol=0.05)
        separated.append(int(clear.sum()))
    assert sum(separated) >= 14  # of 16 rankings: few are near-ties, the comparison is not empty


@pytest.mark.parametrize("method", FLOAT32_MODELS)
def test_pair_head_ranks_under_bf16_autocast_equal_the_float32_ranks(method: str) -> None:
    B, L = PAIRS_B.shape
    row_a = (torch.arange(B) * (1 + L)).repeat_interleave(L)
    rows = torch.cat([row_a, row_a + torch.arange(1, L + 1).repeat(B)])
    separated = []
    for seed in range(4):
        model = FLOAT32_MODELS[method](seed)
        images = images_and_targets(seed)[0].float()
        exact = rank_pair_heads_by_blurring(model, images, PAIRS_A, PAIRS_B)
        with torch.no_grad():
            ctx = model.blur_context(images, torch.cat([PAIRS_A.view(-1, 1), PAIRS_B], dim=1))
            clear = (greedy_round_gaps(ctx, rows, B * L) > trunk_resolution(ctx)).view(B, L)
        with BF16():
            mixed = rank_pair_heads_by_blurring(model, images, PAIRS_A, PAIRS_B)
        assert mixed.margin_after_blur.dtype == torch.float32 and mixed.margin_after_blur.isfinite().all()
        assert torch.equal(mixed.rank[clear], exact.rank[clear])
        separated.append(int(clear.sum()))
    assert sum(separated) >= 24  # of 32 pair rankings


def test_blur_context_is_float32_under_bf16_autocast() -> None:
    for make in FLOAT32_MODELS.values():
        model = make(0)
        images, target = images_and_targets(0)
        with torch.no_grad(), BF16():
            ctx = model.blur_context(images.float(), target)
            out = ctx.finish(ctx.normal.unsqueeze(1))
        assert {ctx.normal.dtype, ctx.blurred.dtype, ctx.logits.dtype, out.dtype} == {torch.float32}


def test_an_all_bf16_last_block_reorders_heads_that_float32_separates() -> None:
    # The plain loop reruns the whole model under autocast, its last block in bf16 too: its
    # candidates' logits are rounded to bf16, and heads float32 separates by more than the trunk's
    # resolution swap places (on this CPU: Prompt-CAM seed 5, INTR seed 0; the batched path keeps them).
    flipped = 0
    for method, seed in (("prompt_cam", 5), ("intr", 0), ("prompt_cam", 0)):
        model = FLOAT32_MODELS[method](seed)
        images, target = images_and_targets(seed)
        images = images.float()
        exact, clear = float32_ranks_and_separated(model, images, target)
        with BF16():
            plain = rank_heads_naive(model, images, target)
            batched = rank_heads_by_blurring(model, images, target)
        assert torch.equal(batched.rank[clear], exact.rank[clear])
        flipped += int((plain.rank != exact.rank).any(1)[clear].sum())
    assert flipped >= 1


# ----------------------------------------------------------------------------- every autocast path on CPU


def test_the_amp_switch_turns_bf16_on_for_cuda_and_for_cpu_only_when_asked(monkeypatch) -> None:
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
    assert precision.amp_enabled(torch.device("cuda"), True)
    assert not precision.amp_enabled(torch.device("cuda"), False)
    assert not precision.amp_enabled(torch.device("cpu"), True)
    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    assert precision.amp_enabled(torch.device("cpu"), True)
    assert not precision.amp_enabled(torch.device("cpu"), False)
    with precision.autocast(torch.device("cpu"), True):
        assert torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.bfloat16


def test_training_step_under_cpu_bf16_autocast_is_finite(tiny_dataset, tmp_path, monkeypatch) -> None:
    from conftest import TINY_VIT

    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    manifest, root = tiny_dataset
    intr_model = {"backbone": TINY_VIT, "freeze_backbone": True,
                  "transformer": {"d_model": 32, "heads": 4, "encoder_layers": 1, "decoder_layers": 1,
                                  "ffn": 64, "dropout": 0.0}}
    for method, model in (("prompt_cam", {"backbone": TINY_VIT}), ("intr", intr_model)):
        summary = train(method, model, {"epochs": 1, "batch_size": 16, "lr": 0.05, "warmup_epochs": 0, "seed": 1},
                        manifest, root, tmp_path / method, image_size=32, progress=False)
        row = summary["log"][0]
        assert summary["finished"] and np.isfinite(row["train_loss"]) and 0 <= row["val_acc"] <= 1
        state = torch.load(tmp_path / method / "model.pt", weights_only=True)["state"]
        assert all(t.dtype == torch.float32 and t.isfinite().all() for t in state.values())


@pytest.mark.parametrize("method", ["prompt_cam", "intr"])
def test_extraction_under_cpu_bf16_autocast_writes_finite_float32_tables(method, tiny_models, tiny_dataset,
                                                                        tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    manifest, root = tiny_dataset
    paths = ex.extract(tiny_models[method], manifest, root, tmp_path, batch_size=3, top_heads=2, limit=6,
                       parts=manifest.parent / "parts.parquet", regions="annotated", progress=False)
    float32 = {"predictions": ["prob_true"], "head_ranks": ["prob_after_blur"],
               "pair_head_ranks": ["margin_after_blur"], "region_effects": ["margin", "margin_drop", "prob_a_drop"]}
    for name, columns in float32.items():
        table = pq.read_table(paths[name])
        assert table.num_rows > 0, name
        for column in columns:
            assert str(table.schema.field(column).type) == "float", (name, column)
            assert np.isfinite(table.column(column).to_numpy()).all(), (name, column)
    ranks = pq.read_table(paths["head_ranks"]).to_pandas()
    perms = ranks.groupby(["image_id", "class_id"])["rank"].apply(lambda r: sorted(r.tolist()))
    assert len(perms) >= 6 and all(p == [1, 2, 3, 4] for p in perms)
    for name, column in (("attention", "attn"), ("trait_features", "feature")):
        values = np.stack(pq.read_table(paths[name]).column(column).to_numpy(zero_copy_only=False))
        assert values.dtype == np.float16 and np.isfinite(values).all(), name
