"""The papers' released checkpoints: state dicts with the original key names and shapes, built here
in memory and saved as the papers' code saves them, convert into models whose logits equal those of
the model built directly from the same tensors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import timm
import torch
from torch import nn

from intr.cli import main
from intr.models import CheckpointError, load_model
from intr.models.intr import build_intr
from intr.models.prompt_cam import PromptCAM, build_prompt_cam
from intr.models.published import convert_published, load_published

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4}
PROMPT_CAM_MODEL = {"backbone": {"name": "vit_tiny_patch16_224", "kwargs": TINY_VIT}}
TRANSFORMER = {"d_model": 32, "heads": 4, "encoder_layers": 1, "decoder_layers": 2, "ffn": 64, "dropout": 0.1}
INTR_MODEL = {"backbone": {"name": "resnet18"}, "transformer": TRANSFORMER}


def write_manifest(path: Path, num_classes: int) -> Path:
    """A manifest with one image per class, named in CUB's classes.txt style."""
    rows = [{"image_id": c, "path": f"{c}.png", "class_id": c, "class_name": f"species_{c:03d}", "split": "test"}
            for c in range(num_classes)]
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def images(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- Prompt-CAM


def released_prompt_cam(num_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """What Prompt-CAM's ``model.state_dict()`` holds: timm's ViT keys, ``vpt.prompt_embeddings``
    (blocks, classes, D) and the shared ``head`` Linear(D, 1)."""
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT)
    state = {k: v + torch.randn_like(v) * 0.05 for k, v in vit.state_dict().items()}
    depth, dim = TINY_VIT["depth"], TINY_VIT["embed_dim"]
    state |= {"vpt.prompt_embeddings": torch.randn(depth, num_classes, dim),
              "head.weight": torch.randn(1, dim), "head.bias": torch.randn(1)}
    return state


def prompt_cam_from_tensors(state: dict[str, torch.Tensor], num_classes: int) -> PromptCAM:
    """The same model assembled by hand: the backbone loads timm's keys, prompts and head are copied."""
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT)
    vit.load_state_dict({k: v for k, v in state.items() if not k.startswith(("vpt.", "head."))})
    model = PromptCAM(vit, num_classes)
    with torch.no_grad():
        model.class_prompts.copy_(state["vpt.prompt_embeddings"])
        model.presence_head.weight.copy_(state["head.weight"])
        model.presence_head.bias.copy_(state["head.bias"])
    return model.eval()


def save_prompt_cam(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save({"model_state_dict": state}, path)  # as Prompt-CAM's trainer saves model.pt
    return path


def test_released_prompt_cam_state_has_the_original_names() -> None:
    state = released_prompt_cam(5)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "norm.bias",
            "vpt.prompt_embeddings", "head.weight", "head.bias"} <= set(state)
    assert state["vpt.prompt_embeddings"].shape == (2, 5, 48)


def test_converted_prompt_cam_logits_and_maps_equal_the_model_built_from_the_same_tensors(tmp_path) -> None:
    state = released_prompt_cam(5)
    path = save_prompt_cam(tmp_path / "prompt_cam_cub.pt", state)
    converted = build_prompt_cam(PROMPT_CAM_MODEL, 5, 32)
    load_published(converted, "prompt_cam", path)
    direct = prompt_cam_from_tensors(state, 5)
    x, rows = images(32), torch.tensor([[0, 4], [2, 1], [3, 3]])
    with torch.no_grad():
        logits, maps = converted.eval().forward_with_maps(x, rows)
        expected_logits, expected_maps = direct.forward_with_maps(x, rows)
        assert torch.allclose(converted(x), direct(x), rtol=0, atol=1e-6)
    assert torch.allclose(logits, expected_logits, rtol=0, atol=1e-6)
    assert torch.allclose(maps, expected_maps, rtol=0, atol=1e-7)


def test_intr_train_converts_a_released_prompt_cam_into_model_pt_that_loads_whole(tmp_path) -> None:
    state = released_prompt_cam(4, seed=1)
    path = save_prompt_cam(tmp_path / "released.pt", state)
    manifest = write_manifest(tmp_path / "manifest.parquet", 4)
    # Its backbone weights file does not exist: the converted model.pt must not need it.
    section = {"image_size": 32, "pretrained_model": str(path),
               "model": {"backbone": PROMPT_CAM_MODEL["backbone"] | {"checkpoint": "/nowhere/dino.pth"}}}
    out = tmp_path / "prompt_cam"
    code = main(["train", "--method", "prompt_cam", "--config-json", json.dumps({"prompt_cam": section}),
                 "--manifest", str(manifest), "--root", str(tmp_path), "--out", str(out), "--quiet"])
    assert code == 0
    model, config = load_model(out / "model.pt", manifest=manifest)
    with torch.no_grad():
        assert torch.allclose(model(images(32, 1)), prompt_cam_from_tensors(state, 4)(images(32, 1)),
                              rtol=0, atol=1e-6)
    # The paper's code normalises with timm's Inception constants, not DINO's ImageNet ones.
    assert config["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert config["published"]["path"] == str(path)
    log = pq.read_table(out / "train_log.parquet")
    assert log.num_rows == 0 and log.column_names[0] == "epoch"
    assert json.loads(log.schema.metadata[b"converted_from"])["path"] == str(path)


def test_a_released_model_of_another_class_count_is_refused_naming_both_counts(tmp_path) -> None:
    path = save_prompt_cam(tmp_path / "cub200.pt", released_prompt_cam(5))
    manifest = write_manifest(tmp_path / "manifest.parquet", 3)
    with pytest.raises(CheckpointError, match=r"cub200.pt has 5 class prompts but the manifest .*manifest.parquet "
                                              r"has 3 classes"):
        convert_published("prompt_cam", PROMPT_CAM_MODEL, path, manifest, tmp_path / "out", 32)
    assert not (tmp_path / "out" / "model.pt").exists()


@pytest.mark.parametrize("damage, message", [
    ("missing", r"missing \['blocks.1.norm2.weight'\]"),
    ("shape", r"wrong shapes \['vpt.prompt_embeddings \(1, 5, 48\) \(model: \(2, 5, 48\)\)'\]"),
    ("unexpected", r"unexpected \['blocks.2.norm1.weight'\]"),
])
def test_a_released_prompt_cam_that_does_not_fit_is_an_error_naming_file_and_keys(tmp_path, damage, message) -> None:
    state = released_prompt_cam(5)
    if damage == "missing":
        del state["blocks.1.norm2.weight"]
    elif damage == "shape":  # prompts in the last block only (VPT's vpt_layer 1)
        state["vpt.prompt_embeddings"] = state["vpt.prompt_embeddings"][-1:]
    else:
        state["blocks.2.norm1.weight"] = torch.ones(48)
    path = save_prompt_cam(tmp_path / f"{damage}.pt", state)
    with pytest.raises(CheckpointError, match=rf"{damage}.pt does not fit this prompt_cam model.*{message}"):
        load_published(build_prompt_cam(PROMPT_CAM_MODEL, 5, 32), "prompt_cam", path)


def test_a_file_without_the_release_wrapper_is_refused(tmp_path) -> None:
    torch.save(released_prompt_cam(5), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="bare.pt is not a published prompt_cam checkpoint: it has no "
                                              "'model_state_dict'"):
        load_published(build_prompt_cam(PROMPT_CAM_MODEL, 5, 32), "prompt_cam", tmp_path / "bare.pt")


# --------------------------------------------------------------------------- INTR


def detr_transformer(cfg: dict) -> nn.Module:
    """DETR's transformer as torch layers under DETR's module names (no code of this project)."""
    d, heads, ffn = cfg["d_model"], cfg["heads"], cfg["ffn"]

    def layer(decoder: bool) -> nn.Module:
        m = nn.Module()
        m.self_attn = nn.MultiheadAttention(d, heads)
        if decoder:
            m.multihead_attn = nn.MultiheadAttention(d, heads)
        m.linear1, m.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        for i in range(1, 4 if decoder else 3):
            setattr(m, f"norm{i}", nn.LayerNorm(d))
        return m

    t = nn.Module()
    t.encoder, t.decoder = nn.Module(), nn.Module()
    t.encoder.layers = nn.ModuleList(layer(False) for _ in range(cfg["encoder_layers"]))
    t.decoder.layers = nn.ModuleList(layer(True) for _ in range(cfg["decoder_layers"]))
    t.decoder.norm = nn.LayerNorm(d)
    return t


def released_intr(num_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """What INTR's ``model.state_dict()`` holds: DETR's names, a ResNet-18 body (frozen batch norm:
    no batch counters), one query per class and the presence vector."""
    torch.manual_seed(seed)
    body = timm.create_model("resnet18", features_only=True, out_indices=(-1,))
    # Running variances must stay positive; every other tensor is random.
    state = {"backbone.0.body." + k: torch.rand_like(v) + 0.5 if k.endswith("running_var")
             else torch.randn_like(v) * 0.1
             for k, v in body.state_dict().items() if not k.endswith("num_batches_tracked")}
    transformer = detr_transformer(TRANSFORMER).state_dict()
    state |= {"transformer." + k: torch.randn_like(v) * 0.2 for k, v in transformer.items()}
    d = TRANSFORMER["d_model"]
    state |= {"input_proj.weight": torch.randn(d, 512, 1, 1) * 0.05, "input_proj.bias": torch.randn(d),
              "query_embed.weight": torch.randn(num_classes, d),
              "presence_vector.weight": torch.randn(1, d), "presence_vector.bias": torch.randn(1)}
    return state


def intr_from_tensors(state: dict[str, torch.Tensor], num_classes: int) -> nn.Module:
    """The same INTR assembled module by module from the tensors."""
    model = build_intr(INTR_MODEL, num_classes, image_size=64)
    part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    model.backbone.body.load_state_dict(part("backbone.0.body."))
    model.transformer.load_state_dict(part("transformer."))
    model.input_proj.load_state_dict(part("input_proj."))
    model.query_embed.load_state_dict(part("query_embed."))
    model.presence_head.load_state_dict(part("presence_vector."))
    return model.eval()


def save_intr(path: Path, state: dict[str, torch.Tensor]) -> Path:
    # As INTR's main.py saves a checkpoint: the model with the optimiser state and the argparse Namespace.
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 139,
                "args": argparse.Namespace(dataset_name="cub", num_queries=len(state["query_embed.weight"]))}, path)
    return path


def test_converted_intr_loads_queries_and_presence_vector_and_its_logits_equal_the_direct_model(tmp_path) -> None:
    state = released_intr(5)
    path = save_intr(tmp_path / "intr_checkpoint_cub_detr_r18.pth", state)
    converted = build_intr(INTR_MODEL, 5, image_size=64)
    load_published(converted, "intr", path)
    assert torch.equal(converted.query_embed.weight, state["query_embed.weight"])
    assert torch.equal(converted.presence_head.bias, state["presence_vector.bias"])
    direct = intr_from_tensors(state, 5)
    x, rows = images(64), torch.tensor([[0, 4], [2, 1], [3, 3]])
    with torch.no_grad():
        assert torch.allclose(converted.eval()(x), direct(x), rtol=0, atol=1e-6)
        _, maps = converted.forward_with_maps(x, rows)
        _, expected_maps = direct.forward_with_maps(x, rows)
    assert torch.allclose(maps, expected_maps, rtol=0, atol=1e-7)


def test_converted_intr_model_pt_loads_whole_through_load_model(tmp_path) -> None:
    state = released_intr(4, seed=2)
    path = save_intr(tmp_path / "released.pth", state)
    manifest = write_manifest(tmp_path / "manifest.parquet", 4)
    detr = INTR_MODEL | {"detr_checkpoint": "/nowhere/detr-r50.pth"}  # not read: every weight is in the release
    convert_published("intr", detr, path, manifest, tmp_path / "intr", 64)
    model, config = load_model(tmp_path / "intr" / "model.pt", manifest=manifest)
    with torch.no_grad():
        assert torch.allclose(model(images(64, 2)), intr_from_tensors(state, 4)(images(64, 2)), rtol=0, atol=1e-6)
    assert config["model"]["detr_checkpoint"] is None
    assert config["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_released_intr_of_another_class_count_or_without_presence_vector_is_refused(tmp_path) -> None:
    path = save_intr(tmp_path / "cub.pth", released_intr(5))
    with pytest.raises(CheckpointError, match=r"cub.pth has 5 class queries but the intr model has 3 classes"):
        load_published(build_intr(INTR_MODEL, 3, image_size=64), "intr", path)
    state = released_intr(5)
    del state["presence_vector.bias"]
    path = save_intr(tmp_path / "no_presence.pth", state)
    with pytest.raises(CheckpointError, match=r"no_presence.pth does not fit.*missing \['presence_vector.bias'\]"):
        load_published(build_intr(INTR_MODEL, 5, image_size=64), "intr", path)
