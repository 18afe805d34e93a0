"""Prompt-CAM: equal to a plain VPT-deep model, its maps, its frozen backbone, and backbone checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from intr.models.backbones import BackboneSpec, create_backbone
from intr.models.prompt_cam import PromptCAM

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4}
# A plain ViT; one with LayerScale, qk-norm, two register tokens and a class token
# (num_prefix_tokens 3, position embeddings on the patches only); one with registers
# but no class token.
VARIANTS = {
    "plain": {},
    "registers": {"reg_tokens": 2, "init_values": 0.1, "qk_norm": True, "no_embed_class": True},
    "registers_no_class_token": {"reg_tokens": 2, "class_token": False, "global_pool": "avg"},
}




def tiny_prompt_cam(seed: int, num_classes: int = 5, **kwargs) -> PromptCAM:
    """A random Prompt-CAM on a tiny ViT, with non-trivial biases and norms."""
    torch.manual_seed(seed)
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=0, **(TINY | kwargs))
    with torch.no_grad():
        # timm initialises biases to 0 and norms to 1; make every weight matter.
        for p in backbone.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = PromptCAM(backbone, num_classes)
    with torch.no_grad():
        model.class_prompts.mul_(20.0)
    return model.eval()


def reference_vpt_deep(model: PromptCAM, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain VPT-deep forward, written out: logits (B, C) and the last block's
    attention weights (B, heads, N, N) computed with an explicit softmax."""
    bb = model.backbone
    P, C = bb.num_prefix_tokens, model.num_classes
    x = bb.norm_pre(bb._pos_embed(bb.patch_embed(images)))
    last = len(bb.blocks) - 1
    for i, block in enumerate(bb.blocks):
        prompts = model.class_prompts[i].expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :P], prompts, x[:, P:]], dim=1)
        if i == last:
            attn = block.attn
            B, N, D = x.shape
            qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = block(x)
        if i < last:
            x = torch.cat([x[:, :P], x[:, P + C:]], dim=1)
    logits = model.presence_head(bb.norm(x[:, P:P + C])).squeeze(-1)
    return logits, weights


def random_images(seed: int, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_logits_equal_plain_vpt_deep_reference(variant: str, seed: int) -> None:
    model = tiny_prompt_cam(seed, **VARIANTS[variant])
    assert model.num_prefix == {"plain": 1, "registers": 3, "registers_no_class_token": 2}[variant]
    images = random_images(seed)
    with torch.no_grad():
        expected, _ = reference_vpt_deep(model, images)
        logits = model(images)
    assert logits.shape == (3, 5)
    assert expected.std() > 0.1  # the classes' logits differ, so the comparison means something
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_maps_are_last_block_softmax_of_prompt_rows_over_patches(variant: str) -> None:
    model = tiny_prompt_cam(2, **VARIANTS[variant])
    images = random_images(2)
    classes = torch.tensor([[0, 4], [3, 3], [2, 1]])
    with torch.no_grad():
        expected_logits, weights = reference_vpt_deep(model, images)
        logits, maps = model.forward_with_maps(images, classes)
        plain = model(images)
    P, C, H = model.num_prefix, model.num_classes, model.num_heads
    assert maps.shape == (3, 2, H, 4, 4)
    for b in range(3):
        for r in range(2):
            row = weights[b, :, P + classes[b, r], P + C:]  # (heads, patches)
            torch.testing.assert_close(maps[b, r], row.reshape(H, 4, 4), rtol=0, atol=1e-6)
    # The prompts also attend to the prefix and to each other: the patch share is below 1.
    assert (maps.sum(dim=(-2, -1)) < 1).all()
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)


def test_blurred_head_attends_uniformly_and_changes_only_its_class_logit() -> None:
    model = tiny_prompt_cam(3)
    images = random_images(3, batch=2)
    classes = torch.tensor([[1], [4]])
    blur = torch.zeros(2, 1, model.num_heads, dtype=torch.bool)
    blur[:, 0, 2] = True
    with torch.no_grad():
        plain = model(images)
        logits, maps = model.forward_with_maps(images, classes, blur=blur)
    tokens = model.num_prefix + model.num_classes + 16
    torch.testing.assert_close(maps[:, 0, 2], torch.full((2, 4, 4), 1.0 / tokens), rtol=0, atol=1e-7)
    assert not torch.allclose(maps[:, 0, 1], torch.full((2, 4, 4), 1.0 / tokens))
    changed = (logits - plain).abs() > 1e-6
    assert changed.tolist() == [[c == t for c in range(5)] for t in (1, 4)]


def test_only_prompts_and_presence_head_train_and_backbone_stays_in_eval() -> None:
    model = tiny_prompt_cam(0)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["class_prompts", "presence_head.bias", "presence_head.weight"]
    model.train()
    assert model.training
    assert not any(m.training for m in model.backbone.modules())
    loss = model(random_images(0)).logsumexp(dim=1).sum()
    loss.backward()
    assert model.class_prompts.grad is not None and model.class_prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


@pytest.mark.parametrize("backbone", [
    lambda: timm.create_model("resnet18", num_classes=0),
    lambda: nn.Linear(4, 4),
])
def test_non_vit_backbone_is_a_type_error(backbone) -> None:
    with pytest.raises(TypeError, match="VisionTransformer"):
        PromptCAM(backbone(), 3)


# --------------------------------------------------------------------------- checkpoints


def release_weights(name: str, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    """Random weights with the key names of timm's (and the DINO releases') ViT."""
    torch.manual_seed(seed)
    source = timm.create_model(name, num_classes=0, **kwargs)
    return {k: v + torch.randn_like(v) for k, v in source.state_dict().items()}


def dino_training_checkpoint(weights: dict[str, torch.Tensor]) -> dict:
    """How DINO's training script saves: teacher and student (DDP-wrapped), each with a projection head."""
    head = {"head.mlp.0.weight": torch.randn(64, 48), "head.mlp.0.bias": torch.randn(64),
            "head.last_layer.weight_g": torch.randn(100, 1), "head.last_layer.weight_v": torch.randn(100, 64)}
    teacher = {f"backbone.{k}": v for k, v in weights.items()} | head
    student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in weights.items()}
    return {"student": student, "teacher": teacher, "epoch": 100}


@pytest.mark.parametrize("wrapping", ["release", "training_teacher", "module_prefix"])
def test_dino_checkpoint_weights_land_in_the_backbone(tmp_path: Path, wrapping: str) -> None:
    weights = release_weights("vit_small_patch16_224", seed=7, **TINY)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight",
            "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias", "norm.weight"} <= set(weights)
    saved = {"release": weights, "training_teacher": dino_training_checkpoint(weights),
             "module_prefix": {f"module.{k}": v for k, v in weights.items()}}[wrapping]
    path = tmp_path / "dino_vits8.pth"
    torch.save(saved, path)
    model = create_backbone(BackboneSpec(name="vit_small_patch16_224", checkpoint=str(path), kwargs=TINY))
    state = model.state_dict()
    assert set(state) == set(weights)
    for key, value in weights.items():
        assert torch.equal(state[key], value), key


def test_dinov2_release_drops_mask_token_and_resamples_positions(tmp_path: Path) -> None:
    kwargs = TINY | {"init_values": 1e-5}
    weights = release_weights("vit_small_patch14_dinov2", seed=8, **kwargs)
    grid6 = torch.randn(1, 1 + 36, 48)  # the release's grid is larger than the model's 4x4
    release = weights | {"pos_embed": grid6, "mask_token": torch.randn(1, 48)}
    assert "blocks.0.ls1.gamma" in release
    path = tmp_path / "dinov2_vits8_pretrain.pth"
    torch.save(release, path)
    model = create_backbone(BackboneSpec(name="vit_small_patch14_dinov2", checkpoint=str(path), kwargs=kwargs))
    state = model.state_dict()
    assert "mask_token" not in state
    assert state["pos_embed"].shape == (1, 1 + 16, 48)
    assert torch.equal(state["pos_embed"][:, :1], grid6[:, :1])  # the class token's position is kept
    resampled = resample_abs_pos_embed(grid6, new_size=(4, 4), old_size=(6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(state["pos_embed"], resampled)
    for key in ("blocks.0.ls1.gamma", "blocks.1.ls2.gamma", "blocks.1.attn.qkv.weight", "cls_token", "norm.bias"):
        assert torch.equal(state[key], weights[key]), key


def test_dinov2_register_release_maps_register_tokens(tmp_path: Path) -> None:
    kwargs = TINY | {"init_values": 1e-5, "reg_tokens": 4, "no_embed_class": True}
    weights = release_weights("vit_small_patch14_dinov2", seed=9, **TINY, init_values=1e-5)
    registers = torch.randn(1, 4, 48)
    release = weights | {"register_tokens": registers, "mask_token": torch.randn(1, 48)}
    path = tmp_path / "dinov2_vits8_reg4_pretrain.pth"
    torch.save(release, path)
    model = create_backbone(BackboneSpec(name="vit_small_patch14_dinov2", checkpoint=str(path), kwargs=kwargs))
    state = model.state_dict()
    assert torch.equal(state["reg_token"], registers)
    # DINOv2 adds the class token's position embedding to it; timm's register model keeps them apart.
    torch.testing.assert_close(state["cls_token"], weights["cls_token"] + weights["pos_embed"][:, :1])
    assert torch.equal(state["pos_embed"], weights["pos_embed"][:, 1:])


@pytest.mark.parametrize("mismatch", ["missing_block", "wrong_width"])
def test_checkpoint_that_does_not_fit_is_a_value_error_naming_the_file(tmp_path: Path, mismatch: str) -> None:
    if mismatch == "missing_block":
        weights = release_weights("vit_small_patch16_224", seed=1, **(TINY | {"depth": 1}))
    else:
        weights = release_weights("vit_small_patch16_224", seed=1, **(TINY | {"embed_dim": 64}))
    path = tmp_path / f"{mismatch}.pth"
    torch.save(weights, path)
    with pytest.raises(ValueError, match=f"{mismatch}.pth"):
        create_backbone(BackboneSpec(name="vit_small_patch16_224", checkpoint=str(path), kwargs=TINY))
