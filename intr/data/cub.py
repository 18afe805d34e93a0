"""List a data set in the CUB_200_2011 layout: real CUB, or the built-in synthetic birds.

The synthetic data is written in the same layout plus part masks, traits.csv
and pairs.csv, so both go through this one reader. Nothing here decodes an
image; see ``intr.data.prepare`` for that.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from analysis import tables
from intr.data.attribute_files import find_attribute_names, find_attribute_values
from intr.data.prepare import (
    PLANTED_TRAITS_COLUMNS,
    DatasetListing,
    PrepareError,
    empty_frame,
    strip_class_prefix,
)

BBOX_COLUMNS = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
# An attribute group names a part and an aspect of it ('has_bill_color');
# these groups describe the whole bird instead.
WHOLE_BIRD_ATTRIBUTES = {"size", "shape", "primary_color"}
ATTRIBUTE_ASPECTS = {"color", "shape", "pattern", "length"}


def required_file(root: Path, name: str) -> Path:
    """``root / name``, or a PrepareError naming the missing file.

    Args:
        root: data set root.
        name: file name relative to the root.
    """
    path = root / name
    if not path.is_file():
        raise PrepareError(f"required file missing: {path} (a CUB-layout data set needs it)")
    return path


def read_list_file(path: Path, columns: dict[str, type]) -> pd.DataFrame:
    """A whitespace-separated CUB list file as a DataFrame; the last column keeps its spaces ('left eye').

    Args:
        path: the file.
        columns: column names and their types (int, float or str), in file order.
    """
    rows = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            fields = line.split(maxsplit=len(columns) - 1)
            if len(fields) != len(columns):
                raise PrepareError(f"{path}:{number}: expected {len(columns)} fields "
                                   f"({' '.join(columns)}), got {line.strip()!r}")
            fields[-1] = fields[-1].strip()
            rows.append(fields)
    frame = pd.DataFrame(rows, columns=list(columns))
    for name, kind in columns.items():
        if kind is str:
            continue
        try:
            frame[name] = pd.to_numeric(frame[name]).astype(kind)
        except (ValueError, TypeError) as err:
            raise PrepareError(f"{path}: column {name} must be {kind.__name__}: {err}") from err
    return frame


def _unique_ids(frame: pd.DataFrame, column: str, path: Path) -> pd.DataFrame:
    """``frame`` sorted by ``column``, or a PrepareError naming a repeated id."""
    repeated = frame.loc[frame[column].duplicated(), column]
    if len(repeated):
        raise PrepareError(f"{path}: {column} {repeated.iloc[0]} appears more than once")
    return frame.sort_values(column, ignore_index=True)


def read_classes(root: Path) -> pd.DataFrame:
    """classes.txt as class_id (0-based in CUB id order), source_class_id, class_name (no '001.' prefix).

    Args:
        root: data set root.
    """
    path = required_file(root, "classes.txt")
    classes = _unique_ids(read_list_file(path, {"source_class_id": int, "folder": str}), "source_class_id", path)
    classes["class_id"] = np.arange(len(classes), dtype=np.int16)
    classes["class_name"] = classes["folder"].map(strip_class_prefix)
    classes["genus"] = classes["class_name"].map(lambda name: name.rsplit("_", 1)[-1])
    return classes[["class_id", "source_class_id", "class_name", "genus"]]


def _with_image_column(images: pd.DataFrame, extra: pd.DataFrame, path: Path, what: str) -> pd.DataFrame:
    """Join ``extra`` (keyed by image_id) onto ``images``; every listed image must have a row."""
    extra = _unique_ids(extra, "image_id", path)
    joined = images.merge(extra, on="image_id", how="left", indicator=True)
    lacking = joined.loc[joined["_merge"] == "left_only", "image_id"]
    if len(lacking):
        raise PrepareError(f"{path}: no {what} for image_id {lacking.iloc[0]} listed in images.txt "
                           f"({len(lacking)} image(s) lack one)")
    return joined.drop(columns="_merge")


def read_images(root: Path, classes: pd.DataFrame) -> pd.DataFrame:
    """images.txt joined with class labels, train/test split and bounding boxes, sorted by image_id.

    Args:
        root: data set root.
        classes: the output of ``read_classes``.
    """
    path = required_file(root, "images.txt")
    images = _unique_ids(read_list_file(path, {"image_id": int, "image_path": str}), "image_id", path)
    labels_path = required_file(root, "image_class_labels.txt")
    labels = read_list_file(labels_path, {"image_id": int, "source_class_id": int})
    images = _with_image_column(images, labels, labels_path, "class label")
    images = images.merge(classes[["source_class_id", "class_id"]], on="source_class_id", how="left")
    unknown = images.loc[images["class_id"].isna(), "source_class_id"]
    if len(unknown):
        raise PrepareError(f"{labels_path}: class id {unknown.iloc[0]} is not in {root / 'classes.txt'}")
    images["split"] = _source_split(root, images)
    images = _with_bounding_boxes(root, images)
    images["path"] = "images/" + images["image_path"]
    images["mask_path"] = None
    images["source_image_id"] = images["image_id"]
    return images


def _source_split(root: Path, images: pd.DataFrame) -> pd.Series:
    """'train' where train_test_split.txt says is_training=1, else 'test' (all 'train' without the file)."""
    path = root / "train_test_split.txt"
    if not path.is_file():
        warnings.warn(f"{path} not found: every image counts as a training image", stacklevel=3)
        return pd.Series("train", index=images.index)
    split = read_list_file(path, {"image_id": int, "is_training": int})
    joined = _with_image_column(images[["image_id"]], split, path, "train/test flag")
    return pd.Series(np.where(joined["is_training"] == 1, "train", "test"), index=images.index)


def _with_bounding_boxes(root: Path, images: pd.DataFrame) -> pd.DataFrame:
    """Add bbox_x/y/w/h from bounding_boxes.txt (null where the file or the image's line is absent)."""
    path = root / "bounding_boxes.txt"
    if not path.is_file():
        return images.assign(**{column: np.nan for column in BBOX_COLUMNS})
    boxes = read_list_file(path, {"image_id": int, **{column: float for column in BBOX_COLUMNS}})
    return images.merge(_unique_ids(boxes, "image_id", path), on="image_id", how="left")


def read_parts(root: Path) -> pd.DataFrame:
    """Every keypoint in parts/part_locs.txt, with its name from parts/parts.txt (empty if either is absent).

    Args:
        root: data set root.
    """
    names_path, locs_path = root / "parts" / "parts.txt", root / "parts" / "part_locs.txt"
    if not (names_path.is_file() and locs_path.is_file()):
        if names_path.is_file() or locs_path.is_file():
            warnings.warn(f"{root / 'parts'} needs both parts.txt and part_locs.txt; no parts table", stacklevel=3)
        return empty_frame("parts")
    names = _unique_ids(read_list_file(names_path, {"part_id": int, "part_name": str}), "part_id", names_path)
    locs = read_list_file(locs_path, {"image_id": int, "part_id": int, "x": float, "y": float, "visible": int})
    unknown = set(locs["part_id"]) - set(names["part_id"])
    if unknown:
        raise PrepareError(f"{locs_path}: part_id {min(unknown)} is not in {names_path}")
    parts = locs.merge(names, on="part_id", how="left")
    parts["visible"] = parts["visible"] != 0
    return parts[list(tables.schema("parts").names)]


def attribute_part(name: str) -> str | None:
    """The part an attribute describes: 'has_bill_color::red' -> 'bill', 'has_upper_tail_color::x' -> 'upper_tail'.

    Whole-bird attributes (has_size, has_shape, has_primary_color) have no part: None.

    Args:
        name: the attribute name as in attributes.txt.
    """
    group = name.split("::", 1)[0].removeprefix("has_")
    if group in WHOLE_BIRD_ATTRIBUTES:
        return None
    part, _, aspect = group.rpartition("_")
    return part if part and aspect in ATTRIBUTE_ASPECTS else group


def read_class_attributes(root: Path, classes: pd.DataFrame) -> pa.Table | None:
    """Per-class attribute strengths (0-100) in long form, or None where the data set has none.

    Args:
        root: data set root.
        classes: class_id and source_class_id of every class.
    """
    values_path = find_attribute_values(root)
    names_path = find_attribute_names(root)
    if values_path is None or names_path is None:
        if values_path or names_path:
            warnings.warn(f"found {values_path or names_path} but not its partner file "
                          "(attributes.txt / class_attribute_labels_continuous.txt): no class attributes",
                          stacklevel=3)
        return None
    names = _unique_ids(read_list_file(names_path, {"attribute_id": int, "attribute_name": str}),
                        "attribute_id", names_path)
    try:
        values = np.loadtxt(values_path, dtype=np.float32, ndmin=2)
    except ValueError as err:
        raise PrepareError(f"{values_path}: not a table of numbers: {err}") from err
    if values.shape != (len(classes), len(names)):
        raise PrepareError(f"{values_path}: expected {len(classes)} lines (one per class) of {len(names)} "
                           f"values (one per attribute in {names_path}), got shape {values.shape}")
    table = pd.DataFrame({
        "class_id": np.repeat(classes["class_id"].to_numpy(), len(names)),
        "attribute_id": np.tile(names["attribute_id"].to_numpy(), len(classes)),
        "attribute_name": np.tile(names["attribute_name"].to_numpy(), len(classes)),
        "part": np.tile(names["attribute_name"].map(attribute_part).to_numpy(), len(classes)),
        "value": values.reshape(-1),
    })
    return pa.Table.from_pandas(table, schema=tables.schema("class_attributes"), preserve_index=False)


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """A CSV read as text, or a PrepareError naming the file or its missing columns."""
    if not path.is_file():
        raise PrepareError(f"required file missing: {path} (a synthetic data set needs it)")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise PrepareError(f"{path}: missing column(s) {', '.join(missing)}")
    return table


def read_planted_traits(root: Path, classes: pd.DataFrame) -> pa.Table:
    """traits.csv (the synthetic ground truth) with the class_id of each species.

    Args:
        root: data set root.
        classes: class_id, source_class_id and class_name of every class.
    """
    path = root / "traits.csv"
    traits = _read_csv(path, PLANTED_TRAITS_COLUMNS)
    source_ids = pd.to_numeric(traits["species_id"], errors="coerce")
    named = dict(zip(classes["source_class_id"], classes["class_name"]))
    for species_id, species in zip(source_ids, traits["species"]):
        if species_id not in named:
            raise PrepareError(f"{path}: species_id {species_id} ({species}) is not in {root / 'classes.txt'}")
        if strip_class_prefix(species) != named[species_id]:
            raise PrepareError(f"{path}: species_id {int(species_id)} is {named[species_id]!r} in "
                               f"classes.txt but {species!r} here")
    traits["species_id"] = source_ids.astype(np.int16)
    traits["class_id"] = traits["species_id"].map(dict(zip(classes["source_class_id"], classes["class_id"])))
    return pa.Table.from_pandas(traits, schema=tables.open_schema("planted_traits", traits.columns), preserve_index=False)


def read_lookalike_pairs(root: Path, classes: pd.DataFrame) -> pa.Table:
    """pairs.csv (look-alike species and the parts that tell them apart) with class ids.

    Args:
        root: data set root.
        classes: class_id and class_name of every class.
    """
    path = root / "pairs.csv"
    pairs = _read_csv(path, ("species_a", "species_b", "genus", "differing_parts", "n_differing"))
    class_of = dict(zip(classes["class_name"], classes["class_id"]))
    for side in ("a", "b"):
        names = pairs[f"species_{side}"].map(strip_class_prefix)
        unknown = names[~names.isin(class_of.keys())]
        if len(unknown):
            raise PrepareError(f"{path}: species {unknown.iloc[0]!r} is not a class in {root / 'classes.txt'}")
        pairs[f"species_{side}"] = names
        pairs[f"class_{side}"] = names.map(class_of)
    pairs["differing_parts"] = pairs["differing_parts"].map(lambda text: [p for p in text.split(";") if p])
    pairs["n_differing"] = pd.to_numeric(pairs["n_differing"])
    return pa.Table.from_pandas(pairs, schema=tables.schema("lookalike_pairs"), preserve_index=False)


def genus_from_traits(traits: pa.Table, classes: pd.DataFrame, path: Path) -> pd.Series:
    """Each class's genus as traits.csv gives it (null, with a warning, for a class it does not list)."""
    genus_of = dict(zip(traits.column("class_id").to_pylist(), traits.column("genus").to_pylist()))
    genus = classes["class_id"].map(genus_of)
    absent = classes.loc[genus.isna(), "class_name"].tolist()
    if absent:
        warnings.warn(f"{path} lists no genus for {len(absent)} class(es): {', '.join(absent[:5])}", stacklevel=3)
    return genus.astype(object).where(genus.notna(), None)


def mask_paths(root: Path, image_paths: pd.Series) -> pd.Series:
    """masks/<same path as under images/>.png for each image; null (with a warning) where the mask is absent.

    Args:
        root: data set root.
        image_paths: image paths relative to images/.
    """
    masks = image_paths.map(lambda p: (Path("masks") / p).with_suffix(".png").as_posix())
    exists = masks.map(lambda p: (root / p).is_file())
    if not exists.all():
        warnings.warn(f"{(~exists).sum()} of {len(masks)} images have no mask, e.g. {root / masks[~exists].iloc[0]}",
                      stacklevel=3)
    return masks.where(exists, None)


def read_cub(root: Path, synthetic: bool = False) -> DatasetListing:
    """List a CUB-layout data set: images, classes, parts, attributes (and, if synthetic, traits and pairs).

    Args:
        root: the CUB_200_2011 folder (or the synthetic data set root).
        synthetic: also read masks/, traits.csv and pairs.csv; genus comes from traits.csv.
    """
    classes = read_classes(root)
    images = read_images(root, classes)
    extra_tables = {}
    attributes = read_class_attributes(root, classes)
    if attributes is not None:
        extra_tables["class_attributes"] = attributes
    if synthetic:
        extra_tables["planted_traits"] = read_planted_traits(root, classes)
        extra_tables["lookalike_pairs"] = read_lookalike_pairs(root, classes)
        classes = classes.assign(genus=genus_from_traits(extra_tables["planted_traits"], classes, root / "traits.csv"))
        images["mask_path"] = mask_paths(root, images["image_path"])
    columns = ["image_id", "path", "class_id", "split", *BBOX_COLUMNS, "mask_path", "source_image_id"]
    return DatasetListing(images=images[columns], classes=classes[["class_id", "class_name", "genus"]],
                          parts=read_parts(root), unread_rejects=empty_frame("rejected"), tables=extra_tables)
