"""The papers' training recipes: Prompt-CAM's prompt dropout and drop-path, INTR's layer2-4
training with frozen batch norm and DETR's Xavier init, the schedules, and config/cub.yaml."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from analysis.config import validated
from intr.models.intr import build_intr
from intr.models.prompt_cam import build_prompt_cam
from intr.train import TrainOptions, _optimizer, lr_for_step

REPO = Path(__file__).resolve().parent.parent
VIT = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                                                  "num_heads": 2, "drop_path_rate": 0.5}}
TRANSFORMER = {"d_model": 32, "heads": 4, "encoder_layers": 1, "decoder_layers": 1, "ffn": 64, "dropout": 0.1}


def prompt_cam(**options):
    torch.manual_seed(0)
    return build_prompt_cam({"backbone": VIT, **options}, num_classes=3, image_size=32)


def images(b: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_prompt_dropout_zeroes_prompt_features_in_train_mode_only() -> None:
    model = prompt_cam(prompt_dropout=0.5)
    prompts = torch.zeros(2, 0, 32)
    model.train()
    dropped = model._with_prompts(prompts, depth=0)
    fraction_zero = (dropped == 0).float().mean().item()
    assert 0.35 < fraction_zero < 0.65  # 96 features, rate 0.5
    kept = dropped != 0
    assert torch.allclose(dropped[kept], (model.class_prompts[0].expand(2, -1, -1) * 2)[kept])
    assert torch.equal(dropped[0], dropped[1])  # one mask per block, shared by the batch (the official VPT)
    model.eval()
    assert torch.equal(model._with_prompts(prompts, depth=0)[0], model.class_prompts[0])


def test_backbone_drop_path_is_active_in_train_mode_and_backbone_stays_frozen() -> None:
    model = prompt_cam(backbone_train_mode=True)
    x = images()
    model.train()
    assert model.backbone.training and model.backbone.blocks[-1].drop_path1.training
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    second = model(x)
    assert not torch.allclose(first, second)  # stochastic depth draws differ
    F.cross_entropy(first, torch.tensor([0, 1, 2, 0])).backward()
    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())
    assert model.class_prompts.grad is not None and model.class_prompts.grad.abs().sum() > 0
    model.eval()
    assert not model.backbone.training
    assert torch.equal(model(x), model(x))


def test_by_default_the_backbone_stays_in_eval_mode_and_training_is_deterministic() -> None:
    model = prompt_cam().train()
    assert not model.backbone.training
    x = images()
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    assert torch.equal(first, model(x))
    assert torch.equal(first, model.eval()(x))


RESNET = {"name": "resnet18", "kwargs": {}}
PAPER_INTR = {"backbone": RESNET, "transformer": TRANSFORMER, "train_backbone_layers": ["layer2", "layer3", "layer4"],
              "xavier_init": True}


def test_intr_trains_only_layers_2_to_4_at_backbone_lr_with_frozen_batch_norm() -> None:
    torch.manual_seed(0)
    model = build_intr(PAPER_INTR, num_classes=3, image_size=64)
    trains = {n: p.requires_grad for n, p in model.backbone.body.named_parameters()}
    assert trains and all(v == n.startswith(("layer2.", "layer3.", "layer4.")) for n, v in trains.items())
    assert any(trains.values()) and not all(trains.values())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone."))

    opts = TrainOptions(optimizer="adamw", lr=5e-5, backbone_lr=1e-5)
    optimizer = _optimizer(model, opts)
    backbone_group = [g for g in optimizer.param_groups if g["base_lr"] == 1e-5]
    assert len(backbone_group) == 1
    expected = {id(p) for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad}
    assert {id(p) for p in backbone_group[0]["params"]} == expected

    stats = {n: b.clone() for n, b in model.backbone.named_buffers()}
    assert any("running_mean" in n for n in stats)
    frozen = {n: p.detach().clone() for n, p in model.backbone.body.named_parameters() if not p.requires_grad}
    layer4 = model.backbone.body.layer4[0].downsample[0].weight.detach().clone()
    model.train()
    F.cross_entropy(model(images(2, 64)), torch.tensor([0, 2])).backward()
    optimizer.step()
    assert all(torch.equal(b, stats[n]) for n, b in model.backbone.named_buffers())
    assert all(torch.equal(p, frozen[n]) for n, p in model.backbone.body.named_parameters() if n in frozen)
    assert not torch.equal(model.backbone.body.layer4[0].downsample[0].weight, layer4)  # layer4 trains (timm zero-inits each block's last BN, so the shortcut gets the gradient)


def test_unknown_backbone_layer_is_a_value_error_naming_the_layers() -> None:
    with pytest.raises(ValueError, match="layer5.*layer4"):
        build_intr({**PAPER_INTR, "train_backbone_layers": ["layer5"]}, num_classes=3, image_size=64)


def xavier_bound(p: torch.Tensor) -> float:
    fan_out, fan_in = p.shape[0], p.shape[1] * p[0][0].numel()
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_xavier_init_covers_every_transformer_matrix() -> None:
    torch.manual_seed(0)
    model = build_intr({"backbone": VIT, "transformer": TRANSFORMER, "xavier_init": True}, 3, image_size=32)
    matrices = {n: p for n, p in model.transformer.named_parameters() if p.dim() > 1}
    assert any("linear1" in n for n in matrices) and any("out_proj" in n for n in matrices)
    for name, p in matrices.items():
        bound = xavier_bound(p)
        assert p.abs().max() <= bound, name
        # uniform on [-bound, bound]: std bound / sqrt(3)
        assert abs(p.std().item() - bound / math.sqrt(3)) < 0.15 * bound / math.sqrt(3), name
    torch.manual_seed(0)
    plain = build_intr({"backbone": VIT, "transformer": TRANSFORMER}, 3, image_size=32)
    linear1 = plain.transformer.encoder.layers[0].linear1.weight  # nn.Linear's kaiming init: bound 1/sqrt(fan_in)
    assert linear1.abs().max() <= 1 / math.sqrt(32) < xavier_bound(linear1)


def test_schedules_follow_the_official_code() -> None:
    cosine = TrainOptions(epochs=130, warmup_epochs=20, lr=0.005, schedule="cosine_per_epoch", min_lr=1e-6)
    per_epoch = [lr_for_step(cosine, e * 10 + 3, 10, 0.005) for e in range(130)]
    assert per_epoch[0] == per_epoch[1] == 0.0 and per_epoch[2] == pytest.approx(0.005 / 20)
    assert per_epoch[21] == pytest.approx(1e-6 + 0.5 * (0.005 - 1e-6) * (1 + math.cos(math.pi * 20 / 130)))
    assert lr_for_step(cosine, 50 * 10, 10, 0.005) == lr_for_step(cosine, 50 * 10 + 9, 10, 0.005)
    step = TrainOptions(epochs=140, lr=5e-5, schedule="step", lr_drop_epochs=80, warmup_epochs=0)
    assert [lr_for_step(step, e * 7, 7, 1e-5) for e in (0, 79, 80, 139)] == \
        pytest.approx([1e-5, 1e-5, 1e-6, 1e-6])


def test_default_schedule_is_the_per_step_cosine_it_was() -> None:
    opts = TrainOptions(epochs=3, warmup_epochs=1, lr=0.1)
    lrs = [lr_for_step(opts, s, 4, 0.1) for s in range(12)]
    assert lrs[:4] == [0.1 * (s + 1) / 4 for s in range(4)]
    assert lrs[4:] == [0.1 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - 4) / 8))) for s in range(4, 12)]


def test_cub_config_validates_and_follows_both_papers() -> None:
    config = validated(yaml.safe_load((REPO / "config" / "cub.yaml").read_text()))
    pc, intr = config["prompt_cam"], config["intr"]
    assert (pc["model"]["prompt_dropout"], pc["model"]["backbone_train_mode"],
            pc["model"]["backbone"]["kwargs"]["drop_path_rate"]) == (0.1, True, 0.1)
    assert {k: pc["train"][k] for k in ("epochs", "batch_size", "lr", "warmup_epochs", "min_lr", "schedule")} == \
        {"epochs": 130, "batch_size": 16, "lr": 0.005, "warmup_epochs": 20, "min_lr": 1e-6,
         "schedule": "cosine_per_epoch"}
    assert intr["model"]["train_backbone_layers"] == ["layer2", "layer3", "layer4"] and intr["model"]["xavier_init"]
    assert {k: intr["train"][k] for k in ("epochs", "batch_size", "lr", "backbone_lr", "schedule", "lr_drop_epochs",
                                          "clip_grad")} == \
        {"epochs": 140, "batch_size": 48, "lr": 5e-5, "backbone_lr": 1e-5, "schedule": "step",
         "lr_drop_epochs": 80, "clip_grad": 0.1}


def test_backbone_normalization_replaces_timm_constants_in_the_trained_model(tmp_path):
    """A configured mean / std reaches ``normalization`` (what train stores and every stage reads)."""
    from intr.models.backbones import BackboneSpec, create_backbone, normalization

    options = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 24,
                                                          "depth": 1, "num_heads": 2}}
    plain = create_backbone(BackboneSpec.from_dict(options))
    given = create_backbone(BackboneSpec.from_dict(options | {"normalization": {"mean": [0.1, 0.2, 0.3],
                                                                                "std": [0.4, 0.5, 0.6]}}))
    assert normalization(plain) == (tuple(plain.pretrained_cfg["mean"]), tuple(plain.pretrained_cfg["std"]))
    assert normalization(given) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert "normalization" not in BackboneSpec.from_dict(options).to_dict()  # earlier runs' digests unchanged
