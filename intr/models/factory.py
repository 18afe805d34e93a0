"""A method's model by name, from its config section; and the device it runs on."""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

METHODS = ("prompt_cam", "intr")


def build_model(method: str, model_options: Mapping[str, Any], num_classes: int, image_size: int) -> nn.Module:
    """The model of ``method`` from its config section (an :class:`InterpretableModel`).

    Args:
        method: ``prompt_cam`` or ``intr``.
        model_options: the method's ``model`` config section (backbone spec, sizes).
        num_classes: number of classes (one prompt or query each).
        image_size: network input side in pixels (fixes the map grid).
    """
    # The model modules import timm; load them only when a model is built.
    if method == "prompt_cam":
        from intr.models.prompt_cam import build_prompt_cam

        return build_prompt_cam(model_options, num_classes, image_size)
    if method == "intr":
        from intr.models.intr import build_intr

        return build_intr(model_options, num_classes, image_size)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def resolve_device(name: str) -> torch.device:
    """The torch device for ``auto``, ``cpu`` or ``cuda`` (under torchrun: this rank's GPU).

    Args:
        name: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or any torch device name.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda was asked for, but no CUDA device is available")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(name)
