"""Regions: the one rule that says which pixels, and which patches, belong to which named part.

Every later step (region effects in extraction, attention mass per region,
contrasts, localization, the report) uses these functions, so a "beak" means
the same pixels everywhere.

The rule, per image:

1. Part masks (the synthetic data): a pixel belongs to the part its mask
   names; mask value 0 is ``background``.
2. Else part keypoints (CUB): a pixel belongs to the nearest *visible*
   keypoint when it lies within ``radius`` of it, else to ``background``.
   ``radius`` is a fraction of the longer side of the bird's box (so it
   scales with the bird, not with the image), measured in the original
   image's pixels.
3. Else (no parts at all): a coarse ``cells x cells`` grid over the image,
   regions named ``cell_{row}_{col}``; there is no background.

That is the ``annotated`` layout.  A run picks one of three (``RegionLayout``,
config key ``regions``): ``discovered`` (the default: the part label maps
``intr discover`` learned without part labels, regions ``part_1 .. part_K``
and ``background``; nothing annotated is read), ``annotated`` (the rule above)
or ``grid`` (frame cells even where the data has parts).

Geometry: the networks see the whole image resized to a square (no crop,
aspect not kept; ``intr.data.images``), so a label map of any working size
(h, w) samples the original image at the centres of an h x w grid.  Patch
cell (i, j) of a g_h x g_w attention map covers working rows
[i h/g_h, (i+1) h/g_h) and columns [j w/g_w, (j+1) w/g_w); its weight on a
region is the fraction of its sample points labelled with that region.  The
mass of a map on a region is ``weights @ map``; the region's area is the
fraction of the image it covers, and density = mass / area.

No torch here (``analysis`` reads tables).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from analysis.config import defaults

BACKGROUND = "background"
DEFAULT_RADIUS = defaults("extract")["region_radius"]  # the config schema's defaults
DEFAULT_CELLS = defaults("extract")["region_cells"]
SAMPLES_PER_CELL = 8
REGION_MODES = ("discovered", "annotated", "grid")


@dataclass(frozen=True)
class DiscoveredParts:
    """Part label maps learned without part labels (``discovered_parts.parquet``).

    Args:
        k: number of parts; label 0 is background, 1..k the parts.
        grid: (g_h, g_w) of the label maps (the model's patch grid).
        labels: image_id -> (g_h, g_w) integer label map.
        frames: image_id -> its body frame (row, col, spread, mirrored; ``analysis.part_discovery.BodyFrames``)
            where discovery placed the image in one (``units: aligned``).
    """

    k: int
    grid: tuple[int, int]
    labels: dict[int, np.ndarray]
    frames: dict[int, np.ndarray] | None = None

    FRAME_COLUMNS = ("frame_row", "frame_col", "frame_spread", "frame_mirrored")  # the table's body-frame columns

    @classmethod
    def read(cls, path) -> "DiscoveredParts":
        from analysis import tables

        meta = tables.read_metadata(path)
        grid = (int(meta["grid_h"]), int(meta["grid_w"]))
        columns = set(pq.read_schema(path).names)
        with_frames = set(cls.FRAME_COLUMNS) <= columns
        frame = pq.read_table(path, columns=["image_id", "labels"] + (list(cls.FRAME_COLUMNS) if with_frames else []))
        ids = frame.column("image_id").to_pylist()
        values = tables.fixed_list_to_numpy(frame.column("labels"), np.int16).reshape(-1, *grid)
        frames = None
        if with_frames:
            rows = np.stack([frame.column(c).to_pandas().astype(np.float64).to_numpy()  # null: NaN
                             for c in cls.FRAME_COLUMNS], 1)
            frames = {i: r for i, r in zip(ids, rows) if np.isfinite(r).all()} or None
        return cls(int(meta["k"]), grid, dict(zip(ids, values)), frames)

    def frame_cells(self, image_ids, side: int, bins: int) -> np.ndarray | None:
        """(N, side, side) every pixel's cell of the ``bins`` x ``bins`` body-frame grid of each image at
        the network input (``analysis.part_discovery.BodyFrames.cells``), -1 for an image without a
        frame; None where none of them has one."""
        has = [i for i in image_ids if self.frames is not None and i in self.frames]
        if not has:
            return None
        from analysis.part_discovery import BodyFrames

        row, col, spread, mirrored = np.stack([self.frames[i] for i in has], 1)
        framed = BodyFrames(np.stack([row, col], 1), spread, mirrored > 0.5).cells((side, side), bins)
        out = np.full((len(image_ids), side, side), -1, dtype=framed.dtype)
        out[[k for k, i in enumerate(image_ids) if i in self.frames]] = framed
        return out

    @property
    def vocab(self) -> list[str]:
        return [f"part_{i}" for i in range(1, self.k + 1)] + [BACKGROUND]

    def label_map(self, image_id: int, width: float, height: float, out_hw: tuple[int, int]) -> np.ndarray:
        """(h, w) int16 index into ``vocab``: each sample point takes the label of the patch cell it falls in."""
        if image_id not in self.labels:
            raise KeyError(f"image_id {image_id} has no discovered part map (run `intr discover` on its split)")
        cell = grid_labels_at(self.labels[image_id], width, height, out_hw).astype(np.int16)
        return np.where(cell == 0, self.k, cell - 1).astype(np.int16)  # background is the last region

    def pixel_labels(self, image_id: int, width: int, height: int) -> np.ndarray:
        """(height, width) part labels of the original image's pixels: 0 background, 1..k the parts.

        Args:
            image_id: an image of the table.
            width, height: the original image's size in pixels (the manifest's).
        """
        if image_id not in self.labels:
            raise KeyError(f"image_id {image_id} has no discovered part map (run `intr discover` on its split)")
        return grid_labels_at(self.labels[image_id], width, height, (int(height), int(width)))


@dataclass(frozen=True)
class RegionLayout:
    """Which regions a run cuts every image into (``REGION_MODES``), and how to read them.

    Args:
        mode: ``discovered``, ``annotated`` or ``grid``.
        vocab: the region names, in order.
        parts: ``annotated``: the data set's part keypoints (None: masks only, or a grid).
        discovered: ``discovered``: the learned part maps.
        radius: ``annotated``: keypoint disc radius (fraction of the box's longer side).
        cells: grid size of ``grid`` (and of ``annotated`` data without parts).
    """

    mode: str
    vocab: list[str]
    parts: pd.DataFrame | None = None
    discovered: DiscoveredParts | None = None
    radius: float = DEFAULT_RADIUS
    cells: int = DEFAULT_CELLS

    @classmethod
    def build(cls, mode: str, parts: pd.DataFrame | None = None, discovered: DiscoveredParts | None = None,
              radius: float = DEFAULT_RADIUS, cells: int = DEFAULT_CELLS) -> "RegionLayout":
        """The layout of ``mode``; ``annotated`` without parts is the grid (as the rule says)."""
        if mode not in REGION_MODES:
            raise ValueError(f"regions must be one of {', '.join(REGION_MODES)}, got {mode!r}")
        if mode == "discovered":
            if discovered is None:
                raise ValueError("regions: discovered needs the discovered part maps (intr discover)")
            return cls(mode, discovered.vocab, discovered=discovered, radius=radius, cells=cells)
        if mode == "grid" or parts is None or not len(parts):
            return cls("grid", region_vocabulary(None, cells), radius=radius, cells=cells)
        return cls(mode, region_vocabulary(parts, cells), parts=parts, radius=radius, cells=cells)

    @property
    def ranked(self) -> np.ndarray:
        """(R,) bool: the regions that are ranked (every one but background)."""
        return np.array([v != BACKGROUND for v in self.vocab])


def region_vocabulary(parts: pd.DataFrame | None, cells: int = DEFAULT_CELLS) -> list[str]:
    """All region names of a data set, in a fixed order.

    Part names ordered by ``part_id`` then ``background`` when the data has
    parts; else the grid cells ``cell_{row}_{col}``.
    """
    if parts is not None and len(parts):
        names = (parts[["part_id", "part_name"]].drop_duplicates("part_name")
                 .sort_values("part_id")["part_name"].astype(str).tolist())
        return names + [BACKGROUND]
    return [f"cell_{r}_{c}" for r in range(cells) for c in range(cells)]


def _sample_points(width: float, height: float, out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Original-image coordinates (x, y) of the centres of an out_h x out_w grid."""
    h, w = out_hw
    ys = (np.arange(h) + 0.5) * (height / h)
    xs = (np.arange(w) + 0.5) * (width / w)
    return xs, ys


def grid_labels_at(grid_labels: np.ndarray, width: float, height: float, out_hw: tuple[int, int]) -> np.ndarray:
    """(h, w) labels of an out_h x out_w sampling of the image from its (g_h, g_w) patch label map.

    The attention maps' resize rule (module docstring): each axis on its own,
    a sample point takes the label of the patch cell its original-image
    position falls in.  ``out_hw = (height, width)`` gives the pixel map.

    Args:
        grid_labels: (g_h, g_w) labels per patch cell.
        width, height: the original image's size in pixels.
        out_hw: the output's (h, w), e.g. the image's own size or a thumbnail's.
    """
    xs, ys = _sample_points(width, height, out_hw)
    gh, gw = grid_labels.shape
    rows = np.minimum((ys * gh / height).astype(np.int64), gh - 1)
    cols = np.minimum((xs * gw / width).astype(np.int64), gw - 1)
    return grid_labels[rows[:, None], cols[None, :]]


def label_map(vocab: Sequence[str], width: float, height: float, out_hw: tuple[int, int],
              parts: pd.DataFrame | None = None, mask: np.ndarray | None = None,
              mask_names: dict[int, str] | None = None, bbox: Sequence[float] | None = None,
              radius: float = DEFAULT_RADIUS, cells: int = DEFAULT_CELLS) -> np.ndarray:
    """(h, w) int16: the index into ``vocab`` of each sample point's region.

    Args:
        vocab: from ``region_vocabulary``.
        width, height: the original image's size in pixels.
        out_hw: the working resolution (e.g. the model's input size, or
            ``SAMPLES_PER_CELL`` points per patch cell).
        parts: this image's rows of ``parts.parquet`` (part_name, x, y, visible).
        mask: the image's part mask (values = part ids, 0 = background), original size.
        mask_names: part id -> part name for the mask values.
        bbox: the bird's box (x, y, w, h) in original pixels; scales ``radius``.
        radius: keypoint disc radius as a fraction of the box's longer side
            (of the image's longer side without a box).
        cells: grid size when the data has no parts.
    """
    h, w = out_hw
    index = {name: i for i, name in enumerate(vocab)}
    xs, ys = _sample_points(width, height, out_hw)
    if mask is not None:
        mh, mw = mask.shape[:2]
        rows = np.minimum((ys * mh / height).astype(np.int64), mh - 1)
        cols = np.minimum((xs * mw / width).astype(np.int64), mw - 1)
        lookup = np.full(int(mask.max(initial=0)) + 1, index[BACKGROUND], dtype=np.int16)
        for pid, name in (mask_names or {}).items():
            if 0 < pid < lookup.size and name in index:
                lookup[pid] = index[name]
        if mask.size < h * w:  # the same labels either way: look up on the smaller of the mask and the samples
            return lookup[mask][rows[:, None], cols[None, :]]
        return lookup[mask[rows[:, None], cols[None, :]]]
    if BACKGROUND in index:
        out = np.full((h, w), index[BACKGROUND], dtype=np.int16)
        if parts is None or not len(parts):
            return out
        vis = parts[parts["visible"].astype(bool) & parts["part_name"].isin(index)]
        if not len(vis):
            return out
        scale = max(bbox[2], bbox[3]) if bbox is not None else float("nan")
        if not np.isfinite(scale) or scale <= 0:  # no box (or a null one): the image's longer side
            scale = max(width, height)
        r = radius * scale
        px = vis["x"].to_numpy(np.float64)
        py = vis["y"].to_numpy(np.float64)
        d2 = (xs[None, None, :] - px[:, None, None]) ** 2 + (ys[None, :, None] - py[:, None, None]) ** 2
        nearest = d2.argmin(0)
        ids = np.array([index[n] for n in vis["part_name"]], dtype=np.int16)
        within = d2.min(0) <= r * r
        out[within] = ids[nearest[within]]
        return out
    gr = np.minimum((ys * cells / height).astype(np.int64), cells - 1)
    gc = np.minimum((xs * cells / width).astype(np.int64), cells - 1)
    return (gr[:, None] * cells + gc[None, :]).astype(np.int16)


@lru_cache(maxsize=8)
def _pixel_cells(h: int, w: int, gh: int, gw: int) -> np.ndarray:
    """(h, w) int64 each pixel's patch cell of a ``gh`` x ``gw`` grid (read-only: shared between calls)."""
    cell = (np.arange(h)[:, None] // (h // gh)) * gw + np.arange(w)[None, :] // (w // gw)
    cell.flags.writeable = False
    return cell


def patch_weights(labels: np.ndarray, grid: tuple[int, int], n_regions: int) -> np.ndarray:
    """(n_regions, g_h * g_w) float32: each patch cell's share in each region (columns sum to 1).

    ``labels`` is a label map whose size is a multiple of the grid (e.g.
    ``label_map(..., out_hw=(g_h * 8, g_w * 8))``).
    """
    gh, gw = grid
    h, w = labels.shape
    if h % gh or w % gw:
        raise ValueError(f"label map {labels.shape} is not a multiple of the grid {grid}")
    sh, sw = h // gh, w // gw
    counts = np.bincount((labels.astype(np.int64) * (gh * gw) + _pixel_cells(h, w, gh, gw)).ravel(),
                         minlength=n_regions * gh * gw)
    # count / pixels per cell in float32: the same bits as the mean of a float32 one-hot map
    return (counts.astype(np.float32) / np.float32(sh * sw)).reshape(n_regions, gh * gw)


def cells_on_regions(weights: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """(..., G) bool: the patch cell holds at least one sample point of a chosen region.

    The cell-overlap rule of the ground-truth scores, on ``patch_weights``
    (``SAMPLES_PER_CELL`` x ``SAMPLES_PER_CELL`` sample points per cell: every
    mask pixel where a cell spans at most that many pixels a side, as on the
    default synthetic data's 64 px images and 8 x 8 grid).

    Args:
        weights: (..., R, G) patch weights (``patch_weights``, ``image_weights``).
        chosen: (..., R) bool, the regions asked for (e.g. an image's planted parts).
    """
    return ((weights > 0) & chosen[..., :, None]).any(axis=-2)


def region_density(mass: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Mass / area per region; NaN where the region is absent from the image (area 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(area > 0, mass / area, np.nan)


def region_masks(labels: np.ndarray, n_regions: int) -> np.ndarray:
    """(n_regions, h, w) bool pixel masks from a label map (for blurring a region)."""
    return labels[None] == np.arange(n_regions, dtype=labels.dtype)[:, None, None]


def iter_label_maps(layout: RegionLayout, manifest: pd.DataFrame, work_hw: tuple[int, int], root=None):
    """Yield ``(k, labels)``: the label map (indices into ``layout.vocab``) of every manifest row (row k).

    ``annotated``: reads the part masks (``mask_path`` relative to ``root``) where the manifest has
    them, else uses the part keypoints; ``discovered``: the learned maps; ``grid``: frame cells.
    """
    from pathlib import Path

    from PIL import Image

    parts = layout.parts
    if parts is not None and "image_id" in manifest:
        parts = parts[parts["image_id"].isin(manifest["image_id"])]
    by_image = dict(tuple(parts.groupby("image_id"))) if parts is not None and len(parts) else {}
    mask_names = dict(zip(parts["part_id"].astype(int), parts["part_name"].astype(str))) \
        if parts is not None and len(parts) else None
    use_masks = layout.mode == "annotated" and "mask_path" in manifest.columns and root is not None
    for k, row in enumerate(manifest.itertuples(index=False)):
        if layout.discovered is not None:
            yield k, layout.discovered.label_map(int(row.image_id), row.width, row.height, work_hw)
            continue
        mask = None
        if use_masks and isinstance(row.mask_path, str):
            path = Path(root) / row.mask_path
            if not path.is_file():
                raise FileNotFoundError(f"{path}: part mask listed in the manifest (mask_path) is missing")
            with Image.open(path) as im:
                mask = np.asarray(im)
        bbox = (row.bbox_x, row.bbox_y, row.bbox_w, row.bbox_h) if hasattr(row, "bbox_w") else None
        yield k, label_map(layout.vocab, row.width, row.height, work_hw, parts=by_image.get(row.image_id),
                           mask=mask, mask_names=mask_names, bbox=bbox, radius=layout.radius, cells=layout.cells)


def image_weights(layout: RegionLayout, manifest: pd.DataFrame, grid: tuple[int, int], root=None) -> np.ndarray:
    """(N, R, g_h * g_w) float32 patch weights of every manifest row, in row order (``iter_label_maps``)."""
    out = np.zeros((len(manifest), len(layout.vocab), grid[0] * grid[1]), dtype=np.float32)
    work = (grid[0] * SAMPLES_PER_CELL, grid[1] * SAMPLES_PER_CELL)
    for k, labels in iter_label_maps(layout, manifest, work, root):
        out[k] = patch_weights(labels, grid, len(layout.vocab))
    return out


def label_overlap(first: RegionLayout, second: RegionLayout, manifest: pd.DataFrame, grid: tuple[int, int],
                  root=None) -> np.ndarray:
    """(N, R1, R2) float32: per manifest row, the share of label-map samples in region i of ``first``
    and region j of ``second``, both sampled ``SAMPLES_PER_CELL`` times per patch side (``iter_label_maps``).

    Unlike the product of two layouts' patch weights, this keeps where inside a patch each region
    lies, so a region smaller than a patch meets the part under it, not every part of its patch.
    """
    work = (grid[0] * SAMPLES_PER_CELL, grid[1] * SAMPLES_PER_CELL)
    r1, r2 = len(first.vocab), len(second.vocab)
    out = np.zeros((len(manifest), r1, r2), dtype=np.float32)
    for (k, a), (_, b) in zip(iter_label_maps(first, manifest, work, root), iter_label_maps(second, manifest, work, root)):
        counts = np.bincount(a.astype(np.int64).ravel() * r2 + b.astype(np.int64).ravel(), minlength=r1 * r2)
        out[k] = (counts / a.size).reshape(r1, r2)
    return out


def cell_distances(labels: np.ndarray, targets: np.ndarray, grid: tuple[int, int],
                   width: float, height: float) -> np.ndarray:
    """(g_h * g_w,) float32: distance in original-image pixels from each patch cell's centre to the
    nearest sample point labelled with one of ``targets`` (region indices); ``inf`` when none is there.

    ``labels`` is a label map whose size is a multiple of the grid; the cell
    centre is taken at the sample just below and right of the exact centre
    (half a sample's spacing off), and distances use the original image's
    pixel spacing on each axis (the resize does not keep the aspect).
    """
    from scipy.ndimage import distance_transform_edt

    gh, gw = grid
    h, w = labels.shape
    hit = np.isin(labels, targets)
    if not hit.any():
        return np.full(gh * gw, np.inf, dtype=np.float32)
    dist = distance_transform_edt(~hit, sampling=(height / h, width / w))
    rows = np.arange(gh) * (h // gh) + (h // gh) // 2
    cols = np.arange(gw) * (w // gw) + (w // gw) // 2
    return dist[rows[:, None], cols[None, :]].reshape(-1).astype(np.float32)


def image_geometry(layout: RegionLayout, manifest: pd.DataFrame, grid: tuple[int, int], root=None,
                   targets: Sequence[np.ndarray | None] | None = None,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Patch weights of every manifest row and, optionally, each cell's distance to target regions.

    One pass over the images (each mask is read once): returns
    ``(weights (N, R, G) float32, distances (N, G) float32 or None)``, where
    ``distances[k]`` is ``cell_distances`` to the regions ``targets[k]``
    (``inf`` everywhere when ``targets[k]`` is None or absent from the image).
    """
    n, cells_n = len(manifest), grid[0] * grid[1]
    weights = np.zeros((n, len(layout.vocab), cells_n), dtype=np.float32)
    dist = np.full((n, cells_n), np.inf, dtype=np.float32) if targets is not None else None
    work = (grid[0] * SAMPLES_PER_CELL, grid[1] * SAMPLES_PER_CELL)
    widths = manifest["width"].to_numpy(np.float64)
    heights = manifest["height"].to_numpy(np.float64)
    it = iter_label_maps(layout, manifest, work, root)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=n, desc="regions", unit="img", mininterval=2.0)
    for k, labels in it:
        weights[k] = patch_weights(labels, grid, len(layout.vocab))
        if dist is not None and targets[k] is not None and len(targets[k]):
            dist[k] = cell_distances(labels, np.asarray(targets[k]), grid, widths[k], heights[k])
    return weights, dist
