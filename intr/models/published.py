"""The two papers' released checkpoints, converted into this project's models.

* Prompt-CAM (github.com/Imageomics/Prompt_CAM) saves ``{'model_state_dict': sd}`` of its patched
  timm ViT: the backbone under timm's own names (``patch_embed.*``, ``cls_token``, ``pos_embed``,
  ``blocks.N.*``, ``norm.*``), ``vpt.prompt_embeddings`` of shape (blocks, classes, D) (one prompt
  per class at every block, VPT-deep) and ``head.*``, the shared ``Linear(D, 1)``.  Its prompts sit
  before the class token, ours after it: no position embedding reaches a prompt and attention does
  not depend on the order of the tokens, so logits and maps are the same.
* INTR (github.com/Imageomics/INTR) saves DETR's ``{'model': sd, 'optimizer': ..., 'args': Namespace}``:
  ``backbone.0.body.*`` (the ResNet), ``transformer.*`` (DETR's names, which ours keep),
  ``input_proj.*``, ``query_embed.weight`` (classes, d) and ``presence_vector.*``.  Unlike
  :func:`intr.models.intr.load_detr_checkpoint` (COCO DETR, whose object queries are dropped), every
  weight of a trained INTR loads.

Both papers index classes in their data set's class-list order (CUB: ``classes.txt``), which is the
manifest's ``class_id`` order for a CUB data set.  The files carry no class names, so the number of
classes is checked and a mismatch refused; the order is the user's to keep (config/README.md).
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from torch import nn

from analysis.tables import schema, write_table
from intr.models.backbones import sha256_of
from intr.models.checkpoint import CheckpointError, class_record, manifest_class_names, read_checkpoint, save_checkpoint
from intr.models.factory import build_model


@dataclass(frozen=True)
class Release:
    """How one paper's code saves its model.

    Args:
        wrapper: the key of the saved dict that holds the state dict.
        class_key: the state-dict entry with one row per class.
        class_axis: the axis of ``class_key`` that counts the classes.
        class_word: what a class's row is called there (for messages).
        to_ours: original key -> this project's key.
        to_original: this project's key -> original key.
        normalization: the mean and std the paper's code normalises images with (Prompt-CAM: timm's
            Inception constants, not the DINO backbone's ImageNet ones; INTR: DETR's ImageNet ones).
    """

    wrapper: str
    class_key: str
    class_axis: int
    class_word: str
    to_ours: Callable[[str], str]
    to_original: Callable[[str], str]
    normalization: tuple[tuple[float, ...], tuple[float, ...]]


def _swap_prefix(key: str, pairs: tuple[tuple[str, str], ...], default: str = "") -> str:
    """``key`` with the first matching prefix of ``pairs`` replaced (else ``default`` prepended)."""
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old):]
    return default + key


_PROMPT_CAM = (("vpt.prompt_embeddings", "class_prompts"), ("head.", "presence_head."))
_INTR = (("backbone.0.body.", "backbone.body."), ("presence_vector.", "presence_head."))

RELEASES: dict[str, Release] = {
    "prompt_cam": Release(
        "model_state_dict", "vpt.prompt_embeddings", 1, "class prompts",
        to_ours=lambda k: _swap_prefix(k, _PROMPT_CAM, default="backbone."),
        to_original=lambda k: _swap_prefix(k, tuple((b, a) for a, b in _PROMPT_CAM) + (("backbone.", ""),)),
        normalization=(IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD)),
    "intr": Release(
        "model", "query_embed.weight", 0, "class queries",
        to_ours=lambda k: _swap_prefix(k, _INTR),
        to_original=lambda k: _swap_prefix(k, tuple((b, a) for a, b in _INTR)),
        normalization=(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)),
}


def read_published(method: str, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a released checkpoint, under its original key names.

    Args:
        method: ``prompt_cam`` or ``intr``.
        path: the released file (read with ``weights_only=True``; INTR's also holds its argparse Namespace).

    Raises:
        CheckpointError: the file is unreadable, or is not laid out as that paper's code saves a model.
    """
    release = RELEASES[method]
    saved = read_checkpoint(path, trusted_classes=[argparse.Namespace])
    if not isinstance(saved, Mapping) or not isinstance(saved.get(release.wrapper), Mapping):
        found = sorted(map(str, saved))[:8] if isinstance(saved, Mapping) else type(saved).__name__
        raise CheckpointError(f"{path} is not a published {method} checkpoint: it has no {release.wrapper!r} "
                              f"state dict (found {found})")
    return {k: v for k, v in saved[release.wrapper].items() if isinstance(v, torch.Tensor)}


def published_class_count(method: str, state: Mapping[str, torch.Tensor], path: str | Path) -> int:
    """How many classes a released state dict has prompts or queries for.

    Args:
        method: ``prompt_cam`` or ``intr``.
        state: from :func:`read_published`.
        path: the file (for the message).
    """
    release = RELEASES[method]
    if release.class_key not in state:
        raise CheckpointError(f"{path} is not a published {method} checkpoint: it has no {release.class_key}")
    return int(state[release.class_key].shape[release.class_axis])


def check_class_count(method: str, state: Mapping[str, torch.Tensor], path: str | Path, expected: int,
                      where: str) -> None:
    """Refuse a released model of another number of classes, naming both counts.

    Args:
        method: ``prompt_cam`` or ``intr``.
        state: from :func:`read_published`.
        path: the file (for the message).
        expected: the number of classes it is meant for.
        where: what has ``expected`` classes (``the manifest X``, ``the model``).
    """
    count = published_class_count(method, state, path)
    if count != expected:
        raise CheckpointError(f"checkpoint {path} has {count} {RELEASES[method].class_word} but {where} has "
                              f"{expected} classes; a released model scores the classes of its data set, in "
                              "the order of its class list (CUB: classes.txt), so it needs a manifest of "
                              "exactly those classes")


def load_published(model: nn.Module, method: str, path: str | Path,
                   state: Mapping[str, torch.Tensor] | None = None) -> None:
    """Copy every weight of a released checkpoint into ``model`` (built for the same sizes).

    Args:
        model: a :class:`~intr.models.prompt_cam.PromptCAM` or :class:`~intr.models.intr.INTR`.
        method: ``prompt_cam`` or ``intr``.
        path: the released file.
        state: its state dict when already read (:func:`read_published`).

    Raises:
        CheckpointError: another class count, or keys missing, unexpected or of other shapes (named as
            in the file).
    """
    release = RELEASES[method]
    state = read_published(method, path) if state is None else state
    check_class_count(method, state, path, model.num_classes, f"the {method} model")
    weights = {release.to_ours(k): v for k, v in state.items()}
    expected = model.state_dict()
    # DETR's frozen batch norm keeps no batch counter; a trainable one has it, and it is never read.
    missing = [release.to_original(k) for k in expected if k not in weights and not k.endswith("num_batches_tracked")]
    unexpected = [release.to_original(k) for k in weights if k not in expected]
    wrong = [f"{release.to_original(k)} {tuple(v.shape)} (model: {tuple(expected[k].shape)})"
             for k, v in weights.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong:
        problems = [f"{name} {keys[:6]}{' ...' if len(keys) > 6 else ''}"
                    for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong))
                    if keys]
        raise CheckpointError(f"checkpoint {path} does not fit this {method} model (check the config's model "
                              f"section and image_size): {'; '.join(problems)}")
    model.load_state_dict(weights, strict=False)


def self_contained_options(method: str, model_options: Mapping[str, Any]) -> dict[str, Any]:
    """The model section with every weights source cleared: a converted ``model.pt`` holds all weights.

    Args:
        method: ``prompt_cam`` or ``intr``.
        model_options: the method's ``model`` config section.
    """
    options = copy.deepcopy(dict(model_options))
    options["backbone"] = dict(options["backbone"]) | {"pretrained": False, "checkpoint": None}
    if method == "intr":
        options["detr_checkpoint"] = None
    return options


def convert_published(method: str, model_options: Mapping[str, Any], published: str | Path,
                      manifest: str | Path, out_dir: str | Path, image_size: int) -> Path:
    """Write ``model.pt`` and ``train_log.parquet`` from a released checkpoint instead of training.

    ``model.pt`` has the layout ``intr train`` writes (config, state, class names and fingerprint),
    with every weight in ``state`` and the normalisation of the paper's code; ``train_log.parquet``
    has no rows (no epoch ran here) and names the source file and its sha256 in its metadata.

    Args:
        method: ``prompt_cam`` or ``intr``.
        model_options: the method's ``model`` config section (its sizes must be the released model's).
        published: the released file.
        manifest: ``manifest.parquet``; its classes, in class_id order, are the released model's.
        out_dir: gets ``model.pt`` and ``train_log.parquet``.
        image_size: network input side in pixels.
    """

    published, out_dir = Path(published), Path(out_dir)
    state = read_published(method, published)
    num_classes = len(manifest_class_names(manifest))
    check_class_count(method, state, published, num_classes, f"the manifest {manifest}")
    options = self_contained_options(method, model_options)
    model = build_model(method, options, num_classes, image_size)
    load_published(model, method, published, state)
    mean, std = RELEASES[method].normalization  # images as the paper's code fed them
    source = {"path": str(published), "sha256": sha256_of(published)}
    config = {"method": method, "model": options, "num_classes": num_classes, "image_size": image_size,
              "train": {"seed": 0}, "normalization": {"mean": list(mean), "std": list(std)},
              "published": source}
    model_path = out_dir / "model.pt"
    save_checkpoint({"config": json.dumps(config), "state": model.state_dict(), "epoch": 0,
                  **class_record(manifest)}, model_path)
    write_table(schema("train_log").empty_table(), out_dir / "train_log.parquet",
                metadata={"method": method, "best_epoch": 0, "config": config, "converted_from": source})
    return model_path
