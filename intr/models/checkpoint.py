"""The one checkpoint loader: every weights file the project reads goes through ``read_checkpoint``.

Files are opened with ``torch.load(..., weights_only=True)``: tensors,
containers and plain values only, so a checkpoint cannot run code.  A release
that also pickles a harmless class (DINO's argparse ``Namespace``) names it in
``trusted_classes``; nothing else is let through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from intr.models.factory import build_model


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    trusted_classes: Iterable[type] = ()) -> Any:
    """The object saved in ``path``, loaded with ``weights_only=True``.

    Args:
        path: a ``.pt`` / ``.pth`` file (``model.pt``, a training checkpoint,
            backbone or DETR weights).
        map_location: where the tensors land.
        trusted_classes: extra classes the file may hold besides tensors and
            plain containers (allowed for this call only).
    """
    with torch.serialization.safe_globals(list(trusted_classes)):
        return torch.load(path, map_location=map_location, weights_only=True)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from ``model.pt``; return it in eval mode with its config.

    Args:
        path: ``model.pt`` from ``intr train`` (``config``: the JSON of the
            method, model section, number of classes, image size, train
            options and normalisation; ``state``: the trained weights).
        map_location: where the saved tensors land before they are copied in.
    """
    saved = read_checkpoint(path, map_location)
    config = json.loads(saved["config"])
    # A backbone without a weights file is random: rebuild it from the seed train() built it with.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config["train"]["seed"]))
        model = build_model(config["method"], config["model"], config["num_classes"], int(config["image_size"]))
    missing = set(saved["state"]) - set(model.state_dict())
    if missing:
        raise ValueError(f"{path}: weights {sorted(missing)[:5]} do not belong to a {config['method']} model")
    model.load_state_dict(saved["state"], strict=False)
    return model.eval(), config
