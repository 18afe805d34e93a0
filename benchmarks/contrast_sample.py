"""Trait recovery against the size of the contrasts' per-class image sample (extract.contrast_images).

Reads a results folder whose region effects were filled for every image
(``extract.contrast_images: 0``; tables written before the key existed are
the same), analyses each method's tables once per sample size and prints the
trait-recovery rows side by side. The sample's region-effect rows are exactly
the full table's rows of those images (``contrast_sample`` picks are nested
and each image's effects do not depend on the others), so no network runs here.

    python benchmarks/contrast_sample.py results/synthetic --sizes 0,100,64,48
    python benchmarks/contrast_sample.py results/heldout4 --methods intr --out /tmp/samples
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from analysis.pipeline import AnalysisInputs, analyze

METRICS = ("trait_recovery_top1", "trait_recovery_recall3", "trait_recovery_top1_strict",
           "trait_recovery_top1_occlusion")


def recovery_by_size(results: Path, method: str, sizes: list[int], out: Path) -> pd.DataFrame:
    """The trait-recovery rows of ``method`` analysed with each per-class sample size."""
    rows = []
    for size in sizes:
        started = time.perf_counter()
        inputs = AnalysisInputs.conventional(results / method, results / "manifest.parquet", results / "data")
        metrics = analyze(inputs, out / f"{method}_{size}", {"contrast_images": size, "umap": False},
                          progress=False)
        metrics = metrics[metrics["metric"].isin(METRICS)].assign(analysed=method, contrast_images=size)
        rows.append(metrics)
        print(f"{method}: contrast_images {size or 'all'} analysed in {time.perf_counter() - started:.0f} s",
              flush=True)
    return pd.concat(rows, ignore_index=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="results/<dataset> with every image's region effects")
    parser.add_argument("--methods", default="prompt_cam,intr")
    parser.add_argument("--sizes", default="0,100,64,48", help="per-class sample sizes (0: all images)")
    parser.add_argument("--out", type=Path, help="folder for the analysis tables (default: a temporary one)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        table = pd.concat([recovery_by_size(args.results, m, sizes, out) for m in args.methods.split(",")])
    # size_baseline and random rows are each analysed method's own (its images and regions)
    wide = table.pivot_table(index=["analysed", "method", "metric"], columns="contrast_images", values="value")
    print(wide.round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
