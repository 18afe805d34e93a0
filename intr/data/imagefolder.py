"""List a data set laid out as ``root/{train,val[,test]}/<class>/<image>`` (torchvision's ImageFolder).

Every entry under a split folder is accounted for (inputs = manifest +
rejected), except hidden files and folders (names starting with '.'), which
are not inputs:

* a file under a class folder, at any depth (subfolders are walked), is an
  input; one that does not decode is rejected later, never silently skipped;
* symbolic links are followed wherever they point, inside or outside the
  root: a linked file is read through its link (the manifest keeps the link's
  path), a linked class folder or subfolder is walked like a real one;
* a link whose target does not exist is rejected as 'broken_link'; a linked
  folder that leads back into a folder being walked as 'link_loop'; a pipe,
  socket or device as 'not_a_file'; a folder that cannot be listed as
  'unreadable'; an entry directly in a split folder that is not a folder as
  'no_class';
* a class folder left with no readable image stops ``prepare`` (see
  ``intr.data.prepare.classes_without_images``).
"""

from __future__ import annotations

import os
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


def broken_link(entry: Path, path: str) -> dict[str, str]:
    """The rejected row of a symbolic link whose target does not exist.

    Args:
        entry: the link.
        path: its path relative to the data set root.
    """
    return {"path": path, "reason": "broken_link", "detail": f"symbolic link to {os.readlink(entry)}, "
                                                             "which does not exist (or is a loop of links)"}


def class_files(root: Path, folder: str) -> tuple[list[str], list[dict[str, str]]]:
    """Every non-hidden file under a class folder, walked through links and subfolders, and the entries
    rejected without decoding (see the module docstring).

    Returns the files as sorted posix paths relative to ``root``, and rejected rows (path, reason, detail).

    Args:
        root: data set root.
        folder: the class folder relative to the root, e.g. 'train/Foo'.
    """
    files: list[str] = []
    rejects: list[dict[str, str]] = []

    def visit(relative: str, ancestors: frozenset[str]) -> None:
        try:
            entries = visible_entries(root / relative)
        except OSError as err:
            rejects.append({"path": relative, "reason": "unreadable", "detail": f"cannot list the folder: {err}"})
            return
        for entry in entries:
            path = f"{relative}/{entry.name}"
            if entry.is_symlink() and not entry.exists():
                rejects.append(broken_link(entry, path))
            elif entry.is_dir():
                real = os.path.realpath(entry)
                if real in ancestors:
                    rejects.append({"path": path, "reason": "link_loop",
                                    "detail": f"symbolic link to {os.readlink(entry)}, a folder that holds it"})
                else:
                    visit(path, ancestors | {real})
            elif entry.is_file():
                files.append(path)
            else:
                rejects.append({"path": path, "reason": "not_a_file",
                                "detail": "not a regular file or folder (a pipe, socket or device)"})

    # A link back to the root or the split folder is a loop too: walking it would relabel other classes.
    top = folder.split("/")[0]
    visit(folder, frozenset(os.path.realpath(p) for p in (root, root / top, root / folder)))
    return sorted(files), rejects


def stray_entries(root: Path, present: list[str]) -> list[dict[str, str]]:
    """Entries directly inside a split folder that are not (links to) folders: rejected as 'no_class',
    or 'broken_link' for a link to nothing.

    Args:
        root: data set root.
        present: the split folders that exist.
    """
    rows = []
    for split in present:
        for entry in visible_entries(root / split):
            if entry.is_symlink() and not entry.exists():
                rows.append(broken_link(entry, f"{split}/{entry.name}"))
            elif not entry.is_dir():
                rows.append({"path": f"{split}/{entry.name}", "reason": "no_class",
                             "detail": "not inside a class folder"})
    return rows


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
    rows, rejects, folders = [], stray_entries(root, present), []
    for split_folder in sorted(present):
        for class_id, name in enumerate(classes):
            folder = f"{split_folder}/{name}"
            files, unread = class_files(root, folder)
            rows += [(path, class_id, split_of[split_folder]) for path in files]
            rejects += unread
            folders.append((folder, class_id))
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
                          unread_rejects=pd.DataFrame(rejects, columns=tables.schema("rejected").names),
                          carve_val="val" not in split_of.values(),
                          class_folders=pd.DataFrame(folders, columns=["folder", "class_id"]))
