"""Backbones by name through timm, with local checkpoints converted on load.

``pretrained: true`` uses timm's own loading (where a hub is reachable);
``checkpoint: PATH`` loads a local file: a timm state dict, or the original
DINO / DINOv2 release files (their ``teacher.backbone.`` / ``module.``
prefixes stripped, DINOv2's 37x37 position grid resampled and its
``mask_token`` dropped by timm's own ``checkpoint_filter_fn``).  Nothing is
downloaded unless ``pretrained`` asks for it.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from torch import nn

from intr.models.checkpoint import read_checkpoint

_PREFIXES = ("module.", "backbone.", "model.", "encoder.")


@dataclass(frozen=True)
class BackboneSpec:
    """How to make a backbone.

    Args:
        name: a timm model name (``vit_base_patch16_224.dino``, ...).
        pretrained: load timm's pretrained weights (needs the hub).
        checkpoint: a local weights file; relative paths resolve against the
            package folder first (how the shipped default is found), then the cwd.
        kwargs: overrides passed to ``timm.create_model`` (img_size, patch_size, ...).
        normalization: ``{"mean": [3], "std": [3]}`` replacing timm's input
            normalisation (Prompt-CAM's code: 0.5 / 0.5), or None.
    """

    name: str
    pretrained: bool = False
    checkpoint: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    normalization: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> "BackboneSpec":
        return cls(name=options["name"], pretrained=bool(options.get("pretrained", False)),
                   checkpoint=options.get("checkpoint"), kwargs=dict(options.get("kwargs") or {}),
                   normalization=options.get("normalization"))

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "pretrained": self.pretrained, "checkpoint": self.checkpoint,
               "kwargs": dict(self.kwargs)}
        if self.normalization is not None:  # only when set, so earlier runs' config digests stay valid
            out["normalization"] = dict(self.normalization)
        return out


PACKAGE_DIR = Path(__file__).resolve().parent.parent


def resolve_checkpoint(path: str) -> Path:
    """Find a checkpoint: package-relative (shipped weights), else as given."""
    candidate = PACKAGE_DIR / path
    if candidate.exists():
        return candidate
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    return p


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unwrap(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Pick the weights out of the usual checkpoint wrappers."""
    for key in ("teacher", "state_dict", "model", "backbone"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def convert_state_dict(state: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Turn a timm, DINO or DINOv2 release state dict into ``model``'s keys and shapes."""
    weights = _unwrap(state)
    # The projection heads of DINO training runs are not part of the backbone.
    weights = {k: v for k, v in weights.items() if not k.startswith(("head.", "dino_head", "ibot_head"))}
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(model, VisionTransformer):
        weights = checkpoint_filter_fn(weights, model)
    return weights


def check_shapes(model: nn.Module, weights: Mapping[str, torch.Tensor], path: str | Path, what: str) -> None:
    """A ValueError naming ``path`` when weights do not have the model's shapes.

    (``load_state_dict(strict=False)`` would raise a bare RuntimeError instead.)
    """
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [f"{k} {tuple(v.shape)} (model: {shapes[k]})" for k, v in weights.items()
             if k in shapes and tuple(v.shape) != shapes[k]]
    if wrong:
        raise ValueError(f"{what} {path} does not fit {type(model).__name__}: wrong shapes {wrong[:4]}")


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load local weights into ``model`` (``weights_only=True``); report what did not fit."""
    # DINO's training checkpoints also pickle their argparse Namespace; allow only that class.
    state = read_checkpoint(path, trusted_classes=[argparse.Namespace])
    weights = convert_state_dict(state, model)
    check_shapes(model, weights, path, "checkpoint")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}")


def create_backbone(spec: BackboneSpec, num_classes: int = 0) -> nn.Module:
    """Make the timm model of ``spec`` and load its weights.

    Args:
        spec: name, weights source and overrides.
        num_classes: classifier outputs (0: no classifier, features only).
    """
    model = timm.create_model(spec.name, pretrained=spec.pretrained, num_classes=num_classes,
                              **dict(spec.kwargs))
    if spec.checkpoint:
        load_checkpoint(model, resolve_checkpoint(spec.checkpoint))
    if spec.normalization is not None:  # read by ``normalization`` below, so train and pretrain agree
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}),
                                "mean": tuple(spec.normalization["mean"]), "std": tuple(spec.normalization["std"])}
    return model


def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the backbone expects (timm's pretrained config, else ImageNet)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
