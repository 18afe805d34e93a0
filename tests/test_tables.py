"""The one home of the table layouts: docs agree with it, writing is atomic and typed, metadata round-trips."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import tables

from conftest import REPO_ROOT

DOC_ROW = re.compile(r"^\| `(\w+)\.parquet` \| (.+?) \|$")


def _documented() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (REPO_ROOT / "docs" / "tables.md").read_text().splitlines():
        match = DOC_ROW.match(line)
        if match:
            found.setdefault(match.group(1), []).append(match.group(2))
    return found


def test_docs_list_every_table_with_the_columns_of_its_schema():
    documented = _documented()
    assert sorted(documented) == sorted(tables.TABLES)
    for name, rows in documented.items():
        assert rows == [tables.describe(name)], name


def test_schema_fills_run_dependent_widths_and_asks_for_missing_ones():
    s = tables.schema("attention", cells=12)
    assert s.field("attn").type == pa.list_(pa.float16(), 12)
    assert s.field("head").type == pa.int8()
    with pytest.raises(TypeError, match="cells"):
        tables.schema("attention")
    with pytest.raises(KeyError, match="unknown table 'atention'"):
        tables.schema("atention")


def test_write_columns_casts_to_the_schema_and_keeps_metadata(tmp_path):
    path = tmp_path / "baseline_maps.parquet"
    maps = np.full((2, 4), 0.25, np.float32)
    tables.write_columns("baseline_maps", {"image_id": [7, 9], "method": ["gradcam", "rollout"],
                                           "class_id": np.array([1, 2]), "attn": maps}, path,
                         {"grid_h": 2, "grid_w": 2, "regions": ["crown", "beak"]})
    read = pq.read_table(path)
    assert read.schema.remove_metadata() == tables.schema("baseline_maps", cells=4)
    assert tables.fixed_list_to_numpy(read.column("attn")).tolist() == maps.tolist()
    assert tables.read_metadata(path) == {"schema_version": tables.SCHEMA_VERSION, "grid_h": 2, "grid_w": 2,
                                          "regions": ["crown", "beak"]}


def test_failed_stream_leaves_no_file(tmp_path):
    path = tmp_path / "rejected.parquet"
    with pytest.raises(RuntimeError):
        with tables.ParquetStreamWriter(path, tables.schema("rejected")) as writer:
            writer.write([{"path": "a.jpg", "reason": "empty", "detail": ""}])
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_open_table_keeps_extra_columns_as_strings():
    s = tables.open_schema("planted_traits", ["species_id", "species", "bill_length", "class_id"])
    assert [(f.name, str(f.type)) for f in s] == [("species_id", "int16"), ("species", "string"),
                                                 ("bill_length", "string"), ("class_id", "int16")]


def test_no_module_of_analysis_imports_torch():
    """Every analysis module, imported in a fresh interpreter, with torch made unimportable."""
    modules = sorted(p.stem for p in (REPO_ROOT / "analysis").glob("*.py") if p.stem != "__init__")
    code = ("import sys, importlib\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.') or name == 'intr' or name.startswith('intr.'):\n"
            "            raise ImportError('analysis must not import ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module('analysis.' + m)\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_a_killed_writers_temporary_is_removed_when_the_next_writer_of_that_file_starts(tmp_path):
    path = tmp_path / "rejected.parquet"
    killed = ("import os, signal, sys\n"
              "from analysis import tables\n"
              "writer = tables.ParquetStreamWriter(sys.argv[1], tables.schema('rejected'))\n"
              "writer.write([{'path': 'a.jpg', 'reason': 'empty', 'detail': ''}])\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    run = subprocess.run([sys.executable, "-c", killed, str(path)], cwd=REPO_ROOT)
    assert run.returncode == -9
    (stale,) = tmp_path.iterdir()  # what kill -9 left: the killed writer's temporary
    dead_pid = stale.name.removeprefix(".rejected.parquet.tmp-")
    live = tmp_path / f".rejected.parquet.tmp-{os.getppid()}"  # a writer still at work: kept
    other_table = tmp_path / f".parts.parquet.tmp-{dead_pid}"  # another file's: not this writer's
    live.write_bytes(b"")
    other_table.write_bytes(b"")

    tables.write_table(pd.DataFrame({"path": ["b.jpg"], "reason": ["empty"], "detail": [""]}), path,
                       schema=tables.schema("rejected"))

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name, other_table.name])
    assert not stale.exists()
    assert tables.read_table(path)["path"].tolist() == ["b.jpg"]

