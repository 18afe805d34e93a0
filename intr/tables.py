"""Parquet tables: the only interface between pipeline stages.

Every table is written zstd-compressed, to a temporary name in the target
folder and renamed into place, so a reader never sees a half-written file and
an interrupted run leaves either the old file or none.  Each file carries
``schema_version`` (and any extra key-value pairs the writer passes) in its
Parquet key-value metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "1"
COMPRESSION = "zstd"


def _encode_metadata(metadata: Mapping[str, Any] | None) -> dict[bytes, bytes]:
    out = {b"schema_version": SCHEMA_VERSION.encode()}
    for key, value in (metadata or {}).items():
        text = value if isinstance(value, str) else json.dumps(value)
        out[str(key).encode()] = text.encode()
    return out


def with_metadata(schema: pa.Schema, metadata: Mapping[str, Any] | None = None) -> pa.Schema:
    """Return ``schema`` carrying ``schema_version`` plus ``metadata``."""
    merged = dict(schema.metadata or {})
    merged.update(_encode_metadata(metadata))
    return schema.with_metadata(merged)


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


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
        schema: the Arrow schema to cast a DataFrame to (keeps ids narrow).
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
    closed without an exception; on error the temporary file is removed.

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
        self.schema = with_metadata(schema.remove_metadata(), {**_decode_metadata(schema.metadata), **(metadata or {})})
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


def _decode_metadata(raw: Mapping[bytes, bytes] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        k = key.decode()
        if k in ("pandas", "ARROW:schema"):
            continue
        text = value.decode()
        try:
            out[k] = json.loads(text)
        except json.JSONDecodeError:
            out[k] = text
    return out


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Key-value metadata of a table written by this module (JSON decoded)."""
    meta = pq.read_schema(path).metadata
    decoded = _decode_metadata(meta)
    if "schema_version" in decoded:
        decoded["schema_version"] = str(decoded["schema_version"])
    return decoded


def read_table(path: str | os.PathLike, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a table as a DataFrame, with a clear error naming a missing file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"table not found: {path}")
    return pq.read_table(path, columns=columns).to_pandas()
