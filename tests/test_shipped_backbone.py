"""The backbone the embedded default ships: recorded hash, recipe architecture, disjoint pretraining."""

from __future__ import annotations

import torch
import yaml

from intr.models.backbones import PACKAGE_DIR, BackboneSpec, create_backbone, sha256_of
from intr.pretrain import DEFAULT_RECIPE


def _recipe() -> dict:
    return yaml.safe_load(DEFAULT_RECIPE.read_text())


def test_shipped_weights_match_their_recorded_hash():
    recipe = _recipe()
    path = PACKAGE_DIR / recipe["weights"]["file"]
    assert path.exists(), f"shipped backbone missing: {path}"
    assert sha256_of(path) == recipe["weights"]["sha256"]
    assert path.stat().st_size < 8 * 2**20  # a few MB


def test_shipped_weights_load_into_the_recipe_architecture():
    recipe = _recipe()
    spec = BackboneSpec.from_dict({**recipe["backbone"], "checkpoint": recipe["weights"]["file"]})
    model = create_backbone(spec).eval()
    # Read with torch itself, not the project's loader: an independent check of what landed.
    state = torch.load(PACKAGE_DIR / recipe["weights"]["file"], map_location="cpu", weights_only=True)
    assert torch.equal(model.state_dict()["blocks.5.attn.qkv.weight"], state["blocks.5.attn.qkv.weight"])
    assert model.embed_dim == 96 and len(model.blocks) == 6 and model.patch_embed.patch_size == (8, 8)
    with torch.no_grad():
        features = model.forward_features(torch.zeros(2, 3, 64, 64))
    assert features.shape == (2, 1 + 64, 96) and torch.isfinite(features).all()


def test_default_config_points_at_the_shipped_weights():
    from pathlib import Path

    config = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
    recipe = _recipe()
    for method in ("prompt_cam", "intr"):
        backbone = config[method]["model"]["backbone"]
        assert backbone["checkpoint"] == recipe["weights"]["file"]
        assert backbone["kwargs"] == recipe["backbone"]["kwargs"]


def test_pretraining_recipe_never_renders_a_target_species():
    from intr.data.synthetic import PARTS, SyntheticConfig, build_taxonomy

    recipe = _recipe()
    pretrain = build_taxonomy(SyntheticConfig.from_dict(recipe["data"]))
    target = build_taxonomy(SyntheticConfig(seed=recipe["data"]["seed"]))
    key = lambda s: (s.genus.bill_length, s.genus.tail_shape, tuple(s.states[p] for p in PARTS))  # noqa: E731
    assert len(pretrain) >= 90
    assert not {key(s) for s in pretrain} & {key(s) for s in target}


def test_pretrain_writes_weights_that_load_into_the_recipe_architecture(tmp_path):
    from intr.data.prepare import prepare_dataset
    from intr.data.synthetic import SyntheticConfig, synthesize
    from intr.pretrain import pretrain

    root, tables = tmp_path / "data", tmp_path / "tables"
    synthesize(SyntheticConfig.from_dict({"set": "pretrain", "genera": 2, "species_per_genus": 2,
                                          "images_per_species": 10, "train_fraction": 0.8}), root, progress=False)
    prepare_dataset("synthetic", root, tables, progress=False)
    recipe = _recipe()
    recipe["train"] = dict(recipe["train"], epochs=2, batch_size=8, warmup_epochs=1)
    result = pretrain(tables / "manifest.parquet", root, tmp_path / "backbone.pt", recipe,
                      log_path=tmp_path / "pretrain_log.parquet", progress=False)
    assert 0.0 <= result["test_acc"] <= 1.0
    spec = BackboneSpec.from_dict({**recipe["backbone"], "checkpoint": str(tmp_path / "backbone.pt")})
    model = create_backbone(spec)
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)  # torch itself: an independent read
    assert "head.weight" not in state  # the classifier over the pretraining species is dropped
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    import pandas as pd

    assert pd.read_parquet(tmp_path / "pretrain_log.parquet")["epoch"].tolist() == [1, 2]
