"""List a data set laid out as ``root/{train,val[,test]}/<class>/<image>`` (torchvision's ImageFolder).

Every file under a class folder is an input, image or not: one that does not
decode is rejected later, never silently skipped. Hidden files and folders
(names starting with '.') are not inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis import tables
from intr.data.prepare import (
    DatasetListing,
    PrepareError,
    empty_frame,
)

SPLIT_FOLDERS = ("train", "val", "test")


def visible_entries(folder: Path) -> list[Path]:
    """Entries of ``folder`` that are not hidden, sorted by name.

    Args:
        folder: a directory.
    """
    return sorted((entry for entry in folder.iterdir() if not entry.name.startswith(".")), key=lambda e: e.name)


def split_of_folder(present: list[str]) -> dict[str, str]:
    """Which split each split folder becomes.

    With a test/ folder the folders map one-to-one; without one, val/ is the
    test split (and 'val' is carved out of train/ later).

    Args:
        present: the split folders that exist.
    """
    if "test" in present:
        return {name: name for name in present}
    return {"train": "train", "val": "test"}


def class_folders(root: Path, present: list[str]) -> list[str]:
    """The class names: the folders of each split folder, which must all hold the same classes.

    Args:
        root: data set root.
        present: the split folders that exist.
    """
    found = {split: {e.name for e in visible_entries(root / split) if e.is_dir()} for split in present}
    classes = sorted(set().union(*found.values()))
    for split in present:
        for name in classes:
            if name not in found[split]:
                holders = [s for s in present if name in found[s]]
                raise PrepareError(f"class {name!r} has no folder in split {split!r} ({root / split / name}) "
                                   f"but has one in {', '.join(holders)}; every split folder needs every class")
    if not classes:
        raise PrepareError(f"no class folders in {root / present[0]} (expected {root}/train/<class>/<image>)")
    return classes


def class_files(folder: Path) -> list[str]:
    """Every non-hidden file under a class folder (recursively), as sorted posix paths relative to it.

    Args:
        folder: a class folder.
    """
    files = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append(relative.as_posix())
    return sorted(files)


def stray_files(root: Path, present: list[str]) -> pd.DataFrame:
    """Files directly inside a split folder, outside any class folder: inputs rejected as 'no_class'.

    Args:
        root: data set root.
        present: the split folders that exist.
    """
    rows = [{"path": f"{split}/{e.name}", "reason": "no_class", "detail": "file is not inside a class folder"}
            for split in present for e in visible_entries(root / split) if e.is_file()]
    return pd.DataFrame(rows, columns=tables.schema("rejected").names)


def read_imagefolder(root: Path) -> DatasetListing:
    """List an ImageFolder data set; image ids run 1..N in sorted (split folder, class, file) order.

    Args:
        root: the folder holding train/ and val/ (and optionally test/).
    """
    present = [name for name in SPLIT_FOLDERS if (root / name).is_dir()]
    if "train" not in present or len(present) < 2:
        raise PrepareError(f"{root} needs a train/ folder and a val/ or test/ folder, each with one "
                           f"folder per class; found {', '.join(present) or 'none'}")
    split_of = split_of_folder(present)
    classes = class_folders(root, present)
    rows = [(f"{folder}/{name}/{file}", class_id, split_of[folder])
            for folder in sorted(present)
            for class_id, name in enumerate(classes)
            for file in class_files(root / folder / name)]
    images = pd.DataFrame(rows, columns=["path", "class_id", "split"])
    images.insert(0, "image_id", np.arange(1, len(images) + 1, dtype=np.int32))
    images["class_id"] = images["class_id"].astype(np.int16)
    for column in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"):
        images[column] = np.nan
    images["mask_path"] = None
    images["source_image_id"] = None
    class_table = pd.DataFrame({"class_id": np.arange(len(classes), dtype=np.int16), "class_name": classes,
                                "genus": [None] * len(classes)})
    return DatasetListing(images=images, classes=class_table, parts=empty_frame("parts"),
                          unread_rejects=stray_files(root, present), carve_val="val" not in split_of.values())
