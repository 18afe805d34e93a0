"""Discovered parts: a part vocabulary learned from the images alone, and its score against ground truth.

The method (chosen by measurement on the embedded default, see docs/tables.md
``discovered_parts``) is the co-part segmentation of Amir et al. (2021, "Deep
ViT Features as Dense Visual Descriptors") with the model's own class
attention as the saliency that votes the foreground:

1. Foreground.  k-means (``foreground_clusters``) on every patch's backbone
   feature (L2-normalised) and its frame position; a cluster is foreground
   when its patches' mean saliency is at least the mean saliency of all
   patches.  Saliency is the class attention summed over heads and over the
   model's top predicted classes, divided by the image's largest value (no
   label is read: the predicted classes, not the true one).
2. Parts.  k-means (``k``) on the foreground patches' feature, frame position
   and position relative to the bird (the saliency-weighted centre and
   spread of the image), so a part is "this look, at this place of the bird".
   Background is label 0, parts 1..k.

Departure from Amir et al.: their saliency is the ViT's CLS attention; here
it is the class queries' attention, which both Prompt-CAM and INTR (CNN or
ViT backbone) have.  Only the networks' outputs are read here (no torch):
``intr.discover`` computes the features and maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

POSITION_SCALE = 1.0  # frame position in [-0.5, 0.5] next to unit-norm features
RELATIVE_SCALE = 1.0 / 3  # bird-relative position in spreads: 3 spreads either side of the centre map to [-1, 1]


def patch_positions(grid: tuple[int, int]) -> np.ndarray:
    """(g_h * g_w, 2) float64: each patch cell's (row, col) centre, scaled to [-0.5, 0.5]."""
    gh, gw = grid
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    return np.stack([rows / max(gh - 1, 1), cols / max(gw - 1, 1)], axis=-1) - 0.5


def attention_saliency(maps: np.ndarray) -> np.ndarray:
    """(N, G) saliency in [0, 1]: class attention summed over query rows and heads, over the image's maximum.

    Args:
        maps: (N, R, heads, G) attention maps of R query classes (each head's
            map is normalised to sum 1 first, so every head counts alike).
    """
    a = maps.astype(np.float64)
    a = a / np.maximum(a.sum(-1, keepdims=True), 1e-12)
    total = a.sum(axis=(1, 2))
    return total / np.maximum(total.max(axis=1, keepdims=True), 1e-12)


def _unit(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


def foreground_descriptors(features: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(N, G, D + 2): unit patch feature and frame position (the foreground clustering's input)."""
    pos = np.broadcast_to(patch_positions(grid) * POSITION_SCALE, features.shape[:2] + (2,))
    return np.concatenate([_unit(features), pos], axis=-1)


def part_descriptors(features: np.ndarray, saliency: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(N, G, D + 4): unit patch feature, frame position and position relative to the salient object.

    Args:
        features: (N, G, D) backbone patch features.
        saliency: (N, G) from ``attention_saliency``; its weighted centre
            and spread per image place the bird.
        grid: (g_h, g_w).
    """
    pos = patch_positions(grid)
    w = saliency / np.maximum(saliency.sum(1, keepdims=True), 1e-12)
    centre = (w[..., None] * pos).sum(1, keepdims=True)
    spread = np.sqrt((w[..., None] * (pos - centre) ** 2).sum(1, keepdims=True)) + 1e-3
    relative = (pos - centre) / spread * RELATIVE_SCALE
    return np.concatenate([foreground_descriptors(features, grid), relative], axis=-1)


@dataclass
class PartVocabulary:
    """A fitted part vocabulary: what ``assign_parts`` needs for new images.

    Attributes:
        foreground_centres: (F, D + 2) centres of the foreground clustering.
        foreground: (F,) bool, which of them are foreground.
        part_centres: (k, D + 4) centres of the parts (label i + 1 is row i).
        grid: the patch grid the descriptors were made on.
    """

    foreground_centres: np.ndarray
    foreground: np.ndarray
    part_centres: np.ndarray
    grid: tuple[int, int]

    @property
    def k(self) -> int:
        return len(self.part_centres)


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d2 = (x * x).sum(1)[:, None] - 2 * x @ centres.T + (centres * centres).sum(1)[None, :]
    return d2.argmin(1)


def fit_part_vocabulary(features: np.ndarray, saliency: np.ndarray, grid: tuple[int, int], k: int,
                        foreground_clusters: int = 12, seed: int = 0) -> PartVocabulary:
    """Learn foreground and k parts from a sample of (unlabelled) images.

    Args:
        features: (N, G, D) backbone patch features of the sample.
        saliency: (N, G) from ``attention_saliency``.
        grid: (g_h, g_w) with g_h * g_w = G.
        k: number of parts (background comes on top).
        foreground_clusters: clusters of the first stage, voted foreground or not.
        seed: k-means seed.
    """
    fg_desc = foreground_descriptors(features, grid).reshape(-1, features.shape[-1] + 2)
    stage1 = KMeans(foreground_clusters, n_init=2, random_state=seed).fit(fg_desc)
    sal = saliency.reshape(-1)
    vote = np.array([sal[stage1.labels_ == c].mean() if (stage1.labels_ == c).any() else 0.0
                     for c in range(foreground_clusters)])
    foreground = vote >= sal.mean()
    on = foreground[stage1.labels_]
    parts = part_descriptors(features, saliency, grid).reshape(-1, features.shape[-1] + 4)[on]
    if len(parts) < k:
        raise ValueError(f"only {len(parts)} foreground patches in the sample for k = {k} parts; sample more images")
    stage2 = KMeans(k, n_init=3, random_state=seed).fit(parts)
    return PartVocabulary(stage1.cluster_centers_, foreground, stage2.cluster_centers_, tuple(grid))


def assign_parts(vocabulary: PartVocabulary, features: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """(N, G) int8 part labels: 0 background, 1..k the nearest part centre.

    Args:
        vocabulary: from ``fit_part_vocabulary``.
        features: (N, G, D) backbone patch features.
        saliency: (N, G) from ``attention_saliency``.
    """
    n, g, d = features.shape
    fg = vocabulary.foreground[_nearest(foreground_descriptors(features, vocabulary.grid).reshape(-1, d + 2),
                                        vocabulary.foreground_centres)]
    parts = _nearest(part_descriptors(features, saliency, vocabulary.grid).reshape(-1, d + 4),
                     vocabulary.part_centres) + 1
    return np.where(fg, parts, 0).reshape(n, g).astype(np.int8)


# ----------------------------------------------------------------------------- choosing k without labels

K_SWEEP_PATCHES = 10_000  # foreground patches the k sweep clusters (a seeded subsample; keeps it cheap at CUB scale)
SILHOUETTE_PATCHES = 3_000  # of those, the ones the silhouette is computed on (recorded, not used to choose)


@dataclass
class PartCountChoice:
    """The number of parts chosen on the fit sample (``choose_part_count``), with the curve it was read from.

    Attributes:
        k: the chosen number of parts.
        candidates: every k tried.
        inertia: k-means inertia (within-cluster sum of squares) at each candidate.
        silhouette: silhouette on a subsample at each candidate (recorded for the reader).
        criterion: how k was read from the curve.
    """

    k: int
    candidates: list[int]
    inertia: list[float]
    silhouette: list[float]
    criterion: str = "inertia_elbow"

    def metadata(self) -> dict:
        """Key-value metadata for ``discovered_parts.parquet``."""
        return {"k_criterion": self.criterion, "k_candidates": self.candidates,
                "k_inertia": [round(v, 4) for v in self.inertia],
                "k_silhouette": [round(v, 4) for v in self.silhouette]}


def elbow(candidates: list[int], inertia: list[float]) -> int:
    """The candidate farthest below the chord from the first to the last point of the inertia curve.

    Both axes are scaled to [0, 1] first (the "kneedle" rule); a straight
    curve (no elbow) gives the first candidate.

    Args:
        candidates: the k values, increasing.
        inertia: the k-means inertia at each.
    """
    x = np.asarray(candidates, dtype=np.float64)
    y = np.asarray(inertia, dtype=np.float64)
    if len(x) < 3 or y[0] == y[-1]:
        return int(x[0])
    xs = (x - x[0]) / (x[-1] - x[0])
    ys = (y - y[-1]) / (y[0] - y[-1])
    below = (1 - xs) - ys  # the chord runs from (0, 1) to (1, 0)
    return int(x[int(np.argmax(below))])


def foreground_part_descriptors(vocabulary: PartVocabulary, features: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """(M, D + 4) part descriptors of the patches ``vocabulary`` calls foreground (the parts stage's input)."""
    d = features.shape[-1]
    fg = vocabulary.foreground[_nearest(foreground_descriptors(features, vocabulary.grid).reshape(-1, d + 2),
                                        vocabulary.foreground_centres)]
    return part_descriptors(features, saliency, vocabulary.grid).reshape(-1, d + 4)[fg]


def choose_part_count(features: np.ndarray, saliency: np.ndarray, grid: tuple[int, int],
                      k_range: tuple[int, int] = (6, 16), foreground_clusters: int = 12,
                      seed: int = 0) -> PartCountChoice:
    """Choose k on the (unlabelled) fit sample: the elbow of the parts stage's k-means inertia over ``k_range``.

    The foreground stage runs once; the parts stage is clustered for every k
    on a seeded subsample of ``K_SWEEP_PATCHES`` foreground patches.
    Measured on the embedded default's trained models (k 6-16), the
    silhouette was flat (0.06-0.13) and would pick the range's ends, so it
    is only recorded; the elbow picked 11 (Prompt-CAM: part NMI 0.346, ARI
    0.270 against 0.349, 0.285 at k = 10) and 10 (INTR, the same as k = 10).
    The elbow of a smooth curve sits inside the range, so ``k_range`` bounds
    the answer: widen it for data with many more parts.

    Args:
        features: (N, G, D) backbone patch features of the fit sample.
        saliency: (N, G) from ``attention_saliency``.
        grid: (g_h, g_w).
        k_range: [smallest, largest] k tried.
        foreground_clusters: clusters of the foreground stage.
        seed: seed of the subsample and of k-means.
    """
    from sklearn.metrics import silhouette_score

    lo, hi = int(k_range[0]), int(k_range[1])
    if not 2 <= lo <= hi:
        raise ValueError(f"k_range must be [min, max] with 2 <= min <= max, got {list(k_range)}")
    first = fit_part_vocabulary(features, saliency, grid, lo, foreground_clusters=foreground_clusters, seed=seed)
    points = foreground_part_descriptors(first, features, saliency)
    rng = np.random.default_rng(seed)
    if len(points) > K_SWEEP_PATCHES:
        points = points[np.sort(rng.choice(len(points), K_SWEEP_PATCHES, replace=False))]
    candidates = [k for k in range(lo, hi + 1) if k < len(points)]
    if not candidates:
        raise ValueError(f"only {len(points)} foreground patches in the sample for k >= {lo}; sample more images")
    inertia, silhouette = [], []
    for k in candidates:
        fit = KMeans(k, n_init=2, random_state=seed).fit(points)
        inertia.append(float(fit.inertia_))
        silhouette.append(float(silhouette_score(points, fit.labels_, sample_size=min(SILHOUETTE_PATCHES, len(points)),
                                                 random_state=seed)))
    return PartCountChoice(elbow(candidates, inertia), candidates, inertia, silhouette)


# ----------------------------------------------------------------------------- scoring (evaluation only)


def grid_labels(n_images: int, grid: tuple[int, int], cells: int = 3) -> np.ndarray:
    """(N, G) labels of the ``cells x cells`` frame grid: the reference a discovery must beat."""
    gh, gw = grid
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    labels = (rows * cells // gh) * cells + cols * cells // gw + 1
    return np.broadcast_to(labels, (n_images, gh * gw)).copy()


def random_labels(n_images: int, grid: tuple[int, int], k: int, seed: int = 0) -> np.ndarray:
    """(N, G) labels drawn uniformly from 1..k: the chance reference."""
    return np.random.default_rng(seed).integers(1, k + 1, size=(n_images, grid[0] * grid[1]))


def mask_truth(weights: np.ndarray, background: int) -> np.ndarray:
    """(N, G) ground-truth part index per patch (its majority region), -1 where that is background.

    Args:
        weights: (N, R, G) patch weights of the true regions (``analysis.regions.image_weights``).
        background: the index of ``background`` among the R regions.
    """
    truth = weights.argmax(1).astype(np.int64)
    return np.where(truth == background, -1, truth)


def keypoint_truth(manifest: pd.DataFrame, parts: pd.DataFrame, grid: tuple[int, int]) -> np.ndarray:
    """(N, G) ground-truth part id per patch under a visible keypoint (the PDiscoNet protocol), -1 elsewhere.

    A patch under several keypoints keeps the last one's (parts.parquet row order).

    Args:
        manifest: the scored images (image_id, width, height), in the order of the label maps.
        parts: keypoints (image_id, part_id, x, y, visible).
        grid: (g_h, g_w).
    """
    gh, gw = grid
    truth = np.full((len(manifest), gh * gw), -1, dtype=np.int64)
    row_of = {int(i): r for r, i in enumerate(manifest["image_id"])}
    vis = parts[parts["visible"].astype(bool) & parts["image_id"].isin(row_of)]
    size = manifest.set_index("image_id")[["width", "height"]].loc[vis["image_id"]].to_numpy(np.float64)
    rows = np.clip((vis["y"].to_numpy(np.float64) / size[:, 1] * gh).astype(np.int64), 0, gh - 1)
    cols = np.clip((vis["x"].to_numpy(np.float64) / size[:, 0] * gw).astype(np.int64), 0, gw - 1)
    image_rows = np.array([row_of[int(i)] for i in vis["image_id"]], dtype=np.int64)
    truth[image_rows, rows * gw + cols] = vis["part_id"].to_numpy(np.int64)
    return truth


def agreement(labels: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(NMI, ARI) between labels and truth on the patches where truth >= 0 (arrays of one shape)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    scored = truth >= 0
    if not scored.any():
        return float("nan"), float("nan")
    return (float(normalized_mutual_info_score(truth[scored], labels[scored])),
            float(adjusted_rand_score(truth[scored], labels[scored])))


def agreement_rows(method: str, split: str, labels: np.ndarray, truth: np.ndarray,
                   resamples: int = 200, seed: int = 0) -> list[dict]:
    """``part_discovery_nmi`` and ``part_discovery_ari`` rows (evaluation layout), bootstrap over images.

    Args:
        method: the row's method (a model, or ``grid`` / ``random``).
        split: the scored split.
        labels: (N, G) part labels (0 background).
        truth: (N, G) true part per patch, -1 where not scored.
        resamples: bootstrap resamples of the images for the interval.
        seed: bootstrap seed.
    """
    value = agreement(labels, truth)
    rng = np.random.default_rng(seed)
    boot = np.array([agreement(labels[idx], truth[idx])
                     for idx in rng.integers(0, len(labels), size=(resamples, len(labels)))]).reshape(-1, 2)
    n = int((truth >= 0).sum())
    rows = []
    for j, metric in enumerate(("part_discovery_nmi", "part_discovery_ari")):
        lo, hi = (np.nanquantile(boot[:, j], [0.025, 0.975]) if np.isfinite(boot[:, j]).any()
                  else (np.nan, np.nan))
        rows.append({"method": method, "metric": metric, "split": split, "value": value[j],
                     "ci_lo": float(lo), "ci_hi": float(hi), "n": n})
    return rows


def part_discovery_scores(discovered_path: str | Path, manifest_path: str | Path, parts_path: str | Path | None,
                          root: str | Path, method: str, cells: int = 3, seed: int = 0) -> pd.DataFrame:
    """Evaluation rows scoring a ``discovered_parts`` table against the ground-truth parts.

    Truth per patch: the majority part of the part masks over bird patches
    (synthetic data: ``mask_path`` in the manifest), else the part of each
    visible keypoint's patch (CUB).  Rows for ``method`` and the references
    ``grid`` (``cells x cells`` frame cells) and ``random`` (uniform over the
    same k); empty when the data has no parts.

    Args:
        discovered_path: ``discovered_parts.parquet`` (``intr discover``).
        manifest_path: ``manifest.parquet``.
        parts_path: ``parts.parquet`` (None or an empty table: no rows).
        root: the data set root (mask paths are relative to it).
        method: the model the parts were discovered with (the rows' method).
        cells: the grid reference's cells per side.
        seed: seed of the random reference and the bootstrap.
    """
    import pyarrow.parquet as pq

    from analysis import regions as reg
    from analysis.tables import fixed_list_to_numpy, read_metadata, read_table

    columns = ["method", "metric", "split", "value", "ci_lo", "ci_hi", "n"]
    parts = read_table(parts_path) if parts_path is not None and Path(parts_path).exists() else None
    if parts is None or not len(parts):
        return pd.DataFrame(columns=columns)
    meta = read_metadata(discovered_path)
    grid = (int(meta["grid_h"]), int(meta["grid_w"]))
    table = pq.read_table(discovered_path)
    labels = fixed_list_to_numpy(table["labels"], np.int64)
    image_ids = table["image_id"].to_numpy()
    manifest = read_table(manifest_path).set_index("image_id").loc[image_ids].reset_index()
    split = ",".join(sorted(manifest["split"].unique()))
    if "mask_path" in manifest.columns and manifest["mask_path"].notna().all():
        layout = reg.RegionLayout.build("annotated", parts=parts)
        weights = reg.image_weights(layout, manifest, grid, root=root)
        truth = mask_truth(weights, layout.vocab.index(reg.BACKGROUND))
    else:
        truth = keypoint_truth(manifest, parts, grid)
    rows = agreement_rows(method, split, labels, truth, seed=seed)
    rows += agreement_rows("grid", split, grid_labels(len(labels), grid, cells), truth, seed=seed)
    rows += agreement_rows("random", split, random_labels(len(labels), grid, int(meta["k"]), seed), truth, seed=seed)
    return pd.DataFrame(rows, columns=columns)


# ----------------------------------------------------------------------------- pixel units (units: segments)
#
# At 64 px with 8-px patches a patch is as large as a beak, so patch clusters
# are never "the beak".  The finer method works on colour segments: connected
# pixels whose colour changes by less than a tolerance between neighbours
# (the drawn parts are flat colours; noise textures merge into large pieces).
# A segment is foreground when its mean input-gradient saliency (the top
# predicted class's logit, smoothed) is in the image's top ``foreground_share``
# of pixels; the foreground segments, each described by its mean patch
# feature, colour and position relative to the bird, are clustered into parts.
# Each segment counts once in the fit, so small parts weigh as much as large.

SEGMENT_MAX_SHARE = 0.15  # a segment over this share of the image is background texture, never a part
SALIENCY_SIGMA = 2.0  # pixels: the smoothing of the input-gradient magnitude
COLOUR_SCALE = 0.5  # mean RGB (0-1) next to unit-norm features


def colour_segments(rgb: np.ndarray, tolerance: float) -> np.ndarray:
    """(N, H, W) int64 segment ids, unique over the batch: 4-connected pixels whose colours differ by < tolerance.

    Args:
        rgb: (N, 3, H, W) images in 0-1.
        tolerance: largest per-channel step between neighbours inside a segment.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n, _, h, w = rgb.shape
    index = np.arange(n * h * w).reshape(n, h, w)
    across = np.abs(np.diff(rgb, axis=3)).max(1) < tolerance
    down = np.abs(np.diff(rgb, axis=2)).max(1) < tolerance
    rows = np.concatenate([index[:, :, 1:][across], index[:, 1:, :][down]])
    cols = np.concatenate([index[:, :, :-1][across], index[:, :-1, :][down]])
    graph = coo_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=(n * h * w,) * 2)
    return connected_components(graph, directed=False)[1].reshape(n, h, w).astype(np.int64)


def segment_mean(values: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """(N, H, W): each pixel's segment's mean of ``values`` (N, H, W)."""
    flat = segments.ravel()
    total = np.bincount(flat, weights=values.ravel().astype(np.float64))
    return (total / np.maximum(np.bincount(flat), 1))[segments]


def gradient_saliency(gradient: np.ndarray) -> np.ndarray:
    """(N, H, W) in [0, 1]: |d logit / d input| summed over channels, smoothed, over the image's maximum.

    Args:
        gradient: (N, 3, H, W) gradient of the top predicted class's logit w.r.t. the input.
    """
    from scipy.ndimage import gaussian_filter

    g = gaussian_filter(np.abs(gradient).sum(1).astype(np.float64), (0, SALIENCY_SIGMA, SALIENCY_SIGMA))
    return g / np.maximum(g.reshape(len(g), -1).max(1), 1e-12)[:, None, None]


def pixel_foreground(saliency: np.ndarray, segments: np.ndarray, share: float) -> np.ndarray:
    """(N, H, W) bool: pixels of segments whose mean saliency is in the image's top ``share`` of pixels.

    Args:
        saliency: (N, H, W) from ``gradient_saliency``.
        segments: (N, H, W) from ``colour_segments``.
        share: the fraction of each image's pixels taken as foreground (ties and whole segments aside).
    """
    n, h, w = saliency.shape
    size = np.bincount(segments.ravel())[segments]
    score = segment_mean(saliency, segments) * (size <= SEGMENT_MAX_SHARE * h * w)
    cut = np.quantile(score.reshape(n, -1), 1 - share, axis=1)[:, None, None]
    return (score >= cut) & (score > 0)


def segment_descriptors(features: np.ndarray, rgb: np.ndarray, saliency: np.ndarray, segments: np.ndarray,
                        foreground: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Descriptors of the foreground segments: mean unit patch feature, colour and bird-relative position.

    Returns ``(descriptors (S, D + 5), segment of each foreground pixel (P,) in 0..S-1, pixels per segment (S,))``;
    the foreground pixels are taken in ``foreground[...]`` order.

    Args:
        features: (N, G, D) backbone patch features.
        rgb: (N, 3, H, W) images in 0-1.
        saliency: (N, H, W) from ``gradient_saliency``; with the foreground it places the bird.
        segments: (N, H, W) from ``colour_segments``.
        foreground: (N, H, W) from ``pixel_foreground``.
        grid: (g_h, g_w) patch grid of the features.
    """
    n, h, w = foreground.shape
    gh, gw = grid
    ys, xs = np.mgrid[0:h, 0:w]
    pos = np.stack([ys / max(h - 1, 1), xs / max(w - 1, 1)], -1) - 0.5
    weight = foreground * saliency
    weight = weight / np.maximum(weight.sum((1, 2), keepdims=True), 1e-12)
    centre = (weight[..., None] * pos).sum((1, 2), keepdims=True)
    spread = np.sqrt((weight[..., None] * (pos - centre) ** 2).sum((1, 2), keepdims=True)) + 1e-3
    relative = ((pos - centre) / spread * RELATIVE_SCALE)[foreground]
    patch = (ys * gh // h) * gw + xs * gw // w  # the patch cell under each pixel
    unit = _unit(features)[np.nonzero(foreground)[0], np.broadcast_to(patch, (n, h, w))[foreground]]
    colour = rgb.transpose(0, 2, 3, 1)[foreground] * COLOUR_SCALE
    _, member, size = np.unique(segments[foreground], return_inverse=True, return_counts=True)
    pixels = np.concatenate([unit, relative, colour], axis=1)
    out = np.zeros((len(size), pixels.shape[1]))
    np.add.at(out, member, pixels)
    return out / size[:, None], member, size


@dataclass
class SegmentVocabulary:
    """A part vocabulary over colour segments (``units: segments``).

    Attributes:
        part_centres: (k, D + 5) centres of the segment descriptors (label i + 1 is row i).
        grid: the patch grid of the features.
        tolerance: the colour step that ends a segment.
        share: the foreground share of each image.
    """

    part_centres: np.ndarray
    grid: tuple[int, int]
    tolerance: float
    share: float

    @property
    def k(self) -> int:
        return len(self.part_centres)


def _segment_units(features, rgb, gradient, grid, tolerance, share):
    saliency = gradient_saliency(gradient)
    segments = colour_segments(rgb, tolerance)
    foreground = pixel_foreground(saliency, segments, share)
    return foreground, segment_descriptors(features, rgb, saliency, segments, foreground, grid)


def fit_segment_vocabulary(features: np.ndarray, rgb: np.ndarray, gradient: np.ndarray, grid: tuple[int, int],
                           k: int, tolerance: float = 0.1, share: float = 0.15, seed: int = 0) -> SegmentVocabulary:
    """Learn k parts from the foreground colour segments of a sample of (unlabelled) images.

    Args:
        features: (N, G, D) backbone patch features.
        rgb: (N, 3, H, W) the network input in 0-1.
        gradient: (N, 3, H, W) gradient of the top predicted class's logit w.r.t. the input.
        grid: (g_h, g_w) with g_h * g_w = G.
        k: number of parts (background comes on top).
        tolerance: colour step that ends a segment (0-1 per channel).
        share: fraction of each image's pixels taken as foreground.
        seed: k-means seed.
    """
    _, (descriptors, _, size) = _segment_units(features, rgb, gradient, grid, tolerance, share)
    kept = descriptors[size >= 3]  # one- and two-pixel specks are noise, not parts
    if len(kept) < k:
        raise ValueError(f"only {len(kept)} foreground segments in the sample for k = {k} parts; sample more images")
    centres = KMeans(k, n_init=2, random_state=seed).fit(kept).cluster_centers_
    return SegmentVocabulary(centres, tuple(grid), tolerance, share)


def assign_segment_parts(vocabulary: SegmentVocabulary, features: np.ndarray, rgb: np.ndarray,
                         gradient: np.ndarray) -> np.ndarray:
    """(N, H, W) int8 pixel part labels: 0 background, 1..k the nearest part centre of the pixel's segment.

    Args:
        vocabulary: from ``fit_segment_vocabulary``.
        features: (N, G, D) backbone patch features.
        rgb: (N, 3, H, W) the network input in 0-1.
        gradient: (N, 3, H, W) gradient of the top predicted class's logit w.r.t. the input.
    """
    foreground, (descriptors, member, _) = _segment_units(features, rgb, gradient, vocabulary.grid,
                                                          vocabulary.tolerance, vocabulary.share)
    labels = np.zeros(foreground.shape, dtype=np.int8)
    if len(descriptors):
        labels[foreground] = (_nearest(descriptors, vocabulary.part_centres) + 1)[member]
    return labels
