"""Trait discovery (analysis/): tables written to the contract, planted signal found, statistics right.

The fixture tables come from ``benchmarks/analysis_scale.make_tables``: each
class's top-ranked heads look at its *signature part*, look-alike pairs differ
in their signature parts, region effects and class attributes agree.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from analysis import contrasts as C
from analysis import recovery, regions, traits
from analysis.pipeline import analyze

REPO = Path(__file__).resolve().parent.parent
FAST = {"permutations": 200, "bootstrap": 200, "umap": False, "traits_k_range": [3, 8]}


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
    metrics = analyze(paths["method_dir"], paths["manifest"], paths["root"], base / "out", FAST, progress=False)
    return paths, metrics, base / "out"


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    """CUB layout: 15 keypoint parts, class attributes (0-100), no look-alike table (pairs from attention)."""
    base = tmp_path_factory.mktemp("cub")
    paths = _generator().make_tables(base, "keypoints", classes=8, images=160, heads=8, grid=14, feature_dim=24,
                                     genus_size=4, pairs=False, seed=2)
    metrics = analyze(paths["method_dir"], paths["manifest"], paths["root"], base / "out", FAST, progress=False)
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
    vocab = regions.region_vocabulary(parts)
    w, d = regions.image_geometry(vocab, man, parts, (4, 4), root=tmp_path, targets=[np.array([0])])
    assert np.allclose(w, regions.image_weights(vocab, man, parts, (4, 4), root=tmp_path))
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
    with pytest.raises(FileNotFoundError, match="attention.parquet"):
        analyze(tmp_path / "m", tmp_path / "manifest.parquet", tmp_path, tmp_path / "o", FAST, progress=False)


def test_analysis_never_imports_torch():
    code = "import sys, analysis.pipeline, analysis.traits, analysis.localization; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_umap_coordinates_are_seeded_and_separate_clusters():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.1, (20, 5)) for c in (0.0, 5.0)]).astype(np.float32)
    a, b = traits.embed_2d(x, seed=3), traits.embed_2d(x, seed=3)
    assert a.shape == (40, 2) and np.isfinite(a).all() and np.allclose(a, b)
    gap = np.linalg.norm(a[:20].mean(0) - a[20:].mean(0))
    assert gap > 3 * max(a[:20].std(0).max(), a[20:].std(0).max())
