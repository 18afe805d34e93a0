"""Scoring the contrast rankings against ground truth.

* Synthetic data (planted traits): **trait recovery**. For every directed
  look-alike pair, ``top1`` = the top-ranked region is a planted differing
  part; ``recall3`` = the share of the pair's planted parts (at most 3) among
  its top 3 regions. Metric ``trait_recovery_top1`` / ``_recall3`` scores the
  combined ranking; ``_density``, ``_difference``, ``_occlusion``,
  ``_pair_attention`` each score.
  References: ``random`` (the expected value of a random order of the
  pair's ranked regions) and ``size_baseline`` (regions ordered by their mean
  area on A's images: what a uniform map over the bird would rank).
* Real CUB (per-class attributes): **attribute precision**. For a pair, the
  expected regions are those of the attributes whose per-class values differ
  by more than ``attribute_threshold`` (values scaled to [0, 1]);
  ``attribute_precision_at1`` = the top region is expected, ``_at3`` = the
  share of the top 3 that are. Same suffixes and references.

The one attribute-to-region table is ``ATTRIBUTE_REGIONS`` below. It maps the
attribute group that ``intr prepare`` writes in ``class_attributes.parquet``'s
``part`` column (``intr.data.cub.attribute_part``: ``has_bill_color`` ->
``bill``) to region names; a group maps to those of its regions that the data
set's vocabulary has (CUB's ``left wing`` and ``right wing``, the synthetic
data's ``wing``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from analysis.stats import metric_row

# attribute group (class_attributes.part) -> candidate region names (kept where the vocabulary has them)
ATTRIBUTE_REGIONS: dict[str, tuple[str, ...]] = {
    "bill": ("beak", "bill"),
    "crown": ("crown",),
    "forehead": ("forehead",),
    "nape": ("nape",),
    "throat": ("throat",),
    "head": ("crown", "forehead", "nape", "head"),
    "eye": ("left eye", "right eye", "eye"),
    "breast": ("breast",),
    "belly": ("belly",),
    "back": ("back", "body"),
    "upperparts": ("back", "nape", "body"),
    "underparts": ("breast", "belly", "throat", "body"),
    "wing": ("left wing", "right wing", "wing"),
    "tail": ("tail",),
    "upper_tail": ("tail",),
    "under_tail": ("tail",),
    "leg": ("left leg", "right leg", "legs", "leg"),
}
VARIANTS = {"combined": "", "density": "_density", "difference": "_difference", "occlusion": "_occlusion",
            "pair_attention": "_pair_attention"}


def attribute_regions(group: str | None, vocab: Sequence[str]) -> list[str]:
    """Regions of the vocabulary that an attribute group describes (none for whole-bird attributes)."""
    if group is None or (isinstance(group, float) and np.isnan(group)):
        return []
    present = set(vocab)
    candidates = ATTRIBUTE_REGIONS.get(str(group), (str(group),))
    return [r for r in candidates if r in present]


def expected_from_attributes(attributes: pd.DataFrame, pairs: pd.DataFrame, vocab: Sequence[str],
                             threshold: float) -> list[set[str]]:
    """Per pair (rows of ``pairs``: class_a, class_b), the regions whose attributes differ by > threshold.

    ``attributes``: class_attributes.parquet (class_id, attribute_id, part, value); values above 1
    are taken as percentages (CUB's 0-100) and scaled to [0, 1].
    """
    table = attributes.pivot_table(index="class_id", columns="attribute_id", values="value", aggfunc="mean")
    values = table.to_numpy(np.float64)
    if np.nanmax(values) > 1:
        values = values / 100.0
    group_of = attributes.drop_duplicates("attribute_id").set_index("attribute_id")["part"]
    regions = [attribute_regions(group_of.get(a), vocab) for a in table.columns]
    row_of = {int(c): i for i, c in enumerate(table.index)}
    out = []
    for a, b in zip(pairs["class_a"], pairs["class_b"]):
        if int(a) not in row_of or int(b) not in row_of:
            out.append(set())
            continue
        diff = np.abs(values[row_of[int(a)]] - values[row_of[int(b)]]) > threshold
        out.append({r for j in np.flatnonzero(diff) for r in regions[j]})
    return out


def _per_pair(contrasts: pd.DataFrame, truth: np.ndarray, rank: np.ndarray) -> pd.DataFrame:
    """Per pair: hit@1, hits in the top 3, truth count and ranked count (vectorised over rows)."""
    ranked = rank >= 1
    frame = pd.DataFrame({"class_a": contrasts["class_a"].to_numpy(), "class_b": contrasts["class_b"].to_numpy(),
                          "hit1": (rank == 1) & truth, "hit3": ranked & (rank <= 3) & truth,
                          "truth": ranked & truth, "ranked": ranked})
    return frame.groupby(["class_a", "class_b"], sort=True)[["hit1", "hit3", "truth", "ranked"]].sum()


def area_ranks(contrasts: pd.DataFrame, ranked: np.ndarray) -> np.ndarray:
    """The size baseline's rank of every row: regions by mean area within the pair (ranked regions only)."""
    area = contrasts["area"].to_numpy(np.float64)
    key = np.where(ranked & np.isfinite(area), area, -np.inf)
    frame = pd.DataFrame({"a": contrasts["class_a"].to_numpy(), "b": contrasts["class_b"].to_numpy(), "k": key})
    rank = frame.groupby(["a", "b"])["k"].rank(ascending=False, method="first").to_numpy()
    return np.where(ranked & np.isfinite(area), rank, -1).astype(np.int64)


def ranking_rows(contrasts: pd.DataFrame, truth: np.ndarray, method: str, split: str, prefix: str,
                 at3: str, seed: int = 0, misses_count: bool = False) -> list[dict]:
    """Evaluation rows for every ranking of ``contrasts`` against per-row ``truth`` (bool).

    Args:
        contrasts: contrasts.parquet rows (with ``area``).
        truth: (rows,) the region is a right answer for its pair (planted / expected).
        method, split: the model's name and split.
        prefix: ``trait_recovery`` or ``attribute_precision``.
        at3: the second metric's name: ``recall3`` (hits / min(3, answers)) or ``at3`` (hits / 3).
        misses_count: a pair none of whose regions is a right answer counts as a miss (trait
            recovery on regions other than the annotated parts: the planted part is known, but no
            region stands for it); else such a pair is left out (no answer to find).
    """
    truth = np.asarray(truth, dtype=bool)
    rows: list[dict] = []
    first = "top1" if at3 == "recall3" else "at1"

    def second(per: pd.DataFrame) -> np.ndarray:
        if at3 == "recall3":
            return (per["hit3"] / np.minimum(3, per["truth"]).clip(lower=1)).to_numpy()
        return (per["hit3"] / np.minimum(3, per["ranked"])).to_numpy()

    base = None
    for score, suffix in VARIANTS.items():
        if f"rank_{score}" not in contrasts:  # a contrasts table written before the score existed
            continue
        rank = contrasts[f"rank_{score}"].to_numpy(np.int64)
        per = _per_pair(contrasts, truth, rank)
        per = per[((per["truth"] > 0) | misses_count) & (per["ranked"] > 0)]
        if base is None:
            base = per
        if not len(per) or (rank < 1).all():
            continue
        rows.append(metric_row(method, f"{prefix}_{first}{suffix}", split, per["hit1"].to_numpy(float), seed))
        rows.append(metric_row(method, f"{prefix}_{at3}{suffix}", split, second(per), seed))
    if base is None or not len(base):
        return rows
    ranked = contrasts["rank_combined"].to_numpy(np.int64) >= 1
    size = _per_pair(contrasts, truth, area_ranks(contrasts, ranked))
    size = size.loc[base.index]
    rows.append(metric_row("size_baseline", f"{prefix}_{first}", split, size["hit1"].to_numpy(float), seed))
    rows.append(metric_row("size_baseline", f"{prefix}_{at3}", split, second(size), seed))
    n_ranked, n_truth = base["ranked"].to_numpy(float), base["truth"].to_numpy(float)
    top = np.minimum(3, n_ranked)
    rnd1 = n_truth / n_ranked
    expected_hits3 = top * n_truth / n_ranked
    rnd3 = expected_hits3 / np.maximum(np.minimum(3, n_truth), 1) if at3 == "recall3" else expected_hits3 / top
    rows.append(metric_row("random", f"{prefix}_{first}", split, rnd1, seed))
    rows.append(metric_row("random", f"{prefix}_{at3}", split, rnd3, seed))
    return rows


def recovery_rows(contrasts: pd.DataFrame, method: str, split: str, seed: int = 0) -> list[dict]:
    """Trait recovery rows where ``contrasts.planted`` is known (synthetic data)."""
    planted = contrasts["planted"]
    known = planted.notna().to_numpy()
    if not known.any():
        return []
    sub = contrasts[known]
    return ranking_rows(sub, sub["planted"].astype(bool).to_numpy(), method, split, "trait_recovery", "recall3", seed,
                        misses_count=True)


def attribute_rows(contrasts: pd.DataFrame, attributes: pd.DataFrame, vocab: Sequence[str], threshold: float,
                   method: str, split: str, seed: int = 0) -> list[dict]:
    """Attribute precision@1/@3 rows against the per-class attribute table."""
    pairs = contrasts[["class_a", "class_b"]].drop_duplicates().reset_index(drop=True)
    expected = expected_from_attributes(attributes, pairs, vocab, threshold)
    answers = pd.DataFrame([(int(a), int(b), r) for a, b, e in zip(pairs["class_a"], pairs["class_b"], expected)
                            for r in e], columns=["class_a", "class_b", "region"])
    keys = contrasts[["class_a", "class_b", "region"]].astype({"class_a": np.int64, "class_b": np.int64,
                                                             "region": object})
    truth = keys.merge(answers.assign(_hit=True), how="left", on=["class_a", "class_b", "region"])["_hit"]
    truth = truth.fillna(False).to_numpy(bool)
    return ranking_rows(contrasts, truth, method, split, "attribute_precision", "at3", seed)
