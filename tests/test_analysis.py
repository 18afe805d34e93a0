"""Trait discovery (analysis/): tables written to the contract, planted signal found, statistics right.

The fixture tables come from ``benchmarks/analysis_scale.make_tables``: each
class's top-ranked heads look at its *signature part*, look-alike pairs differ
in their signature parts, region effects and class attributes agree.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from analysis import contrasts as C
from analysis import io
from analysis import part_discovery as pdisc
from analysis import recovery, regions, traits
from analysis.ground_truth import planted_parts_by_class
from analysis.localization import box_cells, peak_on_planted_part_rows
from analysis.pipeline import AnalysisInputs, analyze

REPO = Path(__file__).resolve().parent.parent
FAST = {"permutations": 200, "bootstrap": 200, "umap": False, "traits_k_range": [3, 8], "regions": "annotated"}


def cli_config(**analysis) -> str:
    """--config-json for ``intr analyze``: FAST's analysis options (and ``analysis``), annotated regions."""
    options = {**{k: v for k, v in FAST.items() if k != "regions"}, **analysis}
    return json.dumps({"analysis": options, "extract": {"regions": FAST["regions"]}})


def _generator():
    spec = importlib.util.spec_from_file_location("analysis_scale", REPO / "benchmarks" / "analysis_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Mask layout (the synthetic data's parts), 12 classes in genera of 3, analysed once."""
    base = tmp_path_factory.mktemp("synthetic")
    paths = _generator().make_tables(base, "masks", classes=12, images=240, heads=6, grid=8, feature_dim=16,
                                     genus_size=3, seed=1)
    inputs = AnalysisInputs.conventional(paths["method_dir"], paths["manifest"], paths["root"])
    metrics = analyze(inputs, base / "out", FAST, progress=False)
    return paths, metrics, base / "out"


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    """CUB layout: 15 keypoint parts, class attributes (0-100), no look-alike table (pairs from attention)."""
    base = tmp_path_factory.mktemp("cub")
    paths = _generator().make_tables(base, "keypoints", classes=8, images=160, heads=8, grid=14, feature_dim=24,
                                     genus_size=4, pairs=False, seed=2)
    inputs = AnalysisInputs.conventional(paths["method_dir"], paths["manifest"], paths["root"])
    metrics = analyze(inputs, base / "out", FAST, progress=False)
    return paths, metrics, base / "out"


def value(metrics: pd.DataFrame, method: str, metric: str) -> float:
    row = metrics[(metrics["method"] == method) & (metrics["metric"] == metric)]
    assert len(row) == 1, f"no single row {method}/{metric} in\n{metrics}"
    return float(row["value"].iloc[0])


def test_tables_follow_the_contract(synthetic):
    _, _, out = synthetic
    expect = {
        "head_types": {"head": "int8", "head_type": "int16", "dominant_region": "string",
                       "profile": "fixed_size_list<element: float>[9]"},
        "traits": {"trait": "int16", "name": "string", "purity": "float", "size": "int32",
                   "classes": "list<element: int16>", "class_counts": "list<element: int32>",
                   "representatives": "list<element: int32>"},
        "trait_members": {"member": "int32", "image_id": "int32", "class_id": "int16", "head": "int8",
                          "rank": "int8", "trait": "int16", "umap_x": "float", "umap_y": "float"},
        "regions": {"class_id": "int16", "region": "string", "mass": "float", "density_lo": "float",
                    "n_images": "int32", "rank": "int16", "heads": "list<element: int8>", "trait": "int16"},
        "contrasts": {"class_a": "int16", "class_b": "int16", "density_a": "float", "difference": "float",
                      "occlusion": "float", "combined": "float", "rank_combined": "int16", "p_value": "float",
                      "q_value": "float", "n_images": "int32", "planted": "bool"},
        "metrics_analysis": {"method": "string", "metric": "string", "value": "double", "n": "int64"},
    }
    for name, columns in expect.items():
        schema = pq.read_schema(out / f"{name}.parquet")
        assert schema.metadata[b"schema_version"] == b"1"
        for column, dtype in columns.items():
            assert str(schema.field(column).type) == dtype, (name, column, schema.field(column).type)
    meta = pq.read_schema(out / "head_types.parquet").metadata
    assert b"background" in meta[b"regions"]


def test_planted_traits_are_recovered_far_above_size_baseline(synthetic):
    _, metrics, _ = synthetic
    top1 = value(metrics, "prompt_cam", "trait_recovery_top1")
    assert top1 >= 0.9
    assert top1 - value(metrics, "size_baseline", "trait_recovery_top1") >= 0.4
    for suffix in ("_density", "_difference", "_occlusion"):
        assert value(metrics, "prompt_cam", f"trait_recovery_top1{suffix}") >= 0.8
    # random: the expected share of planted parts among the 8 ranked parts (2 planted per pair)
    assert value(metrics, "random", "trait_recovery_top1") == pytest.approx(2 / 8)
    assert value(metrics, "prompt_cam", "pointing_game") > value(metrics, "chance", "pointing_game") + 0.3
    assert value(metrics, "gradcam", "pointing_game") > value(metrics, "rollout", "pointing_game") + 0.3
    assert value(metrics, "prompt_cam", "mass_on_planted_part") > value(metrics, "size_baseline",
                                                                         "mass_on_planted_part")


def test_contrasts_rank_the_signature_part_first_with_small_q(synthetic):
    paths, _, out = synthetic
    con = pd.read_parquet(out / "contrasts.parquet")
    assert len(con.groupby(["class_a", "class_b"])) == 24  # 12 genus pairs, both directions
    top = con[con["rank_combined"] == 1]
    expected = top["class_a"].map(paths["signature"])
    assert (top["region"].to_numpy() == expected.to_numpy()).mean() >= 0.9
    assert (top["q_value"] < 0.05).mean() >= 0.9
    bg = con[con["region"] == "background"]
    assert (bg["rank_combined"] == -1).all() and bg["p_value"].isna().all()
    # B's signature part scores negative on difference and occlusion (B's evidence, not A's)
    b_sig = con[con["region"] == con["class_b"].map(paths["signature"])]
    assert (b_sig["occlusion"] < 0).mean() > 0.9 and (b_sig["difference"] < 0).mean() > 0.9
    assert con["planted"].notna().all()


def test_regions_traits_and_head_types_name_the_signature_parts(synthetic):
    paths, _, out = synthetic
    reg = pd.read_parquet(out / "regions.parquet")
    best = reg[reg["rank"] == 1].set_index("class_id")["region"]
    assert (best == best.index.map(paths["signature"])).mean() >= 0.9
    assert (reg["density_lo"] <= reg["density"] + 1e-6).all() and (reg["density"] <= reg["density_hi"] + 1e-6).all()
    first = reg[reg["rank"] == 1]
    assert first["heads"].map(len).gt(0).all() and (first["trait"] >= 0).all()
    tr = pd.read_parquet(out / "traits.parquet")
    members = pd.read_parquet(out / "trait_members.parquet")
    assert tr["size"].sum() == len(members) == 240 * 4
    pure = tr[tr["purity"] > 0.9]
    assert pure["dominant_region"].nunique() >= 4  # head parts (beak, crown, eye) may share one trait
    assert tr["name"].is_unique and (tr["purity"] > 0.3).all()
    assert all(sum(c) == s for c, s in zip(tr["class_counts"], tr["size"]))
    rep = tr.iloc[0]["representatives"]
    assert set(members.loc[rep, "trait"]) == {tr.iloc[0]["trait"]}
    ht = pd.read_parquet(out / "head_types.parquet")
    assert len(ht) == 6 and np.allclose(np.stack(ht["profile"]).sum(1), 1, atol=0.02)


def test_cub_layout_attribute_precision_and_pairs_from_attention(cub):
    paths, metrics, out = cub
    con = pd.read_parquet(out / "contrasts.parquet")
    assert con["planted"].isna().all()  # no planted traits on CUB
    assert len(con.groupby(["class_a", "class_b"])) == 8 * 3  # every queried sibling, both directions
    assert "trait_recovery_top1" not in set(metrics["metric"])
    at1 = value(metrics, "prompt_cam", "attribute_precision_at1")
    assert at1 >= 0.9 and at1 - value(metrics, "size_baseline", "attribute_precision_at1") >= 0.4
    assert value(metrics, "random", "attribute_precision_at1") < 0.3
    assert value(metrics, "prompt_cam", "pointing_game") > value(metrics, "chance", "pointing_game")
    ht = pd.read_parquet(out / "head_types.parquet")
    assert len(pq.read_schema(out / "head_types.parquet").field("profile").type.value_type.bit_width * [0]) == 32
    assert len(ht) == 8


def test_attribute_mapping_uses_the_vocabulary_present():
    cub_vocab = regions.region_vocabulary(pd.DataFrame({"part_id": range(1, 4), "part_name":
                                                        ["beak", "left wing", "right wing"]}))
    assert recovery.attribute_regions("bill", cub_vocab) == ["beak"]
    assert recovery.attribute_regions("wing", cub_vocab) == ["left wing", "right wing"]
    assert recovery.attribute_regions("wing", ["wing", "background"]) == ["wing"]
    assert recovery.attribute_regions(None, cub_vocab) == []
    attrs = pd.DataFrame({"class_id": [0, 0, 1, 1], "attribute_id": [1, 2, 1, 2], "part": ["bill", "wing"] * 2,
                          "value": [90.0, 10.0, 10.0, 15.0]})
    pairs = pd.DataFrame({"class_a": [0], "class_b": [1]})
    assert recovery.expected_from_attributes(attrs, pairs, cub_vocab, 0.3) == [{"beak"}]
    assert recovery.expected_from_attributes(attrs, pairs, cub_vocab, 0.9) == [set()]


def test_benjamini_hochberg_and_sign_flip():
    q = C.benjamini_hochberg(np.array([0.01, 0.04, 0.03, np.nan, 0.5]))
    assert np.allclose(q[[0, 1, 2, 4]], [0.04, 0.0533333, 0.0533333, 0.5])
    assert np.isnan(q[3])
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(1.0, 1, 40), np.tile([1.0, -1.0], 20), np.full(40, np.nan)])
    p = C.sign_flip_pvalues(x, 999, rng)
    assert p[0] < 0.01 and p[1] > 0.05 and np.isnan(p[2])


def test_ranks_skip_unranked_and_nan():
    r = C._ranks(np.array([0.1, 0.9, np.nan, 0.5]), np.array([True, True, True, False]))
    assert r.tolist() == [2, 1, -1, -1]


def test_cell_distances_and_image_weights_agree_with_masks(tmp_path):
    from PIL import Image

    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[0:4, 0:4] = 1  # part 1 in the top-left cell of a 4x4 grid
    Image.fromarray(mask).save(tmp_path / "m.png")
    man = pd.DataFrame({"image_id": [1], "width": [16], "height": [16], "bbox_x": [0.0], "bbox_y": [0.0],
                        "bbox_w": [16.0], "bbox_h": [16.0], "mask_path": ["m.png"]})
    parts = pd.DataFrame({"image_id": [1], "part_id": [1], "part_name": ["beak"], "x": [2.0], "y": [2.0],
                          "visible": [True]})
    layout = regions.RegionLayout.build("annotated", parts=parts)
    w, d = regions.image_geometry(layout, man, (4, 4), root=tmp_path, targets=[np.array([0])])
    assert np.allclose(w, regions.image_weights(layout, man, (4, 4), root=tmp_path))
    assert w[0, 0, 0] == 1 and w[0, 0, 1:].sum() == 0
    assert d[0, 0] == 0 and d[0, 1] == pytest.approx(2.5, abs=0.6)  # next cell's centre is ~2 px from the part
    assert d[0].max() > 10


def test_embedding_handles_tiny_inputs():
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    assert traits.embed_2d(x).shape == (3, 2)
    assert traits.embed_2d(x[:1]).shape == (1, 2)
    members = pd.DataFrame({"image_id": [1, 2], "class_id": [0, 0], "head": [0, 1], "rank": [1, 2]})
    t, m = traits.cluster_traits(members, np.eye(2, 3), np.eye(2, 3), None, ["a", "b", "background"], umap=False)
    assert len(t) == 1 and m["trait"].tolist() == [0, 0]


def test_missing_inputs_name_the_file(tmp_path):
    inputs = AnalysisInputs.conventional(tmp_path / "m", tmp_path / "manifest.parquet", tmp_path)
    with pytest.raises(FileNotFoundError, match="attention.parquet"):
        analyze(inputs, tmp_path / "o", FAST, progress=False)


def test_umap_coordinates_are_seeded_and_separate_clusters():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.1, (20, 5)) for c in (0.0, 5.0)]).astype(np.float32)
    a, b = traits.embed_2d(x, seed=3), traits.embed_2d(x, seed=3)
    assert a.shape == (40, 2) and np.isfinite(a).all() and np.allclose(a, b)
    gap = np.linalg.norm(a[:20].mean(0) - a[20:].mean(0))
    assert gap > 3 * max(a[:20].std(0).max(), a[20:].std(0).max())


# --------------------------------------------------------------------------- explicit inputs, the CLI


def test_conventional_inputs_fill_only_the_tables_that_exist(synthetic, cub):
    paths, _, _ = synthetic
    inputs = AnalysisInputs.conventional(paths["method_dir"], paths["manifest"], paths["root"])
    assert inputs.attention == Path(paths["method_dir"]) / "attention.parquet"
    assert inputs.lookalike_pairs == Path(paths["manifest"]).parent / "lookalike_pairs.parquet"
    assert inputs.region_effects is not None and inputs.baseline_maps is not None
    cub_paths = cub[0]
    assert AnalysisInputs.conventional(cub_paths["method_dir"], cub_paths["manifest"],
                                       cub_paths["root"]).lookalike_pairs is None  # no pairs table on CUB


def test_cli_analyze_reads_exactly_the_paths_it_is_given(synthetic, tmp_path):
    """Only the flags name inputs: left out, region effects are not found beside the attention table."""

    from intr.cli import main

    paths, _, out = synthetic
    method, data = Path(paths["method_dir"]), Path(paths["manifest"]).parent
    argv = ["analyze", "--attention", str(method / "attention.parquet"),
            "--predictions", str(method / "predictions.parquet"), "--manifest", str(paths["manifest"]),
            "--parts", str(data / "parts.parquet"), "--lookalike-pairs", str(data / "lookalike_pairs.parquet"),
            "--trait-features", str(method / "trait_features.parquet"), "--root", str(paths["root"]),
            "--out", str(tmp_path), "--config-json", cli_config(), "--quiet"]
    assert main(argv) == 0
    con = pd.read_parquet(tmp_path / "contrasts.parquet")
    assert con["occlusion"].isna().all()  # no --region-effects: no occlusion score
    full = pd.read_parquet(out / "contrasts.parquet")
    pd.testing.assert_series_equal(con["density_a"], full["density_a"])  # the rest as with every input
    metrics = pd.read_parquet(tmp_path / "metrics_analysis.parquet")
    assert "gradcam" not in set(metrics["method"])  # no --baseline-maps
    assert "attribute_precision_at1" not in set(metrics["metric"])  # no --class-attributes


def test_contrasts_metadata_states_the_weights_of_the_combined_score(synthetic):
    meta = pq.read_schema(synthetic[2] / "contrasts.parquet").metadata[b"combined"].decode()
    assert "occlusion (weight 1)" in meta and "difference (weight 0.05)" in meta
    assert meta == C.COMBINED_RULE


# --------------------------------------------------------------------------- geometry and ground truth


def test_box_cells_count_the_cells_whose_centre_is_inside():
    # 64 x 64 image, 8 x 8 grid: cell centres at 4, 12, 20, ... px. Box x 10..22, y 0..9.
    cells = box_cells(np.array([64.0]), np.array([64.0]), np.array([[10.0, 0.0, 12.0, 9.0]]), (8, 8))
    assert np.flatnonzero(cells[0]).tolist() == [1, 2]  # row 0, columns 1 and 2 (centres 12 and 20)
    # no box: every cell; a box between cell centres: every cell (nothing would be left to score)
    assert box_cells(np.array([64.0]), np.array([64.0]), np.full((1, 4), np.nan), (8, 8)).all()
    assert box_cells(np.array([64.0]), np.array([64.0]), np.array([[5.0, 5.0, 2.0, 2.0]]), (8, 8)).all()


def test_cell_overlap_is_at_least_one_mask_pixel_by_the_regions_rule():
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[8, 15] = 2          # one pixel in cell (1, 1) of an 8x8 grid
    mask[40:48, 0:16] = 3    # cells (5, 0) and (5, 1)
    mask[60, 60] = 4         # another part: not asked for
    vocab = ["crown", "wing", "tail", regions.BACKGROUND]
    labels = regions.label_map(vocab, 64, 64, (64, 64), mask=mask, mask_names={2: "crown", 3: "wing", 4: "tail"})
    weights = regions.patch_weights(labels, (8, 8), len(vocab))
    assert weights[0, 1 * 8 + 1] == pytest.approx(1 / 64)  # one of the cell's 64 sample points
    cells = regions.cells_on_regions(weights, np.array([True, True, False, False])).reshape(8, 8)
    assert np.argwhere(cells).tolist() == [[1, 1], [5, 0], [5, 1]]
    both = regions.cells_on_regions(np.stack([weights, weights]), np.array([[False, False, True, False]] * 2))
    assert both.shape == (2, 64) and np.flatnonzero(both[1]).tolist() == [7 * 8 + 7]


@pytest.mark.parametrize("grid, size, n_regions", [((8, 8), (64, 64), 14), ((4, 6), (12, 30), 5)])
def test_patch_weights_are_the_cell_means_of_a_one_hot_map_bit_for_bit(grid, size, n_regions):
    rng = np.random.default_rng(0)
    gh, gw = grid
    for labels in (rng.integers(0, n_regions, size=size), np.full(size, n_regions - 1)):
        onehot = (labels[None] == np.arange(n_regions)[:, None, None]).astype(np.float32)
        sh, sw = size[0] // gh, size[1] // gw
        expected = onehot.reshape(n_regions, gh, sh, gw, sw).mean(axis=(2, 4)).reshape(n_regions, gh * gw)
        got = regions.patch_weights(labels.astype(np.int16), grid, n_regions)
        assert got.dtype == np.float32 and np.array_equal(got, expected)
        assert np.allclose(got.sum(0), 1.0)
    with pytest.raises(ValueError, match="multiple of the grid"):
        regions.patch_weights(np.zeros((10, 10), dtype=np.int16), (3, 3), 2)


def test_planted_parts_are_the_union_over_siblings():
    pairs = pd.DataFrame({"class_a": [0, 0, 1], "class_b": [1, 2, 2],
                          "differing_parts": [["crown"], np.array(["wing"]), ["crown", "wing"]]})
    assert planted_parts_by_class(pairs) == {0: {"crown", "wing"}, 1: {"crown", "wing"}, 2: {"wing", "crown"}}
    assert planted_parts_by_class(pairs.drop(columns="differing_parts")) == {}  # CUB: no planted traits
    assert planted_parts_by_class(None) == {}


def test_region_density_leaves_absent_regions_out():
    density = regions.region_density(np.array([[0.2, 0.0, 0.5]]), np.array([[0.1, 0.0, 0.5]]))
    assert density[0, 0] == pytest.approx(2.0) and np.isnan(density[0, 1]) and density[0, 2] == 1.0
    assert traits.dominant_region(density).tolist() == [0]


def test_peak_region_of_the_report_is_the_trait_members_dominant_region(synthetic):
    """One peak-region rule: the report's PeakRegions names what trait_members.parquet says."""
    from analysis import io
    from analysis.report import PeakRegions

    paths, _, out = synthetic
    members = pd.read_parquet(out / "trait_members.parquet").iloc[::7]
    keys, maps = io.maps(Path(paths["method_dir"]) / "attention.parquet", query_role="true")
    position = {(int(i), int(h)): k for k, (i, h) in enumerate(zip(keys["image_id"], keys["head"]))}
    layout = regions.RegionLayout.build("annotated", parts=pd.read_parquet(Path(paths["manifest"]).parent /
                                                                          "parts.parquet"))
    peaks = PeakRegions(pd.read_parquet(paths["manifest"]), layout, Path(paths["root"]))
    peaks.prepare(members["image_id"], maps.shape[1:])
    named = [peaks.peak(i, maps[position[(int(i), int(h))]]) for i, h in zip(members["image_id"], members["head"])]
    assert named == members["dominant_region"].tolist()


def test_peak_on_planted_part_rows_on_hand_made_heads():
    on_planted = np.array([[True, False, False, False], [False, False, True, True]])
    inside = np.array([[True, True, False, False], [True, True, True, True]])
    peaks = np.array([[0, 1, 2], [2, 3, 0]])  # heads 0..2 of two images: hits [1,0,0] and [1,1,0]
    ranks = np.array([[1, 3, 2], [2, 1, 3]])
    rows = {r["method"]: r for r in peak_on_planted_part_rows("m", "test", peaks, ranks, on_planted, inside)}
    assert rows["m"]["value"] == 1.0 and rows["m"]["n"] == 2  # top heads 0 and 1: both hit
    assert rows["chance"]["value"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert rows["best_fixed_head"]["value"] == 1.0  # head 0 hits on both images
    assert rows["lowest_ranked_head"]["value"] == 0.0  # heads 1 and 2: both miss
    assert {r["metric"] for r in rows.values()} == {"peak_on_planted_part"}


def test_peak_on_planted_part_matches_a_plain_loop_over_the_masks(synthetic):
    """The table-based score against the definition, pixel by pixel (64 px images, 8 x 8 grid)."""
    from PIL import Image

    from analysis import io

    paths, metrics, _ = synthetic
    method, data = Path(paths["method_dir"]), Path(paths["manifest"]).parent
    manifest = pd.read_parquet(paths["manifest"]).set_index("image_id")
    part_id = dict(zip(*pd.read_parquet(data / "parts.parquet")[["part_name", "part_id"]].drop_duplicates()
                       .to_numpy().T))
    planted: dict[int, set] = {}
    for a, b, parts in pd.read_parquet(data / "lookalike_pairs.parquet")[["class_a", "class_b",
                                                                         "differing_parts"]].to_numpy():
        for c in (a, b):
            planted.setdefault(int(c), set()).update(parts)
    correct = pd.read_parquet(method / "predictions.parquet").set_index("image_id")["correct"]
    keys, maps = io.maps(method / "attention.parquet", query_role="true")
    top, low, chance, by_head = [], [], [], []
    for image_id, rows in keys.groupby("image_id"):
        row = manifest.loc[image_id]
        mask = np.asarray(Image.open(Path(paths["root"]) / row["mask_path"]))
        ys, xs = np.nonzero(np.isin(mask, [part_id[p] for p in planted[int(row["class_id"])]]))
        overlap = np.zeros((8, 8), bool)
        overlap[ys * 8 // mask.shape[0], xs * 8 // mask.shape[1]] = True
        if not correct[image_id] or not overlap.any():
            continue
        hits = {int(h): overlap.reshape(-1)[maps[k].argmax()] for k, h in zip(rows.index, rows["head"])}
        rank = dict(zip(rows["head"].astype(int), rows["head_rank"]))
        top.append(hits[min(rank, key=rank.get)])
        low.append(hits[max(rank, key=rank.get)])
        by_head.append([hits[h] for h in sorted(hits)])
        centre = (np.arange(8) + 0.5) * 8
        x, y, w, h = row[["bbox_x", "bbox_y", "bbox_w", "bbox_h"]]
        inside = ((centre >= y) & (centre <= y + h))[:, None] & ((centre >= x) & (centre <= x + w))[None, :]
        chance.append(overlap[inside].mean())
    assert value(metrics, "prompt_cam", "peak_on_planted_part") == pytest.approx(np.mean(top))
    assert value(metrics, "lowest_ranked_head", "peak_on_planted_part") == pytest.approx(np.mean(low))
    assert value(metrics, "best_fixed_head", "peak_on_planted_part") == pytest.approx(np.mean(by_head, 0).max())
    assert value(metrics, "chance", "peak_on_planted_part") == pytest.approx(np.mean(chance))
    assert value(metrics, "prompt_cam", "peak_on_planted_part") > value(metrics, "chance", "peak_on_planted_part")


def _discovered_from_masks(paths: dict, out: Path, k: int = 5) -> Path:
    """A discovered_parts table made from the masks (part j -> label j % k + 1, several parts merged)."""
    manifest = pd.read_parquet(paths["manifest"])
    attention_ids = np.unique(pd.read_parquet(Path(paths["method_dir"]) / "attention.parquet",
                                              columns=["image_id"])["image_id"])
    rows = manifest[manifest["image_id"].isin(attention_ids)].reset_index(drop=True)
    layout = regions.RegionLayout.build("annotated", parts=pd.read_parquet(Path(paths["manifest"]).parent /
                                                                            "parts.parquet"))
    grid = tuple(io.grid_of(Path(paths["method_dir"]) / "attention.parquet"))
    truth = regions.image_weights(layout, rows, grid, root=paths["root"]).argmax(1)  # (N, G) true region
    background = layout.vocab.index(regions.BACKGROUND)
    labels = np.where(truth == background, 0, truth % k + 1).astype(np.int8)
    pdisc.write_discovered_parts(out, rows["image_id"].to_numpy(), labels.reshape(len(rows), -1), None,
                                 {"grid_h": grid[0], "grid_w": grid[1], "k": k, "method": "from_masks"})
    return out


def test_discovered_regions_give_the_same_tables_with_every_annotation_removed(synthetic, tmp_path):
    """regions: discovered reads no parts, masks, boxes, pairs or attributes; only the scores need them."""
    paths, _, _ = synthetic
    discovered = _discovered_from_masks(paths, tmp_path / "discovered_parts.parquet")
    options = {**FAST, "regions": "discovered"}
    full = AnalysisInputs.conventional(paths["method_dir"], paths["manifest"], paths["root"])
    full = AnalysisInputs(**{**{f: getattr(full, f) for f in full.__dataclass_fields__},
                             "discovered_parts": discovered})
    with_truth = analyze(full, tmp_path / "a", options, progress=False)

    bare = tmp_path / "bare"
    bare.mkdir()
    manifest = pd.read_parquet(paths["manifest"]).drop(columns=["mask_path", "bbox_x", "bbox_y", "bbox_w",
                                                                 "bbox_h", "genus"], errors="ignore")
    manifest.to_parquet(bare / "manifest.parquet")
    stripped = AnalysisInputs(attention=full.attention, predictions=full.predictions, manifest=bare / "manifest.parquet",
                              root=bare, region_effects=full.region_effects, trait_features=full.trait_features,
                              discovered_parts=discovered)
    without = analyze(stripped, tmp_path / "b", options, progress=False)

    for name in ("head_types", "traits", "trait_members", "regions", "contrasts"):
        a, b = pd.read_parquet(tmp_path / "a" / f"{name}.parquet"), pd.read_parquet(tmp_path / "b" / f"{name}.parquet")
        if name == "contrasts":  # the ground-truth flag is the evaluation's, the rest is discovery
            assert a["planted"].notna().all() and b["planted"].isna().all()
            a, b = a.drop(columns="planted"), b.drop(columns="planted")
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
    assert set(pd.read_parquet(tmp_path / "a" / "regions.parquet")["region"]) <= \
        {f"part_{i}" for i in range(1, 6)} | {"background"}
    assert 0 <= value(with_truth, "prompt_cam", "trait_recovery_top1") <= 1
    assert "trait_recovery_top1" not in set(without["metric"])
    assert {"pointing_game", "peak_on_planted_part"} <= set(with_truth["metric"])


# --------------------------------------------------------------------------- pair attention (score d)


def test_pair_attention_reads_the_density_of_each_pairs_own_top_head_map(tmp_path):
    """Hand-made: 3 images, 2 heads, 3 regions; the pair's rank-1 head picks the true class's map row."""
    from analysis.pipeline import ImageTable, MapTable, read_pair_attention
    from analysis.tables import write_columns

    images = ImageTable(np.array([10, 11, 12]), np.array([0, 0, 1]), np.ones(3, bool), pd.DataFrame())
    # True-class maps of heads 0 and 1 per image, and one sibling map that must never be read.
    maps = MapTable(image=np.array([0, 0, 1, 1, 2, 2, 0]), query_class=np.array([0, 0, 0, 0, 1, 1, 1]),
                    role=np.array(["true"] * 6 + ["sibling"]), head=np.array([0, 1, 0, 1, 0, 1, 0]),
                    head_rank=np.array([1, 2, 2, 1, 1, 2, 1]), maps=np.zeros((7, 4), np.float32))
    density = np.arange(21, dtype=np.float32).reshape(7, 3)  # row k: 3k, 3k+1, 3k+2
    path = tmp_path / "pair_head_ranks.parquet"
    write_columns("pair_head_ranks", {
        "image_id": [10, 10, 11, 11, 11, 11, 12, 12, 99, 99], "class_a": [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        "class_b": [1, 1, 1, 1, 2, 2, 1, 1, 1, 1], "head": [0, 1, 0, 1, 0, 1, 0, 1, 0, 1],
        "rank": [2, 1, 1, 2, 2, 1, 1, 2, 1, 2], "margin_after_blur": np.zeros(10, np.float32)}, path)
    score = read_pair_attention(path, maps, images, density)
    # (A=0, B=1): image 10's top head is 1 (map row 1), image 11's is 0 (row 2); image 12 is of class 1,
    # so its class_a=0 rows are not its own pair; image 99 is not analysed.
    got = score.of(np.array([0, 1, 2]), 1)
    assert got[:2].tolist() == [[3, 4, 5], [6, 7, 8]] and np.isnan(got[2]).all()
    assert score.of(np.array([1, 0]), 2)[0].tolist() == [9, 10, 11]  # (A=0, B=2) on image 11: head 1
    assert np.isnan(score.of(np.array([1, 0]), 2)[1]).all()  # image 10 has no B=2 ranking
    assert read_pair_attention(None, maps, images, density) is None


def test_pair_attention_is_ranked_but_never_enters_the_combined_score():
    rng = np.random.default_rng(0)
    ranked = np.array([True, True, True, True, False])
    per_image = {name: rng.normal(size=(12, 5)) for name in C.SCORES}
    without = C.score_pair(per_image, ranked, 200, np.random.default_rng(1))
    pair = rng.normal(size=(12, 5)) + np.array([0, 0, 3, 0, 9])
    with_pair = C.score_pair({**per_image, "pair_attention": pair}, ranked, 200, np.random.default_rng(1))
    for name in ("combined", "p_value", "q_value", "rank_combined"):
        np.testing.assert_array_equal(with_pair[name], without[name])
    np.testing.assert_allclose(with_pair["pair_attention"], pair.mean(0))
    assert with_pair["rank_pair_attention"][2] == 1 and with_pair["rank_pair_attention"][4] == -1  # background
    assert np.isnan(without["pair_attention"]).all() and (without["rank_pair_attention"] == -1).all()


def test_pair_attention_of_the_true_class_top_head_equals_its_density_through_the_cli(synthetic, tmp_path):
    """With every pair's top head set to A's own rank-1 head and top_heads 1, score (d) is score (a)."""

    from analysis.tables import write_columns
    from intr.cli import main

    paths, _, _ = synthetic
    method, data = Path(paths["method_dir"]), Path(paths["manifest"]).parent
    attention = pd.read_parquet(method / "attention.parquet",
                                columns=["image_id", "query_class", "query_role", "head", "head_rank"])
    own_top = attention[(attention["query_role"] == "true") & (attention["head_rank"] == 1)]
    siblings = attention[(attention["query_role"] != "true") & (attention["head"] == 0)]
    pairs = siblings[["image_id", "query_class"]].merge(own_top, on="image_id", suffixes=("_b", ""))
    heads = int(attention["head"].max()) + 1
    rows = pairs.loc[pairs.index.repeat(heads)].assign(other=np.tile(np.arange(heads), len(pairs)))
    other, top = rows["other"].to_numpy(), rows["head"].to_numpy()
    rank = np.where(other == top, 1, 2 + other - (other > top))  # a permutation with A's own top head first
    write_columns("pair_head_ranks", {"image_id": rows["image_id"].to_numpy(), "class_a": rows["query_class"].to_numpy(),
                                      "class_b": rows["query_class_b"].to_numpy(), "head": rows["other"].to_numpy(),
                                      "rank": rank, "margin_after_blur": np.zeros(len(rows), np.float32)},
                  tmp_path / "pair_head_ranks.parquet")
    argv = ["analyze", "--attention", str(method / "attention.parquet"),
            "--predictions", str(method / "predictions.parquet"), "--manifest", str(paths["manifest"]),
            "--parts", str(data / "parts.parquet"), "--lookalike-pairs", str(data / "lookalike_pairs.parquet"),
            "--region-effects", str(method / "region_effects.parquet"),
            "--pair-head-ranks", str(tmp_path / "pair_head_ranks.parquet"), "--root", str(paths["root"]),
            "--out", str(tmp_path / "out"), "--config-json", cli_config(top_heads=1),
            "--quiet"]
    assert main(argv) == 0
    con = pd.read_parquet(tmp_path / "out" / "contrasts.parquet")
    assert con["pair_attention"].notna().any()
    np.testing.assert_allclose(con["pair_attention"], con["density_a"], rtol=1e-5, equal_nan=True)
    np.testing.assert_array_equal(con["rank_pair_attention"], con["rank_density"])
    metrics = pd.read_parquet(tmp_path / "out" / "metrics_analysis.parquet")
    for at in ("top1", "recall3"):
        assert value(metrics, "prompt_cam", f"trait_recovery_{at}_pair_attention") == \
            value(metrics, "prompt_cam", f"trait_recovery_{at}_density")


# --------------------------------------------------------------------------- the contrasts' image sample


def test_contrast_sample_keeps_a_nested_seeded_sample_per_class_whatever_the_order():
    rng = np.random.default_rng(0)
    image_id = rng.permutation(np.arange(100, 400))
    label = image_id % 3  # 100 images per class
    keep = C.contrast_sample(image_id, label, 10)
    assert np.bincount(label[keep]).tolist() == [10, 10, 10]
    order = rng.permutation(len(image_id))
    again = C.contrast_sample(image_id[order], label[order], 10)
    assert set(image_id[order][again]) == set(image_id[keep])  # the ids decide, not their order
    assert set(image_id[keep]) <= set(image_id[C.contrast_sample(image_id, label, 30)])  # nested
    assert C.contrast_sample(image_id, label, 0).all() and C.contrast_sample(image_id, label, 100).all()
    other = C.contrast_sample(image_id, label, 10, seed=1)
    assert set(image_id[other]) != set(image_id[keep])
    assert 0 < np.mean([i % 2 for i in image_id[keep]]) < 1  # not simply the smallest or largest ids


def test_region_effects_filled_for_fewer_images_than_the_contrasts_average_over_are_refused(tmp_path):
    from analysis.pipeline import ImageTable, read_region_effects
    from analysis.tables import write_table

    rows = pd.DataFrame({"image_id": [1, 2], "class_a": [0, 0], "class_b": [1, 1], "region": ["beak", "beak"],
                         "margin_drop": [0.5, 0.25]})
    images = ImageTable(np.array([1, 2]), np.array([0, 0]), np.array([True, True]), rows)
    for filled, asked, ok in ((0, 0, True), (0, 64, True), (64, 64, True), (64, 8, True), (8, 64, False),
                              (8, 0, False)):
        path = write_table(rows, tmp_path / f"effects_{filled}.parquet", metadata={"contrast_images": filled})
        if ok:
            effects = read_region_effects(path, images, ["beak", "background"], asked)
            assert np.allclose(effects.drop[:, 0], [0.5, 0.25])
        else:
            with pytest.raises(ValueError, match=f"effects_{filled}.parquet holds region effects of {filled} images"):
                read_region_effects(path, images, ["beak", "background"], asked)
