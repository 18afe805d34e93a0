"""The models package: one interface both methods satisfy, one factory, one checkpoint loader."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import pytest
import torch

from intr.models import METHODS, BlurContext, InterpretableModel, build_model, read_checkpoint
from intr.ranking import rank_heads_by_blurring

REPO_ROOT = Path(__file__).resolve().parent.parent
VIT = {"name": "vit_tiny_patch16_224",
       "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4}}
MODELS = {
    "prompt_cam": {"backbone": VIT},
    "intr": {"backbone": VIT, "transformer": {"d_model": 32, "heads": 4, "encoder_layers": 1,
                                              "decoder_layers": 1, "ffn": 64, "dropout": 0.1}},
}
CLASSES, BATCH, SIZE = 5, 2, 32


def tiny(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(method, MODELS[method], CLASSES, SIZE).eval()


@pytest.mark.parametrize("method", METHODS)
def test_both_methods_satisfy_the_interface_and_each_member_has_its_shape(method: str) -> None:
    model = tiny(method)
    assert isinstance(model, InterpretableModel)
    assert model.num_classes == CLASSES and model.num_heads == 4
    assert model.grid_size == (4, 4)  # 32 px / 8 px patches, before any forward pass
    assert model.patch_feature_dim == 48
    assert isinstance(model.backbone, torch.nn.Module)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([[0, 3], [4, 1]])
    with torch.no_grad():
        logits = model(images)
        map_logits, maps = model.forward_with_maps(images, classes)
        blurred_logits, blurred_maps = model.forward_with_maps(images, classes,
                                                              blur=torch.ones(BATCH, 2, 4, dtype=torch.bool))
        context = model.blur_context(images, classes[:, 0])
        probe = model.probe_features(images)
        patches = model.patch_features(images)
    assert logits.shape == map_logits.shape == (BATCH, CLASSES)
    torch.testing.assert_close(map_logits, logits, rtol=0, atol=1e-5)
    assert maps.shape == blurred_maps.shape == (BATCH, 2, 4, *model.grid_size)
    # Blurred heads attend uniformly: every cell of their maps gets the same weight.
    torch.testing.assert_close(blurred_maps, blurred_maps[..., :1, :1].expand_as(blurred_maps))
    assert maps.flatten(-2).std(-1).min() > 0
    assert not torch.allclose(blurred_logits, logits)
    assert isinstance(context, BlurContext)
    assert context.normal.shape == context.blurred.shape and context.normal.shape[:2] == (BATCH, 4)
    torch.testing.assert_close(context.logits, logits, rtol=0, atol=1e-5)
    # No head blurred: finish gives back the target's own logit.
    unblurred = context.finish(context.normal.unsqueeze(1))
    torch.testing.assert_close(unblurred.squeeze(1), logits.gather(1, classes[:, :1]).squeeze(1), rtol=0, atol=1e-5)
    assert probe.shape == (BATCH, 2 * 48)  # class token and mean patch token
    assert patches.shape == (BATCH, 16, model.patch_feature_dim)
    assert sorted(rank_heads_by_blurring(model, images, classes[:, 0]).rank[0].tolist()) == [1, 2, 3, 4]


def test_a_plain_module_does_not_satisfy_the_interface() -> None:
    assert not isinstance(torch.nn.Linear(4, 2), InterpretableModel)


def test_unknown_method_is_a_value_error_naming_the_methods() -> None:
    with pytest.raises(ValueError, match="prompt_cam"):
        build_model("protopnet", MODELS["prompt_cam"], CLASSES, SIZE)


@pytest.mark.parametrize("method", METHODS)
def test_image_size_the_vit_was_not_made_for_is_a_value_error_at_build(method: str) -> None:
    with pytest.raises(ValueError, match="img_size"):
        build_model(method, MODELS[method], CLASSES, 64)


def test_checkpoint_loader_reads_weights_and_refuses_pickled_code(tmp_path: Path) -> None:
    weights = {"w": torch.arange(3.0), "meta": {"epoch": 2}}
    torch.save(weights, tmp_path / "weights.pt")
    loaded = read_checkpoint(tmp_path / "weights.pt")
    assert torch.equal(loaded["w"], weights["w"]) and loaded["meta"] == {"epoch": 2}
    # DINO's release files pickle an argparse Namespace: refused unless trusted for that call.
    torch.save({"args": argparse.Namespace(arch="vit_small"), "w": torch.ones(1)}, tmp_path / "dino.pth")
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(tmp_path / "dino.pth")
    assert read_checkpoint(tmp_path / "dino.pth", trusted_classes=[argparse.Namespace])["args"].arch == "vit_small"
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(tmp_path / "dino.pth")  # the trust does not outlive the call


def test_every_checkpoint_in_the_code_is_read_through_the_one_loader() -> None:
    sources = [p for folder in ("intr", "benchmarks", "analysis", "scripts") for p in (REPO_ROOT / folder).rglob("*.py")]
    callers = sorted(str(p.relative_to(REPO_ROOT)) for p in sources if "torch.load(" in p.read_text())
    assert callers == ["intr/models/checkpoint.py"]
