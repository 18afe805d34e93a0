"""Scores of the counterfactual renders (``counterfactuals.parquet`` from ``intr counterfactual``).

A row is one image of species A re-rendered with some parts changed, scored
against one look-alike B (docs/tables.md).  The model *uses* a planted part
when setting it to B's state makes it predict B; a control swap (a part A and
B share, set to a state from another genus) should not.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

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
