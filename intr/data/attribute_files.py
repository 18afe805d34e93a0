"""Where a CUB-layout data set keeps its attribute files.

Standard library only: the workflow reads it before any job runs (to know
whether `prepare` writes class_attributes.parquet), also in conda mode where
Snakemake's own environment lacks this package's dependencies.
"""

from __future__ import annotations

from pathlib import Path


def find_attribute_names(root: Path) -> Path | None:
    """attributes.txt: under attributes/, at the root, or beside the root (where the CUB tarball puts it).

    Args:
        root: data set root.
    """
    for path in (root / "attributes" / "attributes.txt", root / "attributes.txt", root.parent / "attributes.txt"):
        if path.is_file():
            return path
    return None


def find_attribute_values(root: Path) -> Path | None:
    """class_attribute_labels_continuous.txt: under attributes/ or at the root.

    Args:
        root: data set root.
    """
    return next((p for p in (root / "attributes" / "class_attribute_labels_continuous.txt",
                             root / "class_attribute_labels_continuous.txt") if p.is_file()), None)


def has_class_attributes(root: Path) -> bool:
    """Whether prepare writes class_attributes.parquet for this CUB-layout root (both attribute files found).

    Args:
        root: data set root.
    """
    return find_attribute_values(root) is not None and find_attribute_names(root) is not None
