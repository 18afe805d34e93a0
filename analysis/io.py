"""Reading the pipeline's tables without knowing pyarrow.

    >>> from analysis import io
    >>> preds = io.load("results/synthetic/prompt_cam/predictions.parquet")
    >>> keys, maps = io.maps("results/synthetic/prompt_cam/attention.parquet", image_id=12)
    >>> m = io.map_of("results/synthetic/prompt_cam/attention.parquet", image_id=12, query_class=3)
    >>> m.shape    # (heads, grid_h, grid_w)

``load`` turns fixed-size list columns (attention maps, features, top-5
lists) into one numpy array per row; ``maps`` returns them stacked as one
(N, grid_h, grid_w) float32 array beside a DataFrame of the other columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from analysis.tables import fixed_list_to_numpy, read_metadata

MAP_COLUMN = "attn"


metadata = read_metadata  # a table's key-value metadata (JSON values decoded)


def _filter(table_path: str | Path, where: dict[str, Any]) -> Any:
    expr = None
    for column, value in where.items():
        if value is None:
            continue
        field = pc.field(column)
        term = field.isin(list(value)) if isinstance(value, (list, tuple, set, np.ndarray)) else field == value
        expr = term if expr is None else expr & term
    return expr


def read(path: str | Path, columns: Sequence[str] | None = None, **where: Any) -> pa.Table:
    """The Arrow table, optionally only some columns and rows (``column=value`` or a list of values)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such table (has its pipeline stage run?)")
    return pq.read_table(path, columns=list(columns) if columns else None, filters=_filter(path, where))


def load(path: str | Path, columns: Sequence[str] | None = None, **where: Any) -> pd.DataFrame:
    """A table as a DataFrame; fixed-size list columns become one numpy array per cell."""
    table = read(path, columns, **where)
    frame = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_fixed_size_list(column.type):
            values = fixed_list_to_numpy(column, np.float32 if pa.types.is_floating(column.type.value_type)
                                         else np.int64)
            frame[name] = list(values)
        else:
            frame[name] = column.to_pandas()
    return pd.DataFrame(frame)


def grid_of(path: str | Path) -> tuple[int, int]:
    """(grid_h, grid_w) of a map table, from its metadata."""
    meta = metadata(path)
    return int(meta["grid_h"]), int(meta["grid_w"])


def maps(path: str | Path, column: str = MAP_COLUMN, **where: Any) -> tuple[pd.DataFrame, np.ndarray]:
    """(keys, maps): the other columns as a DataFrame and the maps as (N, grid_h, grid_w) float32."""
    table = read(path, **where)
    gh, gw = grid_of(path)
    values = fixed_list_to_numpy(table.column(column)).reshape(-1, gh, gw)
    keys = table.drop_columns([column]).to_pandas()
    return keys, values


def map_of(path: str | Path, image_id: int, query_class: int | None = None, **where: Any) -> np.ndarray:
    """One image's maps for one class: (heads, grid_h, grid_w), heads in index order.

    Without ``query_class`` the row with ``query_role == "true"`` is used.
    """
    if query_class is None and "query_role" in pq.read_schema(path).names:
        where.setdefault("query_role", "true")
    if query_class is not None:
        where["query_class"] = query_class
    keys, values = maps(path, image_id=image_id, **where)
    if not len(keys):
        raise KeyError(f"{path}: no map for image_id={image_id}, query_class={query_class}, {where}")
    order = np.argsort(keys["head"].to_numpy()) if "head" in keys else np.arange(len(keys))
    return values[order]
