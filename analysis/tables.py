"""The pipeline's tables: every schema, and how a table is written and read.

Parquet tables are the only road between the stages, so their layouts live
here, once, for both packages (``intr`` writes most of them, ``analysis``
reads them and writes its own; this module imports no torch).
``docs/tables.md`` lists the same columns; a test holds the two together.

Every table is written zstd-compressed, to a temporary name in the target
folder and renamed into place, so a reader never sees a half-written file and
an interrupted run leaves either the old file or none.  Each file carries
``schema_version`` (and any extra key-value pairs the writer passes, JSON
encoded) in its Parquet key-value metadata.

Fixed-size list columns (maps, features, profiles) have a width that depends
on the run (``cells`` = grid_h * grid_w, ``feature_dim``, ``regions``); they
are named here and given to :func:`schema` as keyword arguments.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "1"
COMPRESSION = "zstd"
_SKIPPED_METADATA = ("pandas", "ARROW:schema")


# ----------------------------------------------------------------------------- schemas


@dataclass(frozen=True)
class Column:
    """One column: its name and Arrow type; ``width`` names the run-dependent size of a fixed-size list."""

    name: str
    type: pa.DataType
    width: str | None = None


def _c(name: str, type_: pa.DataType, width: str | None = None) -> Column:
    return Column(name, type_, width)


_i8, _i16, _i32, _i64 = pa.int8(), pa.int16(), pa.int32(), pa.int64()
_f16, _f32, _f64, _str, _bool = pa.float16(), pa.float32(), pa.float64(), pa.string(), pa.bool_()

EVALUATION = (_c("method", _str), _c("metric", _str), _c("split", _str), _c("value", _f64),
              _c("ci_lo", _f64), _c("ci_hi", _f64), _c("n", _i64))
EVALUATION_COLUMNS = tuple(c.name for c in EVALUATION)

# Every table, by the stem of its file name (``{name}.parquet``).
TABLES: dict[str, tuple[Column, ...]] = {
    # -- data (intr prepare)
    "manifest": (_c("image_id", _i32), _c("path", _str), _c("class_id", _i16), _c("class_name", _str),
                 _c("split", _str), _c("width", _i32), _c("height", _i32), _c("bbox_x", _f32), _c("bbox_y", _f32),
                 _c("bbox_w", _f32), _c("bbox_h", _f32), _c("genus", _str), _c("mode", _str),
                 _c("mask_path", _str), _c("source_image_id", _i32)),
    "parts": (_c("image_id", _i32), _c("part_id", _i16), _c("part_name", _str), _c("x", _f32), _c("y", _f32),
              _c("visible", _bool)),
    "rejected": (_c("path", _str), _c("reason", _str), _c("detail", _str)),
    "class_attributes": (_c("class_id", _i16), _c("attribute_id", _i16), _c("attribute_name", _str),
                         _c("part", _str), _c("value", _f32)),
    "planted_traits": (_c("species_id", _i16), _c("species", _str), _c("genus", _str), _c("part", _str),
                       _c("colour", _str), _c("pattern", _str), _c("state", _str), _c("class_id", _i16)),
    "lookalike_pairs": (_c("class_a", _i16), _c("class_b", _i16), _c("species_a", _str), _c("species_b", _str),
                        _c("genus", _str), _c("differing_parts", pa.list_(_str)), _c("n_differing", _i16)),
    # -- training (intr train)
    "train_log": (_c("epoch", _i64), _c("train_loss", _f64), _c("train_acc", _f64), _c("val_acc", _f64),
                  _c("lr", _f64), _c("seconds", _f64)),
    # -- part discovery (intr discover)
    "discovered_parts": (_c("image_id", _i32), _c("labels", _i8, "cells"), _c("frame_row", _f32),
                         _c("frame_col", _f32), _c("frame_spread", _f32), _c("frame_mirrored", _bool)),
    # -- extraction (intr extract)
    "predictions": (_c("image_id", _i32), _c("label", _i16), _c("pred", _i16), _c("correct", _bool),
                    _c("prob_true", _f32), _c("top5_ids", pa.list_(_i16, 5)), _c("top5_probs", pa.list_(_f32, 5))),
    "attention": (_c("image_id", _i32), _c("query_class", _i16), _c("query_role", _str), _c("head", _i8),
                  _c("head_rank", _i8), _c("attn", _f16, "cells")),
    "head_ranks": (_c("image_id", _i32), _c("class_id", _i16), _c("head", _i8), _c("rank", _i8),
                   _c("prob_after_blur", _f32)),
    "pair_head_ranks": (_c("image_id", _i32), _c("class_a", _i16), _c("class_b", _i16), _c("head", _i8),
                        _c("rank", _i8), _c("margin_after_blur", _f32)),
    "region_effects": (_c("image_id", _i32), _c("class_a", _i16), _c("class_b", _i16), _c("region", _str),
                       _c("area", _f32), _c("margin", _f32), _c("margin_drop", _f32), _c("prob_a_drop", _f32)),
    "trait_features": (_c("image_id", _i32), _c("class_id", _i16), _c("head", _i8), _c("rank", _i8),
                       _c("feature", _f16, "feature_dim")),
    "lookalikes": (_c("class_a", _i16), _c("class_b", _i16), _c("source", _str)),
    # -- counterfactual renders (intr counterfactual, synthetic data)
    "counterfactuals": (_c("image_id", _i32), _c("class_a", _i16), _c("class_b", _i16), _c("part", _str),
                        _c("kind", _str), _c("state", _str), _c("margin_before", _f32), _c("margin_after", _f32),
                        _c("pred_after", _i16)),
    "counterfactual_examples": (_c("image_id", _i32), _c("class_a", _i16), _c("class_b", _i16), _c("part", _str),
                                _c("kind", _str), _c("margin", _f32), _c("pred", _i16), _c("png", pa.binary())),
    # -- faithfulness (intr faithfulness)
    "baseline_maps": (_c("image_id", _i32), _c("method", _str), _c("class_id", _i16), _c("attn", _f16, "cells")),
    # -- analysis (intr analyze)
    "head_types": (_c("head", _i8), _c("head_type", _i16), _c("dominant_region", _str),
                   _c("profile", _f32, "regions"), _c("type_dominant_region", _str), _c("consistency", _f32),
                   _c("n_maps", _i32)),
    "traits": (_c("trait", _i16), _c("name", _str), _c("dominant_region", _str), _c("purity", _f32),
               _c("size", _i32), _c("classes", pa.list_(_i16)), _c("class_counts", pa.list_(_i32)),
               _c("representatives", pa.list_(_i32))),
    "trait_members": (_c("member", _i32), _c("image_id", _i32), _c("class_id", _i16), _c("head", _i8),
                      _c("rank", _i8), _c("trait", _i16), _c("umap_x", _f32), _c("umap_y", _f32),
                      _c("dominant_region", _str)),
    "regions": (_c("class_id", _i16), _c("region", _str), _c("mass", _f32), _c("mass_lo", _f32), _c("mass_hi", _f32),
                _c("density", _f32), _c("density_lo", _f32), _c("density_hi", _f32), _c("area", _f32),
                _c("n_images", _i32), _c("rank", _i16), _c("heads", pa.list_(_i8)), _c("trait", _i16),
                _c("correct_only", _bool)),
    "contrasts": (_c("class_a", _i16), _c("class_b", _i16), _c("region", _str), _c("density_a", _f32),
                  _c("difference", _f32), _c("occlusion", _f32), _c("pair_attention", _f32), _c("combined", _f32),
                  _c("rank_density", _i16), _c("rank_difference", _i16), _c("rank_occlusion", _i16),
                  _c("rank_pair_attention", _i16), _c("rank_combined", _i16),
                  _c("p_value", _f32), _c("q_value", _f32), _c("n_images", _i32), _c("planted", _bool),
                  _c("area", _f32)),
    # -- metric tables, all in the evaluation layout
    "metrics_model": EVALUATION,
    "metrics_faithfulness": EVALUATION,
    "metrics_analysis": EVALUATION,
    "evaluation": EVALUATION,
}

# planted_traits keeps any further columns of the data set's traits.csv, as strings, before class_id.
OPEN_TABLES = ("planted_traits",)


def schema(name: str, **widths: int) -> pa.Schema:
    """The Arrow schema of table ``name``.

    Args:
        name: a key of ``TABLES`` (the file stem, e.g. ``"attention"``).
        **widths: the size of each fixed-size list the table has (``cells``,
            ``feature_dim``, ``regions``).
    """
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
    fields = []
    for column in TABLES[name]:
        if column.width is None:
            fields.append(pa.field(column.name, column.type))
            continue
        if column.width not in widths:
            raise TypeError(f"schema({name!r}) needs {column.width}= (the width of column {column.name!r})")
        fields.append(pa.field(column.name, pa.list_(column.type, int(widths[column.width]))))
    return pa.schema(fields)


def open_schema(name: str, columns: Sequence[str]) -> pa.Schema:
    """Schema of an open table (``OPEN_TABLES``): its own columns typed, any other column a string."""
    known = {f.name: f.type for f in schema(name)}
    return pa.schema([(c, known.get(c, _str)) for c in columns])


def type_name(type_: pa.DataType, width: str | None = None) -> str:
    """How docs/tables.md spells a column type: ``int16``, ``list<string>``, ``fixed_size_list<float16>[cells]``."""
    if width is not None:
        return f"fixed_size_list<{type_name(type_)}>[{width}]"
    if pa.types.is_fixed_size_list(type_):
        return f"fixed_size_list<{type_name(type_.value_type)}>[{type_.list_size}]"
    if pa.types.is_list(type_):
        return f"list<{type_name(type_.value_type)}>"
    return {"bool": "bool", "halffloat": "float16", "float": "float32", "double": "float64"}.get(str(type_), str(type_))


def describe(name: str) -> str:
    """The columns of table ``name`` as docs/tables.md lists them: ``image_id int32, label int16, ...``."""
    return ", ".join(f"{c.name} {type_name(c.type, c.width)}" for c in TABLES[name])


# ----------------------------------------------------------------------------- fixed-size lists


def fixed_list_array(values: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    """(rows, width) numpy array -> ``fixed_size_list<value_type>[width]``."""
    values = np.ascontiguousarray(values)
    flat = pa.array(values.reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array, dtype=np.float32) -> np.ndarray:
    """(rows, width) array from a fixed_size_list column."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = array.type.list_size
    return array.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(-1, width)


# ----------------------------------------------------------------------------- metadata


def encode_metadata(metadata: Mapping[str, Any] | None) -> dict[bytes, bytes]:
    """Key-value metadata as Parquet stores it: ``schema_version`` first, values that are not strings as JSON."""
    out = {b"schema_version": SCHEMA_VERSION.encode()}
    for key, value in (metadata or {}).items():
        text = value if isinstance(value, str) else json.dumps(value)
        out[str(key).encode()] = text.encode()
    return out


def decode_metadata(raw: Mapping[bytes, bytes] | None) -> dict[str, Any]:
    """The inverse of :func:`encode_metadata` (JSON values decoded; pyarrow's own keys left out)."""
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        k = key.decode()
        if k in _SKIPPED_METADATA:
            continue
        text = value.decode()
        try:
            out[k] = json.loads(text)
        except json.JSONDecodeError:
            out[k] = text
    if "schema_version" in out:
        out["schema_version"] = str(out["schema_version"])
    return out


def with_metadata(schema_: pa.Schema, metadata: Mapping[str, Any] | None = None) -> pa.Schema:
    """Return ``schema_`` carrying ``schema_version`` plus ``metadata``."""
    merged = dict(schema_.metadata or {})
    merged.update(encode_metadata(metadata))
    return schema_.with_metadata(merged)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Key-value metadata of a table written by this module (JSON decoded)."""
    return decode_metadata(pq.read_schema(path).metadata)


# ----------------------------------------------------------------------------- writing


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _process_is_running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` left by writers that were killed (``.NAME.tmp-PID`` whose
    process no longer runs), so an interrupted run does not leave them behind for good.

    A temporary of this process or of a live one is kept (another writer may be at work; the
    workflow never runs two jobs for one output, so a live PID here is a writer or a recycled id).

    Args:
        path: the table's final path.

    Returns:
        The temporaries removed.
    """
    path = Path(path)
    prefix = f".{path.name}.tmp-"
    if not path.parent.is_dir():
        return []
    removed = []
    for candidate in path.parent.iterdir():
        pid = candidate.name.removeprefix(prefix)
        if candidate.name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() \
                and not _process_is_running(int(pid)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def write_table(
    table: pa.Table | pd.DataFrame,
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    schema: pa.Schema | None = None,
) -> Path:
    """Write a whole table atomically.

    Args:
        table: an Arrow table or a DataFrame (converted without its index).
        path: destination ``.parquet`` file; parent folders are created.
        metadata: extra key-value metadata (values that are not strings are
            stored as JSON).
        schema: the Arrow schema to cast to (keeps ids narrow); usually
            ``tables.schema(name)``.
    """
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, schema=schema, preserve_index=False)
    elif schema is not None:
        table = table.cast(schema)
    with ParquetStreamWriter(path, table.schema, metadata) as writer:
        writer.write(table)
    return Path(path)


class ParquetStreamWriter:
    """Write a table batch by batch, atomically.

    Rows go to disk as they are produced, so memory does not grow with the
    data set.  The file appears under its final name only when the writer is
    closed without an exception; on error the temporary file is removed, and
    the temporaries of writers killed before they could remove theirs are
    removed when the next writer of the same file starts.

    Args:
        path: destination ``.parquet`` file.
        schema: Arrow schema of every batch.
        metadata: extra key-value metadata for the file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        schema: pa.Schema,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        self.schema = with_metadata(schema.remove_metadata(), {**decode_metadata(schema.metadata), **(metadata or {})})
        self._tmp = _temporary_name(self.path)
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression=COMPRESSION)
        self.rows = 0

    def write(self, batch: pa.Table | pa.RecordBatch | pd.DataFrame | Iterable[Mapping[str, Any]]) -> None:
        """Append rows: an Arrow table/batch, a DataFrame or a list of dicts."""
        if isinstance(batch, pd.DataFrame):
            batch = pa.Table.from_pandas(batch, schema=self.schema, preserve_index=False)
        elif isinstance(batch, (list, tuple)):
            batch = pa.Table.from_pylist(list(batch), schema=self.schema)
        elif isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        if batch.num_rows == 0:
            return
        batch = batch.cast(self.schema)
        self._writer.write_table(batch)
        self.rows += batch.num_rows

    def close(self) -> None:
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ParquetStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ----------------------------------------------------------------------------- reading


def read_table(path: str | os.PathLike, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a table as a DataFrame, with a clear error naming a missing file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such table (has its pipeline stage run?)")
    return pq.read_table(path, columns=columns).to_pandas()



def table_from_columns(schema_: pa.Schema, columns: Mapping[str, Any]) -> pa.Table:
    """An Arrow table of ``schema_`` from one array (or list) per column; 2-D arrays fill fixed-size lists."""
    arrays = []
    for field in schema_:
        value = columns[field.name]
        if pa.types.is_fixed_size_list(field.type):
            arrays.append(fixed_list_array(np.asarray(value), field.type.value_type))
        else:
            arrays.append(pa.array(np.asarray(value) if not isinstance(value, list) else value, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema_.remove_metadata())


def write_columns(name: str, columns: Mapping[str, Any], path: str | os.PathLike,
                  metadata: Mapping[str, Any] | None = None, **widths: int) -> Path:
    """Write table ``name`` from one array per column (the widths of its fixed-size lists are read off the data).

    Args:
        name: a key of ``TABLES``.
        columns: column name -> 1-D array or list (2-D array for a fixed-size list column).
        path: destination ``.parquet`` file.
        metadata: extra key-value metadata.
        **widths: fixed-size list widths that cannot be read off the data (none usually).
    """
    for column in TABLES[name]:
        if column.width is not None and column.width not in widths:
            widths[column.width] = int(np.asarray(columns[column.name]).shape[1])
    return write_table(table_from_columns(schema(name, **widths), columns), path, metadata)
