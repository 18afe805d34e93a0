"""Faithfulness (RISE insertion/deletion) and the CAM / rollout baselines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from torch import nn

from intr.baselines import (BackboneFeatures, attention_rollout, backbone_vit, cam_maps, linear_from_logistic,
                            pool_to_grid, rollout, vit_attentions, LinearProbe)
from intr.data.images import ImageSet, read_split
from intr.extract import extract
from intr.faithfulness import (curve_auc, curve_ends, gaussian_blur, insertion_deletion_curves, normalise_maps,
                               run_faithfulness, top_heads_maps_from_attention, true_class_probability,
                               upsample)
from intr.models.backbones import normalization
from intr.models.checkpoint import class_record
from intr.ranking import rank_heads_by_blurring
from analysis.tables import read_metadata
from intr.models import CheckpointError, build_model, load_model
from intr.train import trainable_state

VIT = {"name": "vit_tiny_patch16_224",
       "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4}}
MODELS = {
    "prompt_cam": {"backbone": VIT},
    "intr": {"backbone": VIT, "freeze_backbone": True,
             "transformer": {"d_model": 32, "heads": 4, "encoder_layers": 1, "decoder_layers": 1,
                             "ffn": 64, "dropout": 0.1}},
}


def tiny_model(method: str, num_classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(method, MODELS[method], num_classes, 32).eval()


def save_model(method: str, path: Path, num_classes: int = 4, seed: int = 0, manifest: Path | None = None) -> Path:
    """A random-weight ``model.pt`` that ``intr.models.load_model`` rebuilds exactly.

    Args:
        method: ``prompt_cam`` or ``intr``.
        path: where to write it.
        num_classes: classes of the model.
        seed: seed of the initial and random weights.
        manifest: the manifest whose class names it stores, as ``intr train`` does (None: no names).
    """
    model = tiny_model(method, num_classes, seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    mean, std = normalization(model.backbone)
    config = {"method": method, "model": MODELS[method], "num_classes": num_classes, "image_size": 32,
              "train": {"seed": seed}, "normalization": {"mean": list(mean), "std": list(std)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    classes = class_record(manifest) if manifest is not None else {}
    torch.save({"config": json.dumps(config), "state": trainable_state(model), "epoch": 1, **classes}, path)
    return path


def images(b: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the RISE protocol


class RegionModel(nn.Module):
    """Class 1's logit rises with the mean of channel 0 inside the top-left quarter of the image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 20 * x[:, 0, :8, :8].mean((-2, -1)) - 5
        return torch.stack([torch.zeros_like(z), z], dim=1)


def region_case():
    image = torch.zeros(1, 3, 16, 16)
    image[:, :, :8, :8] = 1.0
    perfect = torch.zeros(1, 16, 16)
    perfect[:, :8, :8] = 1.0
    return image, torch.zeros_like(image), perfect, torch.tensor([1])


def test_deleting_the_important_pixels_first_gives_lower_deletion_and_higher_insertion_auc():
    image, blurred, perfect, target = region_case()
    model = RegionModel()
    ins_p, del_p = insertion_deletion_curves(model, image, blurred, perfect, target, steps=8)
    ins_i, del_i = insertion_deletion_curves(model, image, blurred, 1 - perfect, target, steps=8)
    # Exact curves: the region is 64 of 256 pixels, 32 pixels per step, raster order within ties.
    s = torch.sigmoid
    expected_del = torch.tensor([s(torch.tensor(15.)), s(torch.tensor(5.))] + [s(torch.tensor(-5.))] * 7)
    torch.testing.assert_close(del_p[0], expected_del)
    expected_ins = torch.tensor([s(torch.tensor(-5.)), s(torch.tensor(5.))] + [s(torch.tensor(15.))] * 7)
    torch.testing.assert_close(ins_p[0], expected_ins)
    auc = lambda c: float(curve_auc(c, 256)[0])  # noqa: E731
    expected = float(torch.trapezoid(expected_del.double(), torch.linspace(0, 1, 9, dtype=torch.float64)))
    assert auc(del_p) == pytest.approx(expected, abs=1e-6)
    assert auc(del_p) < 0.2 and auc(del_i) > 0.8
    assert auc(ins_p) > 0.8 and auc(ins_i) < 0.2


def test_curve_ends_are_the_image_and_blurred_probabilities_and_chunking_does_not_matter():
    model = tiny_model("prompt_cam")
    x = images(3)
    blurred = gaussian_blur(x, 0.1 * 32)
    saliency = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 2, 3])
    ins, dele = insertion_deletion_curves(model, x, blurred, saliency, target, steps=5, chunk=7)
    with torch.no_grad():
        p_image = true_class_probability(model(x), target)
        p_blur = true_class_probability(model(blurred), target)
    torch.testing.assert_close(dele[:, 0], p_image)
    torch.testing.assert_close(ins[:, -1], p_image)
    torch.testing.assert_close(dele[:, -1], p_blur)
    torch.testing.assert_close(ins[:, 0], p_blur)
    ins2, dele2 = insertion_deletion_curves(model, x, blurred, saliency, target, steps=5, chunk=1000)
    torch.testing.assert_close(ins, ins2)
    torch.testing.assert_close(dele, dele2)
    assert not torch.allclose(ins[:, 2], ins[:, 3])  # the middle of the curve moves
    # Ends computed once per image (curve_ends, what run_faithfulness shares among the maps) give the
    # same curves, and the points between the ends still come from the model.
    ends = curve_ends(model, x, {"": blurred, "_other": x.flip(-1)}, target)
    torch.testing.assert_close(ends[""][0], p_image)
    torch.testing.assert_close(ends[""][1], p_blur)
    torch.testing.assert_close(ends["_other"][0], p_image)
    with torch.no_grad():
        torch.testing.assert_close(ends["_other"][1], true_class_probability(model(x.flip(-1)), target))
    ins3, dele3 = insertion_deletion_curves(model, x, blurred, saliency, target, steps=5, chunk=4, ends=ends[""])
    torch.testing.assert_close(ins3, ins)
    torch.testing.assert_close(dele3, dele)
    calls = []
    counting = lambda z: (calls.append(len(z)), model(z))[1]  # noqa: E731
    insertion_deletion_curves(counting, x, blurred, saliency, target, steps=5, ends=ends[""])
    assert sum(calls) == 2 * 3 * 4  # both curves, 3 images, the 4 points between the ends


def test_blur_keeps_constants_and_smooths_an_impulse():
    flat = torch.full((1, 3, 20, 20), 0.7)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)
    impulse = torch.zeros(1, 1, 21, 21)
    impulse[..., 10, 10] = 1.0
    out = gaussian_blur(impulse, 2.0)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert out[..., 10, 10].item() == pytest.approx(1 / (2 * math.pi * 4), rel=0.05)  # 2-D Gaussian peak
    torch.testing.assert_close(gaussian_blur(impulse, 0.0), impulse)


def test_auc_is_the_trapezoid_mean_over_pixel_fractions():
    ramp = torch.linspace(0, 1, 9).unsqueeze(0)
    assert float(curve_auc(ramp)[0]) == pytest.approx(0.5)
    assert float(curve_auc(torch.full((2, 5), 0.3))[1]) == pytest.approx(0.3)
    # 10 pixels in 4 steps: fractions 0, .2 (round 2.5 -> 2), .5, .8 (round 7.5 -> 8), 1
    step = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])
    assert float(curve_auc(step, pixels=10)[0]) == pytest.approx(0.2 + 0.15)


# --------------------------------------------------------------------------- maps


def test_normalised_maps_are_non_negative_and_sum_to_one():
    maps = torch.randn(4, 3, 5)
    maps[2] = 0.0
    out = normalise_maps(maps)
    assert out.shape == (4, 3, 5) and (out >= 0).all()
    torch.testing.assert_close(out.sum((1, 2)), torch.ones(4))
    torch.testing.assert_close(out[2], torch.full((3, 5), 1 / 15))
    pooled = pool_to_grid(torch.arange(16.0).view(1, 4, 4), (2, 2))
    torch.testing.assert_close(pooled, torch.tensor([[[2.5, 4.5], [10.5, 12.5]]]))
    up = upsample(torch.ones(1, 2, 2), (8, 8))
    torch.testing.assert_close(up, torch.ones(1, 8, 8))


@pytest.mark.parametrize("method", ["prompt_cam", "intr"])
def test_model_map_read_from_extracted_attention_is_the_mean_of_the_top_ranked_heads(
        method, tiny_models, tiny_dataset, tmp_path):
    manifest, root = tiny_dataset
    paths = extract(tiny_models[method], manifest, root, tmp_path, batch_size=8, top_heads=2,
                    device="cpu", limit=6, regions="annotated", progress=False)
    model, config = load_model(tiny_models[method])
    norm = config["normalization"]
    data = ImageSet(root, read_split(manifest, "test").iloc[:6], config["image_size"], norm["mean"], norm["std"])
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        _, maps = model.eval().forward_with_maps(x, data.labels.view(-1, 1))
    true_maps = maps[:, 0]  # (B, heads, gh, gw)
    rank = rank_heads_by_blurring(model, x, data.labels).rank  # (B, heads), 1 = most important
    for k in (1, 2, model.num_heads):
        ids, read_back = top_heads_maps_from_attention(paths["attention"], k)
        assert ids.tolist() == data.image_ids.tolist()
        expected = torch.stack([true_maps[b][rank[b] <= k].mean(0) for b in range(len(data))])
        # The table stores float16: maps in [0, 1] carry a rounding error below 2^-11.
        np.testing.assert_allclose(read_back, expected.numpy(), atol=1e-3)


# --------------------------------------------------------------------------- rollout


def test_rollout_of_identity_attention_is_the_identity_and_layers_compose():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    torch.testing.assert_close(rollout([eye, eye]), torch.eye(5).expand(2, 5, 5))
    # The class token (row 0) looks only at patch token 3 in every head of one layer.
    focus = torch.eye(5).clone()
    focus[0] = 0.0
    focus[0, 3] = 1.0
    r = rollout([focus.expand(1, 2, 5, 5)])
    torch.testing.assert_close(r[0, 0], torch.tensor([0.5, 0, 0, 0.5, 0]))
    # Below it, a first layer where token 3 looks at token 1: the class token's flow reaches 1 through 3.
    relay = torch.eye(5).clone()
    relay[3] = 0.0
    relay[3, 1] = 1.0
    r2 = rollout([relay.expand(1, 2, 5, 5), focus.expand(1, 2, 5, 5)])
    a1, a2 = (relay + torch.eye(5)) / 2, (focus + torch.eye(5)) / 2
    torch.testing.assert_close(r2[0], a2 @ a1)
    torch.testing.assert_close(r2[0, 0], torch.tensor([0.5, 0.25, 0, 0.25, 0]))


def test_rollout_of_a_vit_with_uniform_attention_is_uniform_over_patches():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **VIT["kwargs"]).eval()
    with torch.no_grad():
        for block in vit.blocks:
            block.attn.qkv.weight.zero_()  # q = k = 0: every attention row is uniform
            block.attn.qkv.bias.zero_()
    maps = attention_rollout(vit, images(2))
    assert maps.shape == (2, 4, 4)
    torch.testing.assert_close(maps, torch.full_like(maps, maps[0, 0, 0].item()))
    # Uniform rows: A = (U + I) / 2; the class token keeps (1/2)^L + ... of itself.
    n = 17
    a = (torch.full((n, n), 1 / n) + torch.eye(n)) / 2
    expected = (a @ a)[0, 1]
    assert maps[0, 0, 0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_hooked_vit_attention_equals_timms_explicit_attention():
    torch.manual_seed(1)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **VIT["kwargs"]).eval()
    x = images(2)
    ours = vit_attentions(vit, x)
    seen = []
    handles = []
    for block in vit.blocks:
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o.detach())))
    with torch.no_grad():
        vit.forward_features(x)
    for h in handles:
        h.remove()
    assert len(ours) == len(seen) == 2
    for a, b in zip(ours, seen):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- the probe and the CAMs


def test_folded_logistic_regression_equals_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)) * [1, 3, 0.5, 2, 1] + [0, 4, -1, 0, 2]
    for classes in ([0, 2, 3], [1, 3]):  # multinomial with class 1 unseen; binary
        y = np.array(classes)[rng.integers(0, len(classes), 60)]
        scaler = StandardScaler().fit(x)
        reg = LogisticRegression(max_iter=2000).fit(scaler.transform(x), y)
        linear = linear_from_logistic(reg.coef_, reg.intercept_, reg.classes_, scaler.mean_, scaler.scale_, 4)
        probs = torch.softmax(linear(torch.tensor(x, dtype=torch.float32)).double(), 1).detach().numpy()
        np.testing.assert_allclose(probs[:, classes], reg.predict_proba(scaler.transform(x)), atol=1e-5)
        assert probs[:, [c for c in range(4) if c not in classes]].max() < 1e-30


@pytest.mark.parametrize("method", ["prompt_cam", "intr"])
def test_probe_features_are_the_models_probe_features(method):
    model = tiny_model(method)
    assert backbone_vit(model) is not None
    with torch.no_grad():
        torch.testing.assert_close(BackboneFeatures(model)(images(2)), model.probe_features(images(2)))


def test_cams_are_class_specific_where_they_should_be():
    model = tiny_model("prompt_cam")
    features = BackboneFeatures(model)
    torch.manual_seed(3)
    probe = LinearProbe(features, nn.Linear(2 * 48, 4).requires_grad_(False)).eval()
    x = images(2)
    a = cam_maps(probe, x, torch.tensor([0, 0]))
    b = cam_maps(probe, x, torch.tensor([2, 2]))
    for name in ("gradcam", "layercam", "eigencam"):
        assert a[name].shape == (2, 32, 32) and a[name].min() >= 0 and a[name].max() <= 1 + 1e-6
    assert not np.allclose(a["gradcam"], b["gradcam"])
    assert not np.allclose(a["layercam"], b["layercam"])
    np.testing.assert_allclose(a["eigencam"], b["eigencam"])  # class-agnostic
    # The hooks are gone: the backbone's block runs without grad-cam's hooks afterwards.
    assert not model.backbone.blocks[-1].norm1._forward_hooks
    assert all(p.grad is None for p in probe.parameters())


# --------------------------------------------------------------------------- the stage, end to end


@pytest.fixture(scope="module")
def dataset(tiny_dataset) -> tuple[Path, Path]:
    """The shared tiny synthetic set (tests/conftest.py)."""
    return tiny_dataset


def test_a_model_of_other_classes_is_refused_before_any_map_is_computed(tiny_models, dataset, six_class_manifest,
                                                                       tmp_path):
    _, root = dataset
    out_maps, out_metrics = tmp_path / "baseline_maps.parquet", tmp_path / "metrics_faithfulness.parquet"
    with pytest.raises(CheckpointError, match="4 classes in the model, 6 in the manifest; first difference at "
                       "class_id 1: .* 'renamed_species' in the manifest"):
        # The attention table does not exist: the class check comes before anything is read.
        run_faithfulness(tiny_models["intr"], six_class_manifest, root, out_maps, out_metrics,
                         attention=tmp_path / "attention.parquet", device="cpu", progress=False)
    assert not out_maps.exists() and not out_metrics.exists()


@pytest.mark.parametrize("method", ["prompt_cam", "intr"])
def test_run_faithfulness_writes_both_tables(method, dataset, tmp_path):
    manifest, root = dataset
    model_path = save_model(method, tmp_path / method / "model.pt", manifest=manifest)
    # The model's maps come from an extraction of the split's first 8 images; 6 of them are sampled.
    attention = extract(model_path, manifest, root, tmp_path / "extract", batch_size=8, device="cpu", limit=8,
                        regions="annotated", progress=False)["attention"]
    extracted_ids = read_split(manifest, "test")["image_id"].iloc[:8].tolist()
    out_maps, out_metrics = tmp_path / "baseline_maps.parquet", tmp_path / "metrics_faithfulness.parquet"
    table = run_faithfulness(model_path, manifest, root, out_maps, out_metrics, attention=attention, split="test",
                             top_heads=2, images=6, steps=4, batch_size=4, device="cpu", seed=0, progress=False,
                             occlusion="blur")  # the published protocol alone; other operators: the test below
    methods = [method, "gradcam", "layercam", "eigencam", "rollout"]

    maps = pq.read_table(out_maps)
    assert maps.schema.field("image_id").type == pa.int32()
    assert maps.schema.field("method").type == pa.string()
    assert maps.schema.field("class_id").type == pa.int16()
    assert maps.schema.field("attn").type == pa.list_(pa.float16(), 16)
    meta = read_metadata(out_maps)
    assert {k: meta[k] for k in ("method", "backbone", "grid_h", "grid_w", "patch_size", "image_size", "split")} == \
        {"method": method, "backbone": "vit_tiny_patch16_224", "grid_h": 4, "grid_w": 4, "patch_size": 8,
         "image_size": 32, "split": "test"}
    assert meta["schema_version"] == "1"
    df = maps.to_pandas()
    assert len(df) == 6 * 5 and sorted(df["method"].unique()) == sorted(methods)
    test_rows = pd.read_parquet(manifest).query("split == 'test'").set_index("image_id")
    ids = df.loc[df["method"] == method, "image_id"].tolist()
    assert ids == sorted(ids) and len(set(ids)) == 6 and set(ids) <= set(extracted_ids)
    assert (df["class_id"].to_numpy() == test_rows.loc[df["image_id"], "class_id"].to_numpy()).all()
    attn = np.stack(df["attn"].to_numpy()).astype(np.float32)
    assert attn.shape == (30, 16) and (attn >= 0).all()
    np.testing.assert_allclose(attn.sum(1), 1.0, atol=5e-3)
    # The model's rows are its extracted top-2-heads maps, normalised (two float16 roundings apart).
    read_ids, read_maps = top_heads_maps_from_attention(attention, 2)
    expected = normalise_maps(torch.from_numpy(read_maps[np.searchsorted(read_ids, ids)])).flatten(1).numpy()
    np.testing.assert_allclose(attn[(df["method"] == method).to_numpy()], expected, atol=2e-3)

    metrics = pd.read_parquet(out_metrics)
    assert list(metrics.columns) == ["method", "metric", "split", "value", "ci_lo", "ci_hi", "n"]
    assert metrics["method"].tolist() == [m for m in methods for _ in range(2)]
    assert metrics["metric"].tolist() == ["insertion_auc", "deletion_auc"] * 5
    assert (metrics["n"] == 6).all() and (metrics["split"] == "test").all()
    assert metrics["value"].between(0, 1).all()
    assert (metrics["ci_lo"] <= metrics["value"] + 1e-12).all() and (metrics["value"] <= metrics["ci_hi"] + 1e-12).all()
    pd.testing.assert_frame_equal(metrics, table)
    mmeta = read_metadata(out_metrics)
    assert mmeta["images"] == 6 and mmeta["explained_class"] == "true_class"
    assert mmeta["attention"] == str(attention)
    assert mmeta["curve_model"] == {method: method, "gradcam": "linear_probe", "layercam": "linear_probe",
                                    "eigencam": "linear_probe", "rollout": "linear_probe"}


def test_run_faithfulness_refuses_an_attention_table_of_another_split(dataset, tmp_path):
    manifest, root = dataset
    model_path = save_model("prompt_cam", tmp_path / "model.pt", manifest=manifest)
    attention = extract(model_path, manifest, root, tmp_path / "extract", split="val", batch_size=8,
                        device="cpu", limit=2, regions="annotated", progress=False)["attention"]
    with pytest.raises(ValueError, match="split"):
        run_faithfulness(model_path, manifest, root, tmp_path / "maps.parquet", tmp_path / "metrics.parquet",
                         attention=attention, split="test", images=2, device="cpu", progress=False)


def test_another_occlusion_adds_its_rows_beside_the_unchanged_blur_protocol(dataset, tmp_path):
    manifest, root = dataset
    model_path = save_model("prompt_cam", tmp_path / "model.pt", manifest=manifest)
    attention = extract(model_path, manifest, root, tmp_path / "extract", batch_size=8, device="cpu", limit=4,
                        regions="annotated", progress=False)["attention"]
    settings = {"attention": attention, "split": "test", "top_heads": 2, "images": 4, "steps": 4,
                "batch_size": 4, "device": "cpu", "seed": 0, "progress": False}
    blur = run_faithfulness(model_path, manifest, root, tmp_path / "m0.parquet", tmp_path / "f0.parquet",
                            occlusion="blur", **settings)
    both = run_faithfulness(model_path, manifest, root, tmp_path / "m1.parquet", tmp_path / "f1.parquet",
                            occlusion="background_fill", **settings)
    # The published protocol's rows do not move; the operator's come after them, one per method and curve.
    pd.testing.assert_frame_equal(both.iloc[:len(blur)].reset_index(drop=True), blur)
    extra = both.iloc[len(blur):]
    assert extra["metric"].tolist() == ["insertion_auc_background_fill", "deletion_auc_background_fill"] * 5
    assert extra["method"].tolist() == blur["method"].tolist()
    assert not np.allclose(extra["value"].to_numpy(), blur["value"].to_numpy())
    meta = read_metadata(tmp_path / "f1.parquet")
    assert meta["occlusion"] == "background_fill"
    assert set(meta["mean_prob_removed_background_fill"]) == {"model", "linear_probe"}


def test_the_probe_evaluate_writes_gives_the_same_faithfulness_and_is_refused_for_another_model(dataset, tmp_path):
    from intr.evaluate import evaluate_model

    manifest, root = dataset
    model_path = save_model("prompt_cam", tmp_path / "model.pt", manifest=manifest)
    attention = extract(model_path, manifest, root, tmp_path / "extract", batch_size=8, device="cpu", limit=4,
                        regions="annotated", progress=False)["attention"]
    probe_path = tmp_path / "linear_probe.pt"
    evaluate_model(model_path, manifest, root, tmp_path / "metrics_model.parquet", batch_size=8, device="cpu",
                   probe_out=probe_path, progress=False)
    settings = {"attention": attention, "split": "test", "top_heads": 2, "images": 4, "steps": 4,
                "batch_size": 4, "device": "cpu", "seed": 0, "progress": False, "occlusion": "blur"}
    fitted = run_faithfulness(model_path, manifest, root, tmp_path / "m0.parquet", tmp_path / "f0.parquet",
                              **settings)
    reused = run_faithfulness(model_path, manifest, root, tmp_path / "m1.parquet", tmp_path / "f1.parquet",
                              probe=probe_path, **settings)
    pd.testing.assert_frame_equal(reused, fitted, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.stack(pd.read_parquet(tmp_path / "m1.parquet")["attn"]).astype(np.float32),
                               np.stack(pd.read_parquet(tmp_path / "m0.parquet")["attn"]).astype(np.float32),
                               atol=2e-3)
    # A probe fitted on another model.pt would read another backbone's features: refused, the file named.
    other = save_model("prompt_cam", tmp_path / "other.pt", manifest=manifest, seed=1)
    with pytest.raises(ValueError, match="linear_probe.pt was fitted on another model than .*other.pt"):
        run_faithfulness(other, manifest, root, tmp_path / "m2.parquet", tmp_path / "f2.parquet",
                         probe=probe_path, **settings)
    (tmp_path / "junk.pt").write_bytes(b"not a probe")
    with pytest.raises(CheckpointError, match="junk.pt is truncated or not a checkpoint"):
        run_faithfulness(model_path, manifest, root, tmp_path / "m3.parquet", tmp_path / "f3.parquet",
                         probe=tmp_path / "junk.pt", **settings)
