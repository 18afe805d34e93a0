"""``intr evaluate``: accuracy and the planted-part test of a trained model.

Writes ``metrics_model.parquet`` (rows in the ``evaluation.parquet`` layout):

* ``{method}`` ``top1`` / ``top5`` on the evaluation split;
* ``linear_probe`` ``top1``: logistic regression on the frozen backbone's
  features (class token and mean patch token), trained on train+val;
* where the data has part masks and look-alike pairs (the synthetic data):
  ``peak_on_planted_part`` for the true class's top-ranked head (greedy
  blurring) over correctly classified images: the map's peak patch overlaps
  (at least one pixel, strict) a part that tells the class from a sibling;
  beside it the references ``chance`` (a random patch inside the bird's box),
  ``best_fixed_head`` (the single head index that does best, an oracle) and
  ``lowest_ranked_head``.

Patch cell (i, j) of a g_h x g_w map covers image rows [i H/g_h, (i+1) H/g_h)
and columns [j W/g_w, (j+1) W/g_w) (the evaluation resize keeps the whole
image; see ``intr.data.images``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from analysis.config import defaults
from analysis.stats import metric_row
from intr.baselines import BackboneFeatures, extract_features
from intr.data.images import ImageSet, read_split
from intr.ranking import rank_heads_by_blurring
from intr.tables import read_table, write_table
from intr.train import resolve_device, load_model


def planted_parts_by_class(pairs: pd.DataFrame) -> dict[int, set[str]]:
    """Parts that tell each class from at least one look-alike sibling."""
    parts: dict[int, set[str]] = {}
    for row in pairs.itertuples():
        for cls in (row.class_a, row.class_b):
            parts.setdefault(int(cls), set()).update(row.differing_parts)
    return parts


def cell_overlap(mask: np.ndarray, part_ids: list[int], grid: tuple[int, int]) -> np.ndarray:
    """(g_h, g_w) bool: the cell holds at least one pixel of the given parts."""
    h, w = mask.shape
    hit = np.isin(mask, part_ids)
    rows = np.minimum((np.arange(h) * grid[0]) // h, grid[0] - 1)
    cols = np.minimum((np.arange(w) * grid[1]) // w, grid[1] - 1)
    out = np.zeros(grid, dtype=bool)
    ys, xs = np.nonzero(hit)
    out[rows[ys], cols[xs]] = True
    return out


def box_cells(box: tuple[float, float, float, float], size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """(g_h, g_w) bool: the cell intersects the (x, y, w, h) box of a W x H image."""
    x, y, bw, bh = box
    w, h = size
    ch, cw = h / grid[0], w / grid[1]
    i = np.arange(grid[0])
    j = np.arange(grid[1])
    rows = ((i + 1) * ch > y) & (i * ch < y + bh)
    cols = ((j + 1) * cw > x) & (j * cw < x + bw)
    return rows[:, None] & cols[None, :]


def probe_features(model: torch.nn.Module, data: ImageSet, device: torch.device,
                   batch_size: int = 256) -> np.ndarray:
    """The model's frozen-backbone features (``model.probe_features``) of every image."""
    model.eval()
    return extract_features(BackboneFeatures(model), lambda i: data[i][0], len(data), device, batch_size)


def linear_probe_correct(model, train: ImageSet, test: ImageSet, device: torch.device) -> np.ndarray:
    """Per test image: does a logistic regression on frozen features get it right?"""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000))
    probe.fit(probe_features(model, train, device), train.labels.numpy())
    return probe.predict(probe_features(model, test, device)) == test.labels.numpy()


@torch.no_grad()
def _model_outputs(model, data: ImageSet, device: torch.device, batch_size: int, progress: bool) -> dict[str, Any]:
    logits_all, ranks, peaks = [], [], []
    for start in tqdm(range(0, len(data), batch_size), desc="evaluate", disable=not progress, leave=False):
        idx = range(start, min(start + batch_size, len(data)))
        images = torch.stack([data[i][0] for i in idx]).to(device)
        labels = data.labels[start:start + len(idx)].to(device)
        logits, maps = model.forward_with_maps(images, labels.view(-1, 1))
        ranking = rank_heads_by_blurring(model, images, labels)
        logits_all.append(logits.float().cpu())
        ranks.append(ranking.rank.cpu())
        peaks.append(maps[:, 0].flatten(2).argmax(-1).cpu())  # (B, heads) flat cell index
    # INTR knows its feature grid only after a forward pass.
    return {"logits": torch.cat(logits_all), "rank": torch.cat(ranks).numpy(),
            "peak": torch.cat(peaks).numpy(), "grid": tuple(model.grid_size)}


def planted_part_hits(rows: pd.DataFrame, root: Path, peak: np.ndarray, grid: tuple[int, int],
                      planted: dict[int, set[str]], part_ids: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: does each head's peak overlap a planted part, and the chance rate.

    Returns ``(hits (N, heads) bool, chance (N,), usable (N,) bool)``; an image is
    usable when it has a mask and a planted part of its class is visible.
    """
    n, heads = peak.shape
    hits = np.zeros((n, heads), dtype=bool)
    chance = np.zeros(n)
    usable = np.zeros(n, dtype=bool)
    for k, row in enumerate(rows.itertuples()):
        parts = planted.get(int(row.class_id))
        if not parts or not isinstance(row.mask_path, str):
            continue
        mask = np.asarray(Image.open(root / row.mask_path))
        overlap = cell_overlap(mask, [part_ids[p] for p in parts], grid)
        if not overlap.any():
            continue
        usable[k] = True
        hits[k] = overlap.reshape(-1)[peak[k]]
        inside = box_cells((row.bbox_x, row.bbox_y, row.bbox_w, row.bbox_h), (mask.shape[1], mask.shape[0]), grid)
        chance[k] = overlap[inside].mean()
    return hits, chance, usable


EXTRACT = defaults("extract")  # the config schema's defaults


def evaluate_model(model_path: str | Path, manifest: str | Path, root: str | Path, out: str | Path,
                   split: str = EXTRACT["split"], batch_size: int = EXTRACT["batch_size"],
                   device: str = EXTRACT["device"],
                   progress: bool = True) -> pd.DataFrame:
    """Write ``metrics_model.parquet`` for one trained model; return its rows.

    Args:
        model_path: ``model.pt`` from ``intr train``.
        manifest: ``manifest.parquet``; ``parts.parquet`` and
            ``lookalike_pairs.parquet`` are read from the same folder when present.
        root: the data set root.
        out: the metrics table to write.
        split: evaluation split.
        batch_size: images per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: progress bar.
    """
    dev = resolve_device(device)
    model, config = load_model(model_path, map_location="cpu")
    model.to(dev)
    method, size = config["method"], int(config["image_size"])
    mean, std = config["normalization"]["mean"], config["normalization"]["std"]
    rows = read_split(manifest, split)
    data = ImageSet(root, rows, size, mean, std)
    outputs = _model_outputs(model, data, dev, batch_size, progress)
    labels = data.labels.numpy()
    logits = outputs["logits"]
    correct = logits.argmax(1).numpy() == labels
    top5 = (logits.topk(min(5, logits.shape[1]), dim=1).indices.numpy() == labels[:, None]).any(1)
    metrics = [metric_row(method, "top1", split, correct), metric_row(method, "top5", split, top5)]

    train_data = ImageSet(root, read_split(manifest, ["train", "val"]), size, mean, std)
    metrics.append(metric_row("linear_probe", "top1", split,
                              linear_probe_correct(model, train_data, data, dev)))

    tables = Path(manifest).parent
    pairs_path = tables / "lookalike_pairs.parquet"
    if pairs_path.exists() and rows["mask_path"].notna().any():
        parts = read_table(tables / "parts.parquet", columns=["part_id", "part_name"]).drop_duplicates()
        part_ids = dict(zip(parts["part_name"], parts["part_id"].astype(int)))
        hits, chance, usable = planted_part_hits(rows, Path(root), outputs["peak"], outputs["grid"],
                                                 planted_parts_by_class(read_table(pairs_path)), part_ids)
        keep = usable & correct
        rank = outputs["rank"][keep]
        h = hits[keep]
        top_head = h[np.arange(len(h)), rank.argmin(1)]
        lowest = h[np.arange(len(h)), rank.argmax(1)]
        best_head = int(h.mean(0).argmax()) if len(h) else 0
        metrics += [
            metric_row(method, "peak_on_planted_part", split, top_head),
            metric_row("chance", "peak_on_planted_part", split, chance[keep]),
            metric_row("best_fixed_head", "peak_on_planted_part", split, h[:, best_head] if len(h) else []),
            metric_row("lowest_ranked_head", "peak_on_planted_part", split, lowest),
        ]
    table = pd.DataFrame(metrics)
    write_table(table, out, metadata={"method": method, "model": str(model_path), "split": split})
    return table


def gather_evaluation(inputs: list[str | Path], out: str | Path) -> pd.DataFrame:
    """``evaluation.parquet``: every stage's metric table of one method, in one table."""
    frames = [read_table(p) for p in inputs]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["method", "metric", "split", "value", "ci_lo", "ci_hi", "n"])
    write_table(table, out, metadata={"sources": [str(p) for p in inputs]})
    return table
