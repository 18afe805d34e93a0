"""The one checkpoint loader and writer.

Every weights file the project reads goes through ``read_checkpoint``; every
``model.pt`` and resume checkpoint it writes goes through ``save_checkpoint``.

Files are opened with ``torch.load(..., weights_only=True)``: tensors,
containers and plain values only, so a checkpoint cannot run code.  A release
that also pickles a harmless class (DINO's argparse ``Namespace``) names it in
``trusted_classes``; nothing else is let through.  A file that cannot be read
(empty, truncated, damaged, or holding other Python objects) raises
:class:`CheckpointError` naming the file and the cause.

``model.pt`` and ``last.pt`` also hold the class names they were trained on
(``class_names``, in class_id order) and their fingerprint; ``load_model``
with a manifest refuses a model trained on other classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from intr.models.factory import build_model


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, or trained on other classes."""


def save_checkpoint(obj: Any, path: Path, keep_previous: Path | None = None) -> None:
    """Write ``obj`` to ``path`` so that a crash leaves the old file or the new one, never half of one.

    Args:
        obj: what to save.
        path: the file to (re)write.
        keep_previous: where the file being replaced is moved (None: it is overwritten).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())  # on disk before the rename, so a power cut cannot leave a torn file
    if keep_previous is not None and path.exists():
        os.replace(path, keep_previous)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    trusted_classes: Iterable[type] = ()) -> Any:
    """The object saved in ``path``, loaded with ``weights_only=True``.

    Args:
        path: a ``.pt`` / ``.pth`` file (``model.pt``, a training checkpoint,
            backbone or DETR weights).
        map_location: where the tensors land.
        trusted_classes: extra classes the file may hold besides tensors and
            plain containers (allowed for this call only).

    Raises:
        CheckpointError: the file is empty, truncated or damaged, or holds
            Python objects other than tensors and the trusted classes.
        FileNotFoundError: there is no such file.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); it is not a checkpoint")
    with torch.serialization.safe_globals(list(trusted_classes)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # torch reports damage as RuntimeError, OSError, EOFError, KeyError, ...
            found = re.search(r"GLOBAL ([\w.]+)", str(err))  # the safe unpickler met a class it does not allow
            if found or "allowlisted" in str(err):
                named = f": {found.group(1)}" if found else ""
                raise CheckpointError(f"{path} is not a checkpoint this tool wrote (it holds Python objects other "
                                      f"than tensors{named}); refusing to load it") from None
            # from None: torch's message may advise weights_only=False, which this tool never suggests.
            raise CheckpointError(f"{path} {_damage(path)}; torch could not read it ({_cause(err)})") from None


def _damage(path: Path) -> str:
    """What is wrong with a checkpoint torch could not read (torch writes zip archives)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        is_zip = file.read(4) == b"PK\x03\x04"
    if not is_zip:
        return f"is truncated or not a checkpoint ({size} bytes, not a zip archive)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return f"is truncated ({size} bytes; its zip archive has no end: the write did not finish)"
    if bad:
        return f"is damaged ({size} bytes; entry {bad} of its zip archive fails its checksum)"
    return f"is damaged or not a checkpoint ({size} bytes; its zip archive is whole but its contents are not)"


def _cause(err: Exception) -> str:
    """The informative part of torch's message: the unpickler's complaint, or its first sentence."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.partition("WeightsUnpickler error:")[2].strip()
    first = text.split(". ")[0].splitlines()[0][:160] if text.strip() else "no message"
    return f"{type(err).__name__}: {first}"


# --------------------------------------------------------------------------- the classes a model was trained on


def manifest_class_names(manifest: str | Path) -> list[str]:
    """The manifest's class names in class_id order (one per class_id 0..max).

    Args:
        manifest: ``manifest.parquet`` from ``intr prepare``.
    """
    classes = pd.read_parquet(manifest, columns=["class_id", "class_name"]).drop_duplicates("class_id")
    name_of = dict(zip(classes["class_id"].astype(int), classes["class_name"].astype(str)))
    # train() sizes the model by the largest class_id; an id without images still has a row.
    return [name_of.get(i, f"<class_id {i}: no images>") for i in range(max(name_of, default=-1) + 1)]


def class_fingerprint(names: Sequence[str]) -> str:
    """sha256 of the ordered class names (JSON, so no separator can be confused with a name).

    Args:
        names: class names in class_id order.
    """
    return hashlib.sha256(json.dumps(list(names), ensure_ascii=False).encode()).hexdigest()


def class_record(manifest: str | Path) -> dict[str, Any]:
    """``class_names`` and ``class_fingerprint`` of a manifest, as stored in every checkpoint ``intr train`` writes.

    Args:
        manifest: ``manifest.parquet`` from ``intr prepare``.
    """
    names = manifest_class_names(manifest)
    return {"class_names": names, "class_fingerprint": class_fingerprint(names)}


def check_classes(saved: Mapping[str, Any], path: str | Path, manifest: str | Path) -> None:
    """Refuse a checkpoint trained on other classes than the manifest's.

    Args:
        saved: the checkpoint's contents (``model.pt`` or ``last.pt``).
        path: the checkpoint file (for the message).
        manifest: ``manifest.parquet`` the model is about to be run on.

    Raises:
        CheckpointError: the class lists differ (sizes and first difference named), or an old
            checkpoint without names has another number of classes.
    """
    expected = manifest_class_names(manifest)
    if "class_names" not in saved:  # written before checkpoints stored their classes
        trained = int(json.loads(saved["config"])["num_classes"]) if "config" in saved else None
        if trained is not None and trained != len(expected):
            raise CheckpointError(f"{path} was trained on {trained} classes but {manifest} has {len(expected)}; "
                                  "it is a model of other classes (retrain on this manifest)")
        warnings.warn(f"{path} holds no class names (written by an older intr train): cannot check that its "
                      f"classes are the {len(expected)} of {manifest}; retrain to store them", stacklevel=3)
        return
    names = list(saved["class_names"])
    if saved.get("class_fingerprint") == class_fingerprint(expected) and names == expected:
        return
    raise CheckpointError(_mismatch_message(path, names, manifest, expected))


def _mismatch_message(path: str | Path, trained: list[str], manifest: str | Path, expected: list[str]) -> str:
    """Both lists' sizes and their first differing names."""
    first = next(i for i in range(max(len(trained), len(expected)))
                 if i >= len(trained) or i >= len(expected) or trained[i] != expected[i])
    in_model = repr(trained[first]) if first < len(trained) else "none"
    in_manifest = repr(expected[first]) if first < len(expected) else "none"
    return (f"{path} was trained on other classes than {manifest}: {len(trained)} classes in the model, "
            f"{len(expected)} in the manifest; first difference at class_id {first}: {in_model} in the model, "
            f"{in_manifest} in the manifest. Use the manifest the model was trained on, or retrain on this one")


# --------------------------------------------------------------------------- model.pt


def load_model(path: str | Path, map_location: str | torch.device = "cpu",
               manifest: str | Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from ``model.pt``; return it in eval mode with its config.

    Args:
        path: ``model.pt`` from ``intr train`` (``config``: the JSON of the
            method, model section, number of classes, image size, train
            options and normalisation; ``state``: the trained weights;
            ``class_names``: the classes it was trained on).
        map_location: where the saved tensors land before they are copied in.
        manifest: the manifest the model is about to be run on: a model of other
            classes is refused (:func:`check_classes`) before anything is built.
    """
    saved = read_checkpoint(path, map_location)
    if manifest is not None:
        check_classes(saved, path, manifest)
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
