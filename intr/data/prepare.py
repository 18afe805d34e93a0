"""The ``prepare`` stage: read a data set into manifest, parts and rejected tables.

Every listed image is decoded exactly once. An image that decodes goes to
``manifest.parquet``; one that does not goes to ``rejected.parquet`` with a
reason, so that inputs = manifest rows + rejected rows, always. The readers of
each layout (``intr.data.cub``, ``intr.data.imagefolder``) only list what the
data set says; decoding, splitting and writing happen here, the same for all.

Pixels are read as ``analysis.pixels`` says, the same way the networks read
them later: 16-bit images scaled to 8 bits, EXIF orientation not applied, so
width, height, keypoints, boxes and masks are all in the stored frame. What
the run kept but a user should know (keypoints outside their image marked
invisible, EXIF-rotated images, images above Pillow's size limit) is counted
in ``PrepareSummary.notes``.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import warnings
from contextlib import closing
from collections import Counter
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
from analysis.pixels import exif_orientation, open_image, over_size_limit, to_rgb8

KINDS = ("cub", "imagefolder", "synthetic")
DECODE_BATCH = 512
# Every value rejected.parquet's reason column can take. ImageFolder only: no_class (a file outside any
# class folder), broken_link (a symbolic link whose target does not exist), link_loop (a linked folder
# that contains itself), not_a_file (a pipe, socket or device). too_large: above twice Pillow's
# decompression-bomb limit, PIL.Image.MAX_IMAGE_PIXELS.
REJECT_REASONS = ("missing", "empty", "not_an_image", "truncated", "unreadable", "too_large", "no_class",
                  "broken_link", "link_loop", "not_a_file")
EXAMPLES_SHOWN = 3

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
        class_folders: for a layout with one folder per class and split
            (ImageFolder): folder (relative posix path, e.g. 'train/Foo') and
            class_id of each, so that an empty folder is caught; None otherwise.
    """

    images: pd.DataFrame
    classes: pd.DataFrame
    parts: pd.DataFrame
    unread_rejects: pd.DataFrame
    carve_val: bool = True
    tables: dict[str, pa.Table] = field(default_factory=dict)
    class_folders: pd.DataFrame | None = None


@dataclass
class PrepareSummary:
    """Counts of one ``prepare`` run: inputs = kept + rejected, and what was kept but needs a word.

    Attributes:
        inputs: files listed.
        kept: rows of manifest.parquet.
        rejected: rows of rejected.parquet.
        classes: number of classes.
        out: the output folder.
        keypoints_outside: part keypoints marked visible but outside their image, set invisible.
        notes: one sentence per such finding, for the user.
    """

    inputs: int
    kept: int
    rejected: int
    classes: int
    out: Path
    keypoints_outside: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """The count line, e.g. 'inputs 1200 = manifest 1198 + rejected 2 (12 classes) -> DIR', then a
        'note: ...' line per note."""
        line = (f"inputs {self.inputs} = manifest {self.kept} + rejected {self.rejected} "
                f"({self.classes} classes) -> {self.out}")
        return "\n".join([line, *(f"note: {note}" for note in self.notes)])


class DecodedImage(NamedTuple):
    """What decoding one file found: its size, mode, EXIF orientation and whether it is above Pillow's
    size limit; or why it cannot be used."""

    width: int | None
    height: int | None
    mode: str | None
    reason: str | None
    detail: str | None
    orientation: int = 1
    large: bool = False


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
        with open_image(path) as image:
            image.load()
            to_rgb8(image)
            return DecodedImage(image.width, image.height, image.mode, None, None,
                                exif_orientation(image), over_size_limit(image))
    except FileNotFoundError as err:
        return DecodedImage(None, None, None, "missing", str(err))
    except Image.DecompressionBombError as err:
        return DecodedImage(None, None, None, "too_large",
                            f"{err} (twice PIL.Image.MAX_IMAGE_PIXELS): downscale the file")
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
    """Running counts of the decoding pass, plus a few examples for the messages.

    kept_sizes: image_id, width, height of each kept batch (for the keypoint check);
    kept_per_folder: kept images per class (by class_id) and per 'split/class' folder;
    rotated, large: paths of kept images with an EXIF orientation != 1 / above Pillow's size limit.
    """

    kept_sizes: list[pd.DataFrame] = field(default_factory=list)
    kept: int = 0
    rejected: int = 0
    examples: list[str] = field(default_factory=list)
    kept_per_class: Counter = field(default_factory=Counter)
    kept_per_folder: Counter = field(default_factory=Counter)
    rejected_per_folder: Counter = field(default_factory=Counter)
    rotated: list[str] = field(default_factory=list)
    large: list[str] = field(default_factory=list)

    def add_kept(self, kept: pd.DataFrame) -> None:
        self.kept += len(kept)
        self.kept_sizes.append(kept[["image_id", "width", "height"]])
        self.kept_per_class.update(kept["class_id"].astype(int))
        self.kept_per_folder.update(class_folder_of(kept["path"]))

    def add_rejects(self, rejects: pd.DataFrame) -> None:
        self.rejected += len(rejects)
        self.rejected_per_folder.update(class_folder_of(rejects["path"]))
        for path, reason in zip(rejects["path"], rejects["reason"]):
            if len(self.examples) == 5:
                break
            self.examples.append(f"{path} ({reason})")


def class_folder_of(paths: pd.Series) -> list[str]:
    """'train/Foo/sub/a.png' -> 'train/Foo': the first two parts of each relative path (ImageFolder's class folder).

    Args:
        paths: relative posix paths.
    """
    return ["/".join(path.split("/", 2)[:2]) for path in paths]


def counted(what: str, paths: list[str]) -> str:
    """'<what>: 4 image(s), e.g. a.jpg, b.jpg, c.jpg ...' (at most EXAMPLES_SHOWN named).

    Args:
        what: what the images have in common.
        paths: the files counted.
    """
    more = " ..." if len(paths) > EXAMPLES_SHOWN else ""
    return f"{what}: {len(paths)} image(s), e.g. {', '.join(paths[:EXAMPLES_SHOWN])}{more}"


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
    tally.add_kept(kept)
    tally.rotated += batch.loc[ok & (found["orientation"] != 1), "path"].tolist()
    tally.large += batch.loc[ok & found["large"].astype(bool), "path"].tolist()
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
    imageless = classes_without_images(listing, tally, out / "rejected.parquet")
    if imageless:
        manifest.abort()
        _remove_outputs(out, ("manifest", "parts", *OPTIONAL_TABLES))
        raise PrepareError(imageless)
    manifest.close()
    return tally


def classes_without_images(listing: DatasetListing, tally: _Tally, rejected_path: Path) -> str | None:
    """The error for class folders (ImageFolder) or classes (CUB layout) left with no kept image, or None.

    A class without images would still get an output of the classifier, and
    train, evaluate and extract would run without a word about it.

    Args:
        listing: the data set listing (its classes and, for ImageFolder, class folders).
        tally: counts of the decoding pass.
        rejected_path: rejected.parquet, named in the message.
    """
    if listing.class_folders is not None:
        empty = [folder for folder in listing.class_folders["folder"] if tally.kept_per_folder[folder] == 0]
        found = [f"'{folder}' ({tally.rejected_per_folder[folder]} file(s) rejected, see {rejected_path})"
                 if tally.rejected_per_folder[folder] else f"'{folder}'" for folder in empty]
        if len(found) == 1:
            return f"class folder {found[0]} holds no readable image: remove it or add images"
        if found:
            return f"class folders {', '.join(found)} hold no readable image: remove them or add images"
        return None
    classes = listing.classes
    empty = classes.loc[[tally.kept_per_class[int(c)] == 0 for c in classes["class_id"]], "class_name"].tolist()
    if not empty:
        return None
    return (f"{len(empty)} class(es) have no readable image: {', '.join(map(repr, empty[:10]))}"
            f"{' ...' if len(empty) > 10 else ''} (rejections: {rejected_path}); list images for them "
            f"or remove them from classes.txt")


def mark_keypoints_outside(parts: pd.DataFrame, sizes: pd.DataFrame) -> tuple[pd.DataFrame, int, str | None]:
    """Parts with visible keypoints outside their image (x<0, y<0, x>=width, y>=height) set invisible.

    The coordinates are kept as the data set gives them. Returns the parts, the
    number of keypoints changed and a note saying so with an example (None when none changed).

    Args:
        parts: the parts table of the kept images.
        sizes: image_id, width, height of the kept images (stored frame).
    """
    joined = parts[["image_id", "x", "y", "visible"]].merge(sizes, on="image_id", how="left")
    outside = (joined["visible"] & ((joined["x"] < 0) | (joined["y"] < 0) | (joined["x"] >= joined["width"])
                                    | (joined["y"] >= joined["height"]))).to_numpy()
    if not outside.any():
        return parts, 0, None
    first = joined[outside].iloc[0]
    example = parts[outside].iloc[0]
    note = (f"{int(outside.sum())} part keypoints outside their image marked invisible, e.g. image_id "
            f"{int(example['image_id'])} part {int(example['part_id'])} ({example['part_name']}) at "
            f"({example['x']:g}, {example['y']:g}) in a {int(first['width'])} x {int(first['height'])} image")
    return parts.assign(visible=parts["visible"].to_numpy() & ~outside), int(outside.sum()), note


def write_tables(listing: DatasetListing, sizes: pd.DataFrame, out: Path) -> tuple[int, str | None]:
    """Write parts.parquet (kept images only, keypoints outside the image invisible) and the further tables.

    Returns the number of keypoints marked invisible and the note saying so.

    Args:
        listing: the data set listing.
        sizes: image_id, width, height of the images in the manifest.
        out: output folder.
    """
    parts = listing.parts[listing.parts["image_id"].isin(sizes["image_id"])]
    parts, outside, note = mark_keypoints_outside(parts.sort_values(["image_id", "part_id"], ignore_index=True), sizes)
    write_table(parts, out / "parts.parquet", schema=tables.schema("parts"))
    for name, table in listing.tables.items():
        write_table(table, out / f"{name}.parquet")
    _remove_outputs(out, tuple(name for name in OPTIONAL_TABLES if name not in listing.tables))
    return outside, note


def pixel_notes(tally: _Tally) -> list[str]:
    """Notes on kept images whose pixels need a word: EXIF-rotated ones and ones above Pillow's size limit.

    Args:
        tally: counts of the decoding pass.
    """
    notes = []
    if tally.rotated:
        notes.append(counted("EXIF orientation tag other than 1 (a photo viewer shows the image rotated or "
                             "mirrored)", tally.rotated)
                     + "; they are used as stored, the frame of their keypoints, boxes and masks and of the "
                       "report's crops. To use the viewer's frame, rotate the files themselves "
                       "(e.g. mogrify -auto-orient) and prepare again")
    if tally.large:
        notes.append(counted(f"more pixels than Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} "
                             "(PIL.Image.MAX_IMAGE_PIXELS), kept", tally.large)
                     + "; decoding each takes much memory: downscale them if they are not meant to be this large")
    return notes


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
    sizes = pd.concat(tally.kept_sizes, ignore_index=True) if tally.kept_sizes else \
        pd.DataFrame({"image_id": [], "width": [], "height": []})
    keypoints_outside, keypoint_note = write_tables(listing, sizes, out)
    notes = ([keypoint_note] if keypoint_note else []) + pixel_notes(tally)
    return PrepareSummary(inputs=tally.kept + tally.rejected, kept=tally.kept, rejected=tally.rejected,
                          classes=len(classes), out=out, keypoints_outside=keypoints_outside, notes=notes)
