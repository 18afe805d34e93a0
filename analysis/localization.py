"""Localization against ground truth: the pointing game and the attention mass on the planted parts.

For the model (the mean map of the true class's top-ranked heads) and for
every baseline in ``baseline_maps.parquet``, on the same images:

* ``pointing_game``: the map's peak cell (its centre) lies within
  ``pointing_radius`` x the bird box's longer side of a target region's
  pixel. Targets: the planted parts of the image's class (the parts that tell
  it from a look-alike) where the data knows them; else the bird (every named
  part). Images with no target pixel are left out. Reference ``chance``: a
  cell drawn uniformly inside the bird's box.
* ``mass_on_planted_part``: the map's mass on the planted parts (only where
  planted parts are known). Reference ``size_baseline``: a uniform map over
  the cells inside the bird's box.
* ``peak_on_planted_part`` (data with part masks and planted parts): over
  correctly classified images whose class has a visible planted part, the
  peak cell of the true class's top-ranked head (greedy blurring) overlaps a
  planted part (``analysis.regions.cells_on_regions``). References:
  ``chance`` (the share of the cells inside the bird's box that overlap),
  ``best_fixed_head`` (the single head index that does best: an oracle) and
  ``lowest_ranked_head``. Computed from ``attention.parquet`` (every head of
  the true class, with its rank), so no network runs again.

The bird's box is ``box_cells``: the cells whose centre lies inside it, the
one box rule of every score here.
"""

from __future__ import annotations

import numpy as np

from analysis.stats import metric_row


def box_cells(width: np.ndarray, height: np.ndarray, bbox: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(N, G) bool: the cell's centre lies inside the image's bird box (the whole image without a box)."""
    gh, gw = grid
    cy = (np.arange(gh) + 0.5)[None, :] * (height[:, None] / gh)  # (N, gh)
    cx = (np.arange(gw) + 0.5)[None, :] * (width[:, None] / gw)
    x, y, w, h = (bbox[:, i] for i in range(4))
    no_box = ~np.isfinite(bbox).all(1)
    inside_y = (cy >= y[:, None]) & (cy <= (y + h)[:, None]) | no_box[:, None]
    inside_x = (cx >= x[:, None]) & (cx <= (x + w)[:, None]) | no_box[:, None]
    out = (inside_y[:, :, None] & inside_x[:, None, :]).reshape(len(width), gh * gw)
    out[~out.any(1)] = True  # a box smaller than a cell: every cell counts
    return out


def pointing_hits(maps: np.ndarray, dist: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """(n,) bool: the peak cell of each map is within ``threshold`` pixels of a target."""
    peak = maps.argmax(1)
    return dist[np.arange(len(maps)), peak] <= threshold


def localization_rows(method: str, split: str, model_maps: np.ndarray, baselines: dict[str, np.ndarray],
                      img: np.ndarray, weights: np.ndarray, dist: np.ndarray | None, scale: np.ndarray,
                      inside: np.ndarray, planted_mask: np.ndarray | None, radius: float,
                      seed: int = 0) -> list[dict]:
    """Evaluation rows of both metrics for the model, each baseline and the references.

    Args:
        method, split: the model's name and the evaluated split.
        model_maps: (n, G) the model's map of each of the n images (row i is image ``img[i]``).
        baselines: name -> (n, G) maps on the same images (NaN rows where a baseline lacks one).
        img: (n,) image index into ``weights``/``dist``/``scale``/``inside``/``planted_mask``.
        weights: (N, R, G) region weights; dist: (N, G) each cell's distance to the target
            regions in pixels (None: no pointing game); scale: (N,) the box's longer side.
        inside: (N, G) cells inside the bird's box; planted_mask: (N, R) the planted regions
            of each image's class (None: no mass metric); radius: hit radius / box side.
    """
    rows: list[dict] = []
    named = {method: model_maps, **baselines}
    if dist is not None:
        d = dist[img]
        thr = radius * scale[img]
        usable = np.isfinite(d).any(1)
        for name, maps in named.items():
            ok = usable & np.isfinite(maps).all(1)
            if ok.any():
                rows.append(metric_row(name, "pointing_game", split, pointing_hits(maps[ok], d[ok], thr[ok]), seed))
        if usable.any():
            hit_cells = (d[usable] <= thr[usable, None]) & inside[img[usable]]
            chance = hit_cells.sum(1) / inside[img[usable]].sum(1)
            rows.append(metric_row("chance", "pointing_game", split, chance, seed))
    if planted_mask is not None:
        pm = planted_mask[img]
        w = weights[img]
        usable = (pm[:, :, None] * w).sum((1, 2)) > 0  # a planted part is visible
        region_of = np.einsum("nrg,nr->ng", w, pm.astype(np.float32))  # share of each cell on planted parts
        for name, maps in named.items():
            ok = usable & np.isfinite(maps).all(1)
            if ok.any():
                m = maps[ok] / maps[ok].sum(1, keepdims=True)
                rows.append(metric_row(name, "mass_on_planted_part", split, (m * region_of[ok]).sum(1), seed))
        if usable.any():
            uni = inside[img[usable]].astype(np.float32)
            uni /= uni.sum(1, keepdims=True)
            rows.append(metric_row("size_baseline", "mass_on_planted_part", split,
                                   (uni * region_of[usable]).sum(1), seed))
    return rows


def peak_on_planted_part_rows(method: str, split: str, peaks: np.ndarray, ranks: np.ndarray,
                              on_planted: np.ndarray, inside: np.ndarray, seed: int = 0) -> list[dict]:
    """Evaluation rows of ``peak_on_planted_part`` for the top-ranked head and its three references.

    Args:
        method, split: the model's name and the evaluated split.
        peaks: (n, H) flat index of each head's peak cell in the true class's map, on the n
            usable images (correctly classified, a planted part of the class visible).
        ranks: (n, H) each head's rank for the true class (1 = most important).
        on_planted: (n, G) bool, the cells that overlap a planted part of the image's class.
        inside: (n, G) bool, the cells inside the bird's box (``box_cells``).
        seed: seed of the bootstrap intervals.
    """
    hits = np.take_along_axis(on_planted, peaks, axis=1)  # (n, H): head's peak on a planted part
    image = np.arange(len(hits))
    best_head = int(hits.mean(0).argmax()) if len(hits) else 0
    chance = (on_planted & inside).sum(1) / inside.sum(1)
    metric = "peak_on_planted_part"
    return [metric_row(method, metric, split, hits[image, ranks.argmin(1)], seed),
            metric_row("chance", metric, split, chance, seed),
            metric_row("best_fixed_head", metric, split, hits[:, best_head] if len(hits) else [], seed),
            metric_row("lowest_ranked_head", metric, split, hits[image, ranks.argmax(1)], seed)]
