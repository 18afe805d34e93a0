"""The models package: one interface both methods satisfy, one factory, one checkpoint loader."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from intr.models import (METHODS, BlurContext, CheckpointError, InterpretableModel, build_model, check_classes,
                         read_checkpoint)
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


@pytest.mark.parametrize("method", METHODS)
def test_one_trunk_pass_gives_what_each_method_computes_from_the_images(method: str) -> None:
    """Extraction runs ``trunk_of`` once per batch; logits, maps, blur contexts (of a selection of its
    images, repeats included, as the head ranking's rows are) and patch features read it, bit for bit."""
    model = tiny(method)
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    classes = torch.tensor([[0, 3], [4, 1], [2, 2]])
    pick = torch.tensor([0, 0, 1, 2, 2])
    with torch.no_grad():
        trunk = model.trunk_of(images)
        assert torch.equal(model.logits_of(trunk), model(images))
        shared_maps = model.forward_with_maps(None, classes, trunk=trunk)
        for got, want in zip(shared_maps, model.forward_with_maps(images, classes)):
            assert torch.equal(got, want)
        shared = model.blur_context(None, classes[pick, 0], trunk=trunk.select(pick))
        alone = model.blur_context(images[pick], classes[pick, 0])
        for name in ("normal", "blurred", "logits"):
            assert torch.equal(getattr(shared, name), getattr(alone, name)), name
        candidates = alone.normal.unsqueeze(1)
        assert torch.equal(shared.finish(candidates), alone.finish(candidates))
        assert torch.equal(model.patch_features(images, trunk=trunk), model.patch_features(images))
    ranked = rank_heads_by_blurring(model, None, classes[pick, 0], trunk=trunk.select(pick))
    assert torch.equal(ranked.rank, rank_heads_by_blurring(model, images[pick], classes[pick, 0]).rank)


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
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors: argparse.Namespace"):
        read_checkpoint(tmp_path / "dino.pth")
    assert read_checkpoint(tmp_path / "dino.pth", trusted_classes=[argparse.Namespace])["args"].arch == "vit_small"
    with pytest.raises(CheckpointError, match="argparse.Namespace"):
        read_checkpoint(tmp_path / "dino.pth")  # the trust does not outlive the call


class MakesAFolder:
    """Unpickling this would run ``os.mkdir(target)``: a visible, harmless stand-in for hostile code."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


def test_pickled_code_is_refused_without_suggesting_unsafe_loading(tmp_path: Path) -> None:
    ran = tmp_path / "code_ran"
    torch.save({"state": {"w": torch.ones(1)}, "payload": MakesAFolder(ran)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as refused:
        read_checkpoint(tmp_path / "model.pt")
    message = str(refused.value)
    assert message == (f"{tmp_path / 'model.pt'} is not a checkpoint this tool wrote (it holds Python objects "
                       "other than tensors: posix.mkdir); refusing to load it")
    assert "weights_only" not in message and not ran.exists()
    assert refused.value.__cause__ is None and refused.value.__suppress_context__  # torch's advice is not chained


def test_empty_and_truncated_checkpoints_name_the_file_and_the_cause(tmp_path: Path) -> None:
    torch.save({"state": {f"w{i}": torch.randn(500) for i in range(8)}}, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "half.pt").write_bytes(data[:len(data) // 2])  # torch itself fails with "[Errno 22] Invalid argument"
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"^\S*empty\.pt is empty \(0 bytes\)"):
        read_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError) as half:
        read_checkpoint(tmp_path / "half.pt")
    assert str(half.value).startswith(f"{tmp_path / 'half.pt'} is truncated ({len(data) // 2} bytes; its zip archive "
                                      "has no end: the write did not finish)")
    with pytest.raises(CheckpointError, match=r"notes\.pt is truncated or not a checkpoint \(16 bytes, not a zip"):
        read_checkpoint(tmp_path / "notes.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_checkpoint(tmp_path / "missing.pt")


# --------------------------------------------------------------------------- the classes a model was trained on


def write_manifest(path: Path, names: list[str]) -> Path:
    """A manifest with two images per class, classes in the given class_id order."""
    rows = [{"image_id": 2 * c + i, "path": f"{name}/{i}.png", "class_id": c, "class_name": name, "split": "train"}
            for c, name in enumerate(names) for i in range(2)]
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def model_checkpoint(names: list[str] | None, num_classes: int) -> dict:
    """What model.pt holds (names None: a checkpoint from before class names were stored)."""
    saved = {"config": json.dumps({"num_classes": num_classes}), "state": {}}
    if names is not None:
        saved |= {"class_names": names, "class_fingerprint": hashlib.sha256(json.dumps(names).encode()).hexdigest()}
    return saved


FOUR = ["crow", "raven", "jay", "magpie"]
SIX = ["crow", "rook", "jay", "magpie", "jackdaw", "chough"]


def test_class_lists_that_differ_are_refused_with_sizes_and_first_difference(tmp_path: Path) -> None:
    four, six = write_manifest(tmp_path / "four.parquet", FOUR), write_manifest(tmp_path / "six.parquet", SIX)
    check_classes(model_checkpoint(FOUR, 4), "model.pt", four)  # the same list passes, silently
    with pytest.raises(CheckpointError) as model_of_four:
        check_classes(model_checkpoint(FOUR, 4), "model.pt", six)
    assert str(model_of_four.value) == (
        f"model.pt was trained on other classes than {six}: 4 classes in the model, 6 in the manifest; first "
        "difference at class_id 1: 'raven' in the model, 'rook' in the manifest. Use the manifest the model was "
        "trained on, or retrain on this one")
    with pytest.raises(CheckpointError, match="6 classes in the model, 4 in the manifest; first difference at "
                       "class_id 1: 'rook' in the model, 'raven' in the manifest"):
        check_classes(model_checkpoint(SIX, 6), "model.pt", four)
    # One list a prefix of the other: the first difference is the first class only one of them has.
    with pytest.raises(CheckpointError, match="class_id 4: 'jackdaw' in the model, none in the manifest"):
        check_classes(model_checkpoint(FOUR[:1] + SIX[1:], 6), "model.pt",
                      write_manifest(tmp_path / "short.parquet", SIX[:4]))


def test_checkpoint_without_class_names_is_refused_only_when_the_class_count_differs(tmp_path: Path) -> None:
    four, six = write_manifest(tmp_path / "four.parquet", FOUR), write_manifest(tmp_path / "six.parquet", SIX)
    with pytest.warns(UserWarning, match=f"old.pt holds no class names .*cannot check .* the 4 of {four}"):
        check_classes(model_checkpoint(None, 4), "old.pt", four)
    with pytest.raises(CheckpointError, match=f"old.pt was trained on 4 classes but {six} has 6"):
        check_classes(model_checkpoint(None, 4), "old.pt", six)


def test_every_checkpoint_in_the_code_is_read_through_the_one_loader() -> None:
    sources = [p for folder in ("intr", "benchmarks", "analysis", "scripts") for p in (REPO_ROOT / folder).rglob("*.py")]
    callers = sorted(str(p.relative_to(REPO_ROOT)) for p in sources if "torch.load(" in p.read_text())
    assert callers == ["intr/models/checkpoint.py"]


def test_cli_names_a_missing_model_file_in_one_line(tmp_path, capsys):
    from intr.cli import main

    code = main(["evaluate", "--model", str(tmp_path / "nowhere.pt"), "--manifest", str(tmp_path / "m.parquet"),
                 "--root", str(tmp_path), "--out", str(tmp_path / "out.parquet"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert err == f"intr evaluate: error: {tmp_path / 'nowhere.pt'}: no such file (check the path, or run the stage " \
                  "that writes it)"
