"""The planted-part test's geometry, the bootstrap, and gathering metric tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.stats import bootstrap_mean, metric_row
from intr.evaluate import box_cells, cell_overlap, gather_evaluation, planted_parts_by_class
from analysis.tables import read_table, write_table


def test_cell_overlap_is_strict_at_least_one_pixel_per_cell():
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[8, 15] = 2          # one pixel in cell (1, 1) of an 8x8 grid
    mask[40:48, 0:16] = 3    # cells (5, 0) and (5, 1)
    mask[60, 60] = 4         # another part: not asked for
    cells = cell_overlap(mask, [2, 3], (8, 8))
    assert cells.sum() == 3
    assert cells[1, 1] and cells[5, 0] and cells[5, 1] and not cells[7, 7]


def test_cell_overlap_follows_the_whole_image_resize_rule_for_other_sizes():
    mask = np.zeros((30, 60), dtype=np.uint8)  # H=30, W=60 onto a 3x4 grid: cells are 10 x 15 px
    mask[10, 14] = 1   # row 10 -> cell row 1; column 14 -> cell column 0
    mask[29, 45] = 1   # last row -> 2; column 45 -> 3
    cells = cell_overlap(mask, [1], (3, 4))
    assert cells.nonzero()[0].tolist() == [1, 2] and cells.nonzero()[1].tolist() == [0, 3]


def test_box_cells_are_the_cells_a_box_touches():
    cells = box_cells((10.0, 0.0, 12.0, 9.0), (64, 64), (8, 8))  # x 10..22, y 0..9
    assert cells.nonzero()[0].tolist() == [0, 0, 1, 1]
    assert cells.nonzero()[1].tolist() == [1, 2, 1, 2]


def test_planted_parts_are_the_union_over_siblings():
    pairs = pd.DataFrame({"class_a": [0, 0, 1], "class_b": [1, 2, 2],
                          "differing_parts": [["crown"], ["wing"], ["crown", "wing"]]})
    assert planted_parts_by_class(pairs) == {0: {"crown", "wing"}, 1: {"crown", "wing"}, 2: {"wing", "crown"}}


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_items():
    rng = np.random.default_rng(0)
    small = rng.random(50) < 0.3
    large = rng.random(5000) < 0.3
    m, lo, hi = bootstrap_mean(small)
    assert lo <= m <= hi and m == pytest.approx(small.mean())
    _, lo2, hi2 = bootstrap_mean(large)
    assert hi2 - lo2 < (hi - lo) / 5
    assert np.isnan(bootstrap_mean([])).all()  # no items: NaNs, not an error
    row = metric_row("prompt_cam", "top1", "test", [1, 0, 1, 1])
    assert row["value"] == 0.75 and row["n"] == 4 and row["method"] == "prompt_cam"


def test_gather_evaluation_concatenates_metric_tables(tmp_path):
    a = pd.DataFrame([metric_row("prompt_cam", "top1", "test", [1, 1, 0])])
    b = pd.DataFrame([metric_row("chance", "peak_on_planted_part", "test", [0.2, 0.1])])
    write_table(a, tmp_path / "a.parquet")
    write_table(b, tmp_path / "b.parquet")
    gather_evaluation([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "evaluation.parquet")
    table = read_table(tmp_path / "evaluation.parquet")
    assert list(table.columns) == ["method", "metric", "split", "value", "ci_lo", "ci_hi", "n"]
    assert table["method"].tolist() == ["prompt_cam", "chance"]
    assert table["value"].tolist() == pytest.approx([2 / 3, 0.15])
