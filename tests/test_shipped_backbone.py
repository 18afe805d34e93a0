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
