"""The ``prepare`` stage: read a data set into manifest, parts and rejected tables.

Every listed image is decoded exactly once. An image that decodes goes to
``manifest.parquet``; one that does not goes to ``rejected.parquet`` with a
reason, so that inputs = manifest rows + rejected rows, always. The readers of
each layout (``intr.data.cub``, ``intr.data.imagefolder``) only list what the
data set says; decoding, splitting and writing happen here, the same for all.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import warnings
from contextlib import closing
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from analysis import tables
from analysis.config import defaults
from analysis.tables import ParquetStreamWriter, write_table

KINDS = ("cub", "imagefolder", "synthetic")
DECODE_BATCH = 512
# Every value rejected.parquet's reason column can take; no_class: an ImageFolder file outside any class folder.
REJECT_REASONS = ("missing", "empty", "not_an_image", "truncated", "unreadable", "no_class")

PLANTED_TRAITS_COLUMNS = ("species_id", "species", "genus", "part", "colour", "pattern", "state")
# Tables a run writes only where the data has them; a run that does not write
# one removes an old copy, so ``out`` never mixes two data sets.
OPTIONAL_TABLES = ("class_attributes", "planted_traits", "lookalike_pairs")


class PrepareError(Exception):
    """A data set that cannot be prepared; the message names the bad file, key or class."""


@dataclass
class DatasetListing:
    """What a data set's files say, before any image is decoded.

    Attributes:
        images: one row per listed image, sorted by image_id, with columns
            image_id, path (relative to the root, posix), class_id, split
            ('train'/'val'/'test' as the source says), bbox_x/y/w/h,
            mask_path and source_image_id (nullable where unknown).
        classes: class_id (0-based, contiguous), class_name, genus (nullable).
        parts: every part keypoint the data set lists (the parts table's columns).
        unread_rejects: files rejected without decoding (path, reason, detail).
        carve_val: whether 'val' is carved out of the training images.
        tables: further tables to write as they are, by name
            (class_attributes, planted_traits, lookalike_pairs), already typed.
    """

    images: pd.DataFrame
    classes: pd.DataFrame
    parts: pd.DataFrame
    unread_rejects: pd.DataFrame
    carve_val: bool = True
    tables: dict[str, pa.Table] = field(default_factory=dict)


@dataclass
class PrepareSummary:
    """Counts of one ``prepare`` run: inputs = kept + rejected."""

    inputs: int
    kept: int
    rejected: int
    classes: int
    out: Path

    def describe(self) -> str:
        """One line for the user, e.g. 'inputs 1200 = manifest 1198 + rejected 2 (12 classes) -> DIR'."""
        return (f"inputs {self.inputs} = manifest {self.kept} + rejected {self.rejected} "
                f"({self.classes} classes) -> {self.out}")


class DecodedImage(NamedTuple):
    """What decoding one file found: its size and mode, or why it cannot be used."""

    width: int | None
    height: int | None
    mode: str | None
    reason: str | None
    detail: str | None


def empty_frame(name: str) -> pd.DataFrame:
    """A DataFrame with no rows and the columns of table ``name`` (``analysis.tables``)."""
    return tables.schema(name).empty_table().to_pandas()


def strip_class_prefix(folder: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black_footed_Albatross' (CUB's numeric folder prefix).

    Args:
        folder: a class folder name, with or without the prefix.
    """
    return re.sub(r"^\d+\.", "", folder)


def decode_image(path: str) -> DecodedImage:
    """Decode one image fully, once, and report its size and mode or why it is rejected.

    Args:
        path: absolute path of the file.
    """
    try:
        if os.stat(path).st_size == 0:
            return DecodedImage(None, None, None, "empty", "file has 0 bytes")
        with Image.open(path) as image:
            image.load()
            image.convert("RGB")
            return DecodedImage(image.width, image.height, image.mode, None, None)
    except FileNotFoundError as err:
        return DecodedImage(None, None, None, "missing", str(err))
    except UnidentifiedImageError as err:
        return DecodedImage(None, None, None, "not_an_image", str(err))
    except Exception as err:  # noqa: BLE001 - a file the decoder chokes on is a rejection, not a crash
        reason = "truncated" if "truncat" in str(err).lower() else "unreadable"
        return DecodedImage(None, None, None, reason, f"{type(err).__name__}: {err}")


def decode_images(paths: list[str], workers: int, progress: bool) -> Iterator[DecodedImage]:
    """Decode files in order, in ``workers`` processes, with an optional progress bar.

    Args:
        paths: absolute file paths.
        workers: number of decoding processes (1: decode in this process).
        progress: show a tqdm bar on stderr.
    """
    bar = tqdm(total=len(paths), desc="decoding", unit="img", disable=not progress, file=sys.stderr)
    with bar:
        if workers <= 1:
            for path in paths:
                yield decode_image(path)
                bar.update()
            return
        chunksize = max(1, min(64, len(paths) // (workers * 8)))
        with multiprocessing.Pool(workers) as pool:
            for decoded in pool.imap(decode_image, paths, chunksize=chunksize):
                yield decoded
                bar.update()


def validation_split(images: pd.DataFrame, val_fraction: float, seed: int) -> pd.Series:
    """The split column with a per-class, seeded share of each class's training images set to 'val'.

    Each class draws from its own generator (seeded by ``seed`` and its class
    id) over its training images sorted by image_id, so a class's split does not
    depend on the other classes. The draw is over the listed images, before
    decoding: one image turning out corrupt never moves another between splits.
    Every class with at least two training images keeps at least one.

    Args:
        images: listing with image_id, class_id and split columns.
        val_fraction: share of each class's training images moved to 'val'.
        seed: seed of the draw.
    """
    split = images["split"].copy()
    training = images[images["split"] == "train"].sort_values("image_id")
    for class_id, members in training.groupby("class_id", sort=True):
        n_val = min(int(np.floor(val_fraction * len(members) + 0.5)), max(len(members) - 1, 0))
        if n_val == 0:
            continue
        rng = np.random.default_rng([seed, int(class_id)])
        chosen = rng.permutation(members.index.to_numpy())[:n_val]
        split.loc[chosen] = "val"
    return split


def read_taxonomy(path: Path, classes: pd.DataFrame) -> pd.Series:
    """Genus of each class from a CSV with columns class_name,genus (null, with a warning, where absent).

    Args:
        path: the taxonomy CSV.
        classes: class_id, class_name of the data set.
    """
    if not path.is_file():
        raise PrepareError(f"taxonomy file not found: {path}")
    table = pd.read_csv(path, dtype=str)
    missing = {"class_name", "genus"} - set(table.columns)
    if missing:
        raise PrepareError(f"taxonomy {path} lacks column(s) {sorted(missing)}; expected class_name,genus")
    genus_of = dict(zip(table["class_name"].map(strip_class_prefix), table["genus"]))
    genus = classes["class_name"].map(genus_of)
    absent = classes.loc[genus.isna(), "class_name"].tolist()
    if absent:
        warnings.warn(f"taxonomy {path} has no genus for {len(absent)} class(es), left null: "
                      f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}", stacklevel=2)
    return genus.astype(object).where(genus.notna(), None)


def read_listing(kind: str, root: Path) -> DatasetListing:
    """List a data set of layout ``kind`` (cub, imagefolder or synthetic) at ``root``.

    Args:
        kind: the layout.
        root: the data set root (must exist).
    """
    # The readers import PrepareError and DatasetListing from this module, so
    # they are imported here rather than at the top.
    if kind == "imagefolder":
        from intr.data.imagefolder import read_imagefolder
        return read_imagefolder(root)
    from intr.data.cub import read_cub
    return read_cub(root, synthetic=kind == "synthetic")


def _check_options(kind: str, val_fraction: float, max_reject_fraction: float, seed: int, workers: int) -> None:
    if kind not in KINDS:
        raise PrepareError(f"unknown data set kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= max_reject_fraction <= 1.0:
        raise PrepareError(f"max_reject_fraction must be in [0, 1], got {max_reject_fraction}")
    if seed < 0:
        raise PrepareError(f"seed must be >= 0, got {seed}")
    if workers < 1:
        raise PrepareError(f"workers must be >= 1, got {workers}")


@dataclass
class _Tally:
    """Running counts of the decoding pass, plus a few rejected examples for an error message."""

    kept_ids: list[np.ndarray] = field(default_factory=list)
    kept: int = 0
    rejected: int = 0
    examples: list[str] = field(default_factory=list)

    def add_rejects(self, rejects: pd.DataFrame) -> None:
        self.rejected += len(rejects)
        for path, reason in zip(rejects["path"], rejects["reason"]):
            if len(self.examples) == 5:
                break
            self.examples.append(f"{path} ({reason})")


def _decode_into(images: pd.DataFrame, root: Path, manifest: ParquetStreamWriter,
                 rejected: ParquetStreamWriter, tally: _Tally, workers: int, progress: bool) -> None:
    """Decode every listed image and stream it to the manifest or the rejected table.

    Args:
        images: the listing joined with class names and genus, splits assigned.
        root: data set root the listed paths are relative to.
        manifest: writer of manifest.parquet.
        rejected: writer of rejected.parquet.
        tally: counts to update.
        workers: decoding processes.
        progress: show a progress bar.
    """
    # closing(): on an error the worker pool is shut down now, not at garbage collection.
    with closing(decode_images([str(root / p) for p in images["path"]], workers, progress)) as decoded:
        for start in range(0, len(images), DECODE_BATCH):
            batch = images.iloc[start:start + DECODE_BATCH]
            found = pd.DataFrame(list(islice(decoded, len(batch))), columns=DecodedImage._fields,
                                 index=batch.index)
            _write_batch(batch, found, manifest, rejected, tally)


def _write_batch(batch: pd.DataFrame, found: pd.DataFrame, manifest: ParquetStreamWriter,
                 rejected: ParquetStreamWriter, tally: _Tally) -> None:
    """Send one batch's decoded images to the manifest and its failures to the rejected table."""
    ok = found["reason"].isna()
    kept = batch[ok].assign(
        width=found.loc[ok, "width"].astype("int32"),
        height=found.loc[ok, "height"].astype("int32"),
        mode=found.loc[ok, "mode"],
    )
    manifest.write(kept)
    tally.kept += len(kept)
    tally.kept_ids.append(kept["image_id"].to_numpy())
    rejects = pd.DataFrame({"path": batch.loc[~ok, "path"], "reason": found.loc[~ok, "reason"],
                            "detail": found.loc[~ok, "detail"]})
    rejected.write(rejects)
    tally.add_rejects(rejects)


def _remove_outputs(out: Path, names: tuple[str, ...]) -> None:
    for name in names:
        (out / f"{name}.parquet").unlink(missing_ok=True)


def write_manifest(listing: DatasetListing, images: pd.DataFrame, root: Path, out: Path,
                   metadata: dict, max_reject_fraction: float, workers: int, progress: bool) -> _Tally:
    """Decode all images into manifest.parquet and rejected.parquet; fail if too many are rejected.

    rejected.parquet is written even when the run fails, as the evidence; the
    manifest (and any older one) is then removed.

    Args:
        listing: the data set listing (for the files rejected without decoding).
        images: listed images with class names, genus and splits.
        root: data set root.
        out: output folder.
        metadata: key-value metadata of the manifest.
        max_reject_fraction: largest tolerated rejected/inputs.
        workers: decoding processes.
        progress: show a progress bar.
    """
    tally = _Tally()
    rejected = ParquetStreamWriter(out / "rejected.parquet", tables.schema("rejected"))
    manifest = ParquetStreamWriter(out / "manifest.parquet", tables.schema("manifest"), metadata)
    try:
        rejected.write(listing.unread_rejects)
        tally.add_rejects(listing.unread_rejects)
        _decode_into(images, root, manifest, rejected, tally, workers, progress)
    except BaseException:
        manifest.abort()
        rejected.abort()
        raise
    rejected.close()
    inputs = tally.kept + tally.rejected
    if inputs == 0 or tally.rejected > max_reject_fraction * inputs:
        manifest.abort()
        _remove_outputs(out, ("manifest", "parts", *OPTIONAL_TABLES))
        if inputs == 0:
            raise PrepareError(f"no images found in {root}")
        raise PrepareError(
            f"{tally.rejected} of {inputs} images rejected ({tally.rejected / inputs:.1%}), more than "
            f"max_reject_fraction {max_reject_fraction:.1%}; e.g. {'; '.join(tally.examples)}. "
            f"All rejections: {out / 'rejected.parquet'}")
    manifest.close()
    return tally


def write_tables(listing: DatasetListing, kept_ids: np.ndarray, out: Path) -> None:
    """Write parts.parquet (kept images only) and the data set's further tables.

    Args:
        listing: the data set listing.
        kept_ids: image ids in the manifest.
        out: output folder.
    """
    parts = listing.parts[listing.parts["image_id"].isin(kept_ids)]
    write_table(parts.sort_values(["image_id", "part_id"]), out / "parts.parquet", schema=tables.schema("parts"))
    for name, table in listing.tables.items():
        write_table(table, out / f"{name}.parquet")
    _remove_outputs(out, tuple(name for name in OPTIONAL_TABLES if name not in listing.tables))


DATASET = defaults("dataset")  # the config schema's defaults


def prepare_dataset(
    kind: str,
    root: Path,
    out: Path,
    *,
    val_fraction: float = DATASET["val_fraction"],
    max_reject_fraction: float = DATASET["max_reject_fraction"],
    seed: int = DATASET["seed"],
    taxonomy: Path | None = None,
    workers: int = 1,
    progress: bool = True,
) -> PrepareSummary:
    """Read a data set into manifest/parts/rejected tables (plus attributes, traits, pairs where present).

    Args:
        kind: layout of the data set: 'cub', 'imagefolder' or 'synthetic'.
        root: data set root (the CUB_200_2011 folder, or the folder holding train/ and val/).
        out: folder for the tables; created if needed.
        val_fraction: per-class share of the training images held out as 'val'.
        max_reject_fraction: fail when more than this share of the inputs is rejected.
        seed: seed of the train/val split.
        taxonomy: optional CSV (class_name,genus) overriding each class's genus.
        workers: decoding processes.
        progress: show a progress bar on stderr.
    """
    _check_options(kind, val_fraction, max_reject_fraction, seed, workers)
    root, out = Path(root).resolve(), Path(out)
    if not root.is_dir():
        raise PrepareError(f"data set root not found: {root}")
    listing = read_listing(kind, root)
    classes = listing.classes
    if taxonomy is not None:
        classes = classes.assign(genus=read_taxonomy(Path(taxonomy), classes))
    images = listing.images.merge(classes[["class_id", "class_name", "genus"]], on="class_id", how="left")
    if listing.carve_val:
        images["split"] = validation_split(images, val_fraction, seed)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"kind": kind, "root": str(root), "val_fraction": val_fraction, "seed": seed}
    tally = write_manifest(listing, images, root, out, metadata, max_reject_fraction, workers, progress)
    kept_ids = np.concatenate(tally.kept_ids) if tally.kept_ids else np.array([], dtype=np.int32)
    write_tables(listing, kept_ids, out)
    return PrepareSummary(inputs=tally.kept + tally.rejected, kept=tally.kept, rejected=tally.rejected,
                          classes=len(classes), out=out)
