"""Scores of the counterfactual renders (``counterfactuals.parquet`` from ``intr counterfactual``).

A row is one image of species A re-rendered with some parts changed, scored
against one look-alike B (docs/tables.md).  The model *uses* a planted part
when setting it to B's state makes it predict B; a control swap (a part A and
B share, set to a state from another genus) should not.

The swaps also rank the parts by what the model relies on (``causal_effects``:
mean margin drop of each single-part swap, planted and control alike), which
``agreement_rows`` holds each region ranking of ``contrasts.parquet`` against:
does the region ranked first stand for the part the model relies on most, and
do the two orders agree (Spearman)?
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from analysis.recovery import VARIANTS, area_ranks
from analysis.stats import metric_row

KINDS = ("planted", "all_planted", "control")


def single_part_planted(table: pd.DataFrame) -> pd.DataFrame:
    """The ``planted`` rows of pairs that differ in exactly one part (one swap makes A into B).

    Args:
        table: ``counterfactuals.parquet``.
    """
    planted = table[table["kind"] == "planted"]
    parts_per_pair = planted.groupby(["image_id", "class_a", "class_b"])["part"].transform("size")
    return planted[parts_per_pair == 1]


def flips_to_b(rows: pd.DataFrame) -> np.ndarray:
    """Per row: does the changed image's prediction become the look-alike B?"""
    return (rows["pred_after"] == rows["class_b"]).to_numpy()


def margin_drop(rows: pd.DataFrame) -> np.ndarray:
    """Per row: how much the swap lowers the logit margin A - B (positive: towards B)."""
    return (rows["margin_before"] - rows["margin_after"]).to_numpy(np.float64)


def counterfactual_scores(table: pd.DataFrame, method: str, split: str) -> pd.DataFrame:
    """Rows in the ``evaluation.parquet`` layout; kinds without rows give no row.

    * ``counterfactual_flip_rate``: share of single-part pairs' images (planted part swapped to
      B's state) whose prediction becomes B;
    * ``counterfactual_flip_rate_control``: the same share for control swaps;
    * ``counterfactual_flip_rate_all_planted``: the same for every planted part at once (B's own render);
    * ``counterfactual_margin_drop_{kind}``: mean drop of the margin A - B, per kind.

    Args:
        table: ``counterfactuals.parquet``.
        method: the model's method name.
        split: the split the images came from.
    """
    rows = []
    single = single_part_planted(table)
    if len(single):
        rows.append(metric_row(method, "counterfactual_flip_rate", split, flips_to_b(single)))
    for kind in ("control", "all_planted"):
        of_kind = table[table["kind"] == kind]
        if len(of_kind):
            rows.append(metric_row(method, f"counterfactual_flip_rate_{kind}", split, flips_to_b(of_kind)))
    for kind in KINDS:
        of_kind = table[table["kind"] == kind]
        if len(of_kind):
            rows.append(metric_row(method, f"counterfactual_margin_drop_{kind}", split, margin_drop(of_kind)))
    return pd.DataFrame(rows, columns=["method", "metric", "split", "value", "ci_lo", "ci_hi", "n"])


def pair_part_effects(table: pd.DataFrame) -> pd.DataFrame:
    """Per directed pair (A, B), kind and changed part: images, mean margin drop and share flipped to B.

    Sorted within each pair and kind by mean margin drop, largest first: the model-causal
    ranking of the parts for that pair.

    Args:
        table: ``counterfactuals.parquet``.
    """
    effects = table.assign(margin_drop=margin_drop(table), flipped=flips_to_b(table))
    grouped = effects.groupby(["class_a", "class_b", "kind", "part"], as_index=False).agg(
        images=("image_id", "nunique"), mean_margin_drop=("margin_drop", "mean"), flip_rate=("flipped", "mean"))
    return grouped.sort_values(["class_a", "class_b", "kind", "mean_margin_drop"],
                               ascending=[True, True, True, False], ignore_index=True)


# --------------------------------------------------------------------------- agreement with the region rankings

SINGLE_PART_KINDS = ("planted", "control")  # one part changed: the candidates of the causal ranking
RANDOM_ORDERS = 200  # random orders per pair behind the ``random`` reference's Spearman


def causal_effects(table: pd.DataFrame) -> dict[tuple[int, int], pd.Series]:
    """Per directed pair (A, B): the mean margin drop of each part with single-part swaps, largest first.

    Planted and control swaps both count: the model-causal ranking is over every part the
    stage changed on its own, so a region ranking that puts a shared part first is caught.

    Args:
        table: ``counterfactuals.parquet``.
    """
    effects = pair_part_effects(table[table["kind"].isin(SINGLE_PART_KINDS)])
    return {(int(a), int(b)): group.set_index("part")["mean_margin_drop"].sort_values(ascending=False, kind="stable")
            for (a, b), group in effects.groupby(["class_a", "class_b"])}


def part_ranks(region_rank: np.ndarray, region_part: Sequence[str], parts: Sequence[str]) -> np.ndarray:
    """Each part's rank in a region ranking: its best-ranked region; after every ranked region where none is.

    Args:
        region_rank: (R,) the pair's region ranks (1 = first; below 1: not ranked, e.g. background).
        region_part: (R,) the ground-truth part each region stands for.
        parts: the parts to rank.
    """
    unranked = float(max(int((np.asarray(region_rank) >= 1).sum()), 1) + 1)
    best = {}
    for rank, part in zip(region_rank, region_part):
        if rank >= 1:
            best[part] = min(best.get(part, np.inf), float(rank))
    return np.array([best.get(p, unranked) for p in parts])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation (average ranks for ties); 0 where either side cannot order anything."""
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def pair_agreement(effect: pd.Series, region_rank: np.ndarray, region_part: Sequence[str]) -> tuple[float, float]:
    """(top-1 hit, Spearman) of one pair's region ranking against its counterfactual ranking.

    Top-1: the part of the region ranked first has the largest counterfactual effect (ties
    count). Spearman: over the parts with counterfactual rows, the region ranking (each part
    at its best region's rank) against the effects (largest first); NaN with fewer than 2 parts.

    Args:
        effect: part -> mean margin drop (``causal_effects``).
        region_rank: (R,) the pair's region ranks in one score.
        region_part: (R,) the part each region stands for.
    """
    first = [p for r, p in zip(region_rank, region_part) if r == 1]
    top1 = float(bool(first) and first[0] in effect.index and effect[first[0]] >= effect.max())
    if len(effect) < 2:
        return top1, float("nan")
    ranks = part_ranks(region_rank, region_part, list(effect.index))
    return top1, spearman(-ranks, effect.to_numpy(np.float64))


def random_agreement(effect: pd.Series, region_rank: np.ndarray, region_part: Sequence[str],
                     rng: np.random.Generator) -> tuple[float, float]:
    """The ``random`` reference of one pair: the expected top-1 hit of a random order of its ranked
    regions (exact), and the mean Spearman over ``RANDOM_ORDERS`` random orders."""
    ranked = np.flatnonzero(np.asarray(region_rank) >= 1)
    parts = [region_part[i] for i in ranked]
    best = set(effect.index[effect >= effect.max()])
    top1 = float(np.mean([p in best for p in parts]))
    if len(effect) < 2:
        return top1, float("nan")
    rhos = []
    for _ in range(RANDOM_ORDERS):
        shuffled = np.full(len(region_rank), -1)
        shuffled[ranked] = rng.permutation(len(ranked)) + 1
        rhos.append(pair_agreement(effect, shuffled, region_part)[1])
    return top1, float(np.mean(rhos))


def _agreement_metric_rows(method: str, suffix: str, values: Sequence[tuple[float, float]], split: str,
                           seed: int) -> list[dict]:
    """The top-1 and Spearman rows of one ranking from its per-pair (top-1, Spearman) values."""
    top1 = np.array([v[0] for v in values])
    rho = np.array([v[1] for v in values])
    rows = [metric_row(method, f"counterfactual_agreement_top1{suffix}", split, top1, seed)]
    if np.isfinite(rho).any():
        rows.append(metric_row(method, f"counterfactual_spearman{suffix}", split, rho[np.isfinite(rho)], seed))
    return rows


def agreement_rows(counterfactuals: pd.DataFrame, contrasts: pd.DataFrame, method: str, split: str,
                   seed: int = 0) -> list[dict]:
    """Evaluation rows: does each region ranking of the pairs follow what the model relies on?

    ``counterfactual_agreement_top1`` / ``counterfactual_spearman`` score the combined ranking;
    a score's own ranking adds its suffix (``analysis.recovery.VARIANTS``: ``_density``,
    ``_difference``, ``_occlusion``, ``_pair_attention``); the references ``size_baseline``
    (regions by area) and ``random`` (a random order of the ranked regions) carry the plain
    names. Pairs: those of both tables with a ranked region in the combined ranking.

    Args:
        counterfactuals: ``counterfactuals.parquet``.
        contrasts: ``contrasts.parquet`` rows plus ``part``: the ground-truth part each region
            stands for (the region itself for annotated parts, its majority part otherwise).
        method: the model's method name.
        split: the split the images came from.
        seed: seed of the bootstrap intervals and the random orders.
    """
    effects = causal_effects(counterfactuals)
    ranked = contrasts["rank_combined"].to_numpy(np.int64) >= 1
    contrasts = contrasts.assign(rank_size_baseline=area_ranks(contrasts, ranked))
    pairs = [(effects[(int(a), int(b))], group) for (a, b), group in contrasts.groupby(["class_a", "class_b"])
             if (int(a), int(b)) in effects and (group["rank_combined"] >= 1).any()]
    if not pairs:
        return []
    rows: list[dict] = []
    for score, suffix in VARIANTS.items():
        column = f"rank_{score}"
        if column not in contrasts or (contrasts[column] < 1).all():  # a score this run does not have
            continue
        values = [pair_agreement(effect, group[column].to_numpy(), group["part"].tolist()) for effect, group in pairs]
        rows += _agreement_metric_rows(method, suffix, values, split, seed)
    size = [pair_agreement(effect, group["rank_size_baseline"].to_numpy(), group["part"].tolist())
            for effect, group in pairs]
    rows += _agreement_metric_rows("size_baseline", "", size, split, seed)
    rng = np.random.default_rng(seed)
    chance = [random_agreement(effect, group["rank_combined"].to_numpy(), group["part"].tolist(), rng)
              for effect, group in pairs]
    rows += _agreement_metric_rows("random", "", chance, split, seed)
    return rows
