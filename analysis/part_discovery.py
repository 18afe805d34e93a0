"""Discovered parts: a part vocabulary learned from the images alone, and its score against ground truth.

Two methods (``discovery.units``).  The default, ``aligned``, places every bird
in its own body frame and learns the parts as places in that frame, at pixel
resolution (see "pixel units" below; chosen on the embedded default over
``patches`` by an occlusion trait recovery of 0.63 against 0.44, and checked on
a held-out set: 0.64 against 0.59, ``benchmarks/discovery_pixels.py``).
``patches`` is the co-part segmentation of Amir et al. (2021, "Deep
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


def _kmeans(k: int, n_init: int, seed: int):
    """scikit-learn's KMeans, imported here: the region effects read body frames from this module without
    paying scikit-learn's import (1-2 s a job)."""
    from sklearn.cluster import KMeans

    return KMeans(k, n_init=n_init, random_state=seed)


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
    stage1 = _kmeans(foreground_clusters, 2, seed).fit(fg_desc)
    sal = saliency.reshape(-1)
    vote = np.array([sal[stage1.labels_ == c].mean() if (stage1.labels_ == c).any() else 0.0
                     for c in range(foreground_clusters)])
    foreground = vote >= sal.mean()
    on = foreground[stage1.labels_]
    parts = part_descriptors(features, saliency, grid).reshape(-1, features.shape[-1] + 4)[on]
    if len(parts) < k:
        raise ValueError(f"only {len(parts)} foreground patches in the sample for k = {k} parts; sample more images")
    stage2 = _kmeans(k, 3, seed).fit(parts)
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

K_RANGE = (6, 24)  # [min, max] k tried by ``k: auto`` (the schema's discovery.k_range; see choose_part_count)
K_SWEEP_PATCHES = 10_000  # foreground patches the k sweep clusters (a seeded subsample; keeps it cheap at CUB scale)


@dataclass
class PartCountChoice:
    """The number of parts chosen on the fit sample (``choose_part_count``), with the curve it was read from.

    Attributes:
        k: the chosen number of parts.
        candidates: every k tried.
        inertia: k-means inertia (within-cluster sum of squares) at each candidate.
        criterion: how k was read from the curve.
    """

    k: int
    candidates: list[int]
    inertia: list[float]
    criterion: str = "inertia_elbow"

    def metadata(self) -> dict:
        """Key-value metadata for ``discovered_parts.parquet``."""
        return {"k_criterion": self.criterion, "k_candidates": self.candidates,
                "k_inertia": [round(v, 4) for v in self.inertia]}


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
                      k_range: tuple[int, int] = K_RANGE, foreground_clusters: int = 12,
                      seed: int = 0) -> PartCountChoice:
    """Choose k on the (unlabelled) fit sample: the elbow of the parts stage's k-means inertia over ``k_range``.

    The foreground stage runs once; the parts stage is clustered for every k
    on a seeded subsample of ``K_SWEEP_PATCHES`` foreground patches.
    Measured on the embedded default's trained models (k 6-16), the
    silhouette was flat (0.06-0.13) and would pick the range's ends (it was
    recorded beside the inertia until it proved to cost 2-3 s of every
    discover job and was dropped); the elbow picked 11 (Prompt-CAM: part NMI 0.346, ARI
    0.270 against 0.349, 0.285 at k = 10) and 10 (INTR, the same as k = 10).
    The elbow of a smooth curve sits inside the range, so ``k_range`` bounds
    the answer: widen it for data with many more parts. (These picks were
    measured with the range 6-16; ``K_RANGE`` is now 6-24, chosen for
    ``units: aligned``: see "pixel units" below.)

    Args:
        features: (N, G, D) backbone patch features of the fit sample.
        saliency: (N, G) from ``attention_saliency``.
        grid: (g_h, g_w).
        k_range: [smallest, largest] k tried.
        foreground_clusters: clusters of the foreground stage.
        seed: seed of the subsample and of k-means.
    """
    lo, hi = int(k_range[0]), int(k_range[1])
    if not 2 <= lo <= hi:
        raise ValueError(f"k_range must be [min, max] with 2 <= min <= max, got {list(k_range)}")
    first = fit_part_vocabulary(features, saliency, grid, lo, foreground_clusters=foreground_clusters, seed=seed)
    return sweep_part_count(foreground_part_descriptors(first, features, saliency), (lo, hi), seed, "patches")


def sweep_part_count(points: np.ndarray, k_range: tuple[int, int], seed: int, unit: str,
                     weights: np.ndarray | None = None) -> PartCountChoice:
    """The elbow of k-means inertia over ``k_range`` on ``points`` (unweighted points: a seeded subsample of
    ``K_SWEEP_PATCHES``; weighted ones are taken as given).

    Args:
        points: (M, D) what the parts stage clusters.
        k_range: [smallest, largest] k tried (checked by the caller).
        seed: seed of the subsample and of k-means.
        unit: what the points are, for the error message.
        weights: (M,) k-means sample weights, or None.
    """
    lo, hi = int(k_range[0]), int(k_range[1])
    rng = np.random.default_rng(seed)
    if weights is None and len(points) > K_SWEEP_PATCHES:
        points = points[np.sort(rng.choice(len(points), K_SWEEP_PATCHES, replace=False))]
    candidates = [k for k in range(lo, hi + 1) if k < len(points)]
    if not candidates:
        raise ValueError(f"only {len(points)} foreground {unit} in the sample for k >= {lo}; sample more images")
    inertia = [float(_kmeans(k, 2, seed).fit(points, sample_weight=weights).inertia_)
               for k in candidates]
    return PartCountChoice(elbow(candidates, inertia), candidates, inertia)


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
    return contingency_agreement(image_contingency(labels, truth).sum(0))


def image_contingency(labels: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N, L, T) int64 per image (row): how many scored cells (truth >= 0) have each (label, truth) pair.

    Labels and truth are non-negative integers; L and T are one more than their largest values.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(len(labels), -1)
    truth = np.asarray(truth, dtype=np.int64).reshape(len(truth), -1)
    n_l, n_t = int(labels.max(initial=0)) + 1, int(max(truth.max(initial=0), 0)) + 1
    scored = truth >= 0
    image = np.broadcast_to(np.arange(len(labels))[:, None], labels.shape)[scored]
    flat = (image * n_l + labels[scored]) * n_t + truth[scored]
    return np.bincount(flat, minlength=len(labels) * n_l * n_t).reshape(len(labels), n_l, n_t)


def contingency_agreement(table: np.ndarray) -> tuple[float, float]:
    """(NMI with the arithmetic mean, ARI) from a (labels x truth) contingency table; sklearn's definitions."""
    from scipy.special import comb

    c = np.asarray(table, dtype=np.float64)
    n = c.sum()
    if n == 0:
        return float("nan"), float("nan")
    a, b = c.sum(1), c.sum(0)

    def entropy(counts: np.ndarray) -> float:
        p = counts[counts > 0] / n
        return float(-(p * np.log(p)).sum())

    nz = c > 0
    mi = float((c[nz] / n * (np.log(c[nz] / n) - np.log(np.outer(a, b)[nz] / n ** 2))).sum())
    h_l, h_t = entropy(a), entropy(b)
    if h_l == 0 or h_t == 0:  # one cluster on either side: sklearn returns 1 if both, else 0
        nmi = 1.0 if h_l == h_t else 0.0
    else:
        nmi = max(mi, 0.0) / ((h_l + h_t) / 2)
    pairs = comb(c, 2).sum()
    rows, cols = comb(a, 2).sum(), comb(b, 2).sum()
    expected = rows * cols / comb(n, 2) if n > 1 else 0.0
    top = (rows + cols) / 2
    ari = 1.0 if top == expected else float((pairs - expected) / (top - expected))
    return float(nmi), ari


def agreement_rows(method: str, split: str, labels: np.ndarray, truth: np.ndarray,
                   resamples: int = 200, seed: int = 0) -> list[dict]:
    """``part_discovery_nmi`` and ``part_discovery_ari`` rows (evaluation layout), bootstrap over images.

    Each image's contingency table is counted once; a resample sums the tables of its images.

    Args:
        method: the row's method (a model, or ``grid`` / ``random``).
        split: the scored split.
        labels: (N, G) part labels (0 background).
        truth: (N, G) true part per patch, -1 where not scored.
        resamples: bootstrap resamples of the images for the interval.
        seed: bootstrap seed.
    """
    tables = image_contingency(labels, truth)
    value = contingency_agreement(tables.sum(0))
    rng = np.random.default_rng(seed)
    boot = np.array([contingency_agreement(np.tensordot(np.bincount(idx, minlength=len(tables)), tables, axes=1))
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


# ----------------------------------------------------------------------------- pixel units (units: aligned)
# At 64 px a patch is 8 x 8 pixels, so the beak, the eye and the crown share a
# patch with the head and the background, and patch clusters are never "the
# beak".  ``units: aligned`` places every image's bird in its own body frame
# and learns the parts as places in that frame, at pixel resolution:
#
# 1. Foreground.  Pixels are joined into colour segments; a segment's saliency
#    is the mean of the smoothed |d logit / d input| of the top predicted class
#    over its pixels (no label is read).  The foreground is the connected
#    component, among the image's top ``share`` of pixels, holding the most
#    saliency: the bird is one connected thing, the decoys around it are not
#    part of it.
# 2. Body frame.  Origin at the foreground's centre, unit its spread (the root
#    of the trace of its covariance), so position and size drop out.  The facing
#    direction is found by congealing: every image's saliency is drawn on a
#    body-frame grid, mirrored and not, and each image takes the side that
#    matches the mean of all images' chosen sides best, until no image changes
#    (started from the medoid image).  The fitted template then decides the
#    side of every new image.  No rotation: the principal axis of a noisy
#    foreground was worse than none on the default (facing agreement 0.76
#    against 0.90).
# 3. Parts.  k-means, over the fit sample's foreground pixels, of their colour
#    segment's place (mean body-frame position of its foreground pixels), size,
#    shape (spatial variance over area: a disk is lowest) and the share of its
#    border that faces background (``segment_places``); every pixel of a segment
#    takes its segment's nearest centre, background 0 where most of the segment
#    lies outside the foreground, so part borders follow colour borders.
#    Colour segments are nearly pure (an eye segment is 0.99 eye on the default),
#    so what mixes parts is the clustering: the eye and the crown's pieces share
#    a place and a size, but the eye is a compact disk that touches no
#    background.  Chosen on the design set (seed 0; mean over k 10 and 12, two
#    k-means seeds and both models):
#      place only (pixel position)        NMI 0.35  ARI 0.24
#      + size                              NMI 0.40  ARI 0.31  recovery 0.66
#      + size, shape, border (weights 1)   NMI 0.44  ARI 0.35  recovery 0.77
#    (the best eye cluster's eye share 0.32 -> 0.51); border weight 2 without
#    shape, or shape 1.5-2, gave no better NMI / ARI and lower recovery.  The
#    extra features pay at 12-14 parts (recovery 0.79-0.88 over three k-means
#    seeds) and cost at 8 (INTR 0.38 against 0.60), so ``K_RANGE`` became 6-24.
#    The inertia curve is smooth and its elbow moves with the range: 10-11
#    parts for 6-16, 12-13 for 6-24.
#    The fit (and the k sweep) is on every foreground pixel, as segments
#    weighted by their pixels (``segment_points``), not on a 30,000-pixel
#    subsample: with the subsample the fine-tuned INTR's eye had a part of its
#    own for two of three seeds (eye share 0.36 / 0.74 / 0.71, NMI 0.40-0.43;
#    more k-means restarts changed nothing, the subsample decided), with all
#    pixels for all three (0.77 / 0.72 / 0.72, NMI 0.43-0.44; Prompt-CAM NMI
#    0.46-0.47 -> 0.48). Design set, harness of the default's models.

SEGMENT_MAX_SHARE = 0.15  # a segment over this share of the image is background texture, never a part
SALIENCY_SIGMA = 2.0  # pixels: the smoothing of the input-gradient magnitude
FRAME_BINS = 24  # cells per side of the body-frame grid the facing template is drawn on
FRAME_EXTENT = 3.0  # half-width of that grid in spreads
CONGEAL_ROUNDS = 10  # most rounds of the facing congealing (it stops when no image changes side)
SEGMENT_SIZE_WEIGHT = 0.6  # weight of a segment's log size beside its body-frame place (spreads)
SEGMENT_BORDER_WEIGHT = 1.0  # weight of the share of a segment's border that faces background
SEGMENT_SHAPE_WEIGHT = 1.0  # weight of the log of a segment's spatial variance over its area
FIT_SEGMENTS = 50_000  # most foreground segments the part k-means (and its k sweep) is fitted on (a seeded subsample)
SEGMENT_CHUNK_PIXELS = 1 << 22  # pixels joined into colour segments at once (1,024 images of 64 x 64)


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


def salient_foreground(rgb: np.ndarray, gradient: np.ndarray, tolerance: float,
                       share: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(saliency (N, H, W) in [0, 1], foreground (N, H, W) bool, colour segments (N, H, W)) of a batch.

    Args:
        rgb: (N, 3, H, W) images in 0-1.
        gradient: (N, 3, H, W) gradient of the top predicted class's logit w.r.t. the input.
        tolerance: colour step that ends a segment.
        share: fraction of each image's pixels the foreground is drawn from.
    """
    n, _, h, w = rgb.shape
    step = max(1, SEGMENT_CHUNK_PIXELS // (h * w))  # the segment graph of a few million pixels at a time
    segments = np.concatenate([colour_segments(rgb[s:s + step], tolerance) + s * h * w for s in range(0, n, step)])
    size = np.bincount(segments.ravel())[segments]
    saliency = segment_mean(gradient_saliency(gradient), segments) * (size <= SEGMENT_MAX_SHARE * h * w)
    saliency = saliency / np.maximum(saliency.reshape(n, -1).max(1), 1e-12)[:, None, None]
    return saliency, heaviest_top_piece(saliency, share), segments


def heaviest_top_piece(saliency: np.ndarray, share: float) -> np.ndarray:
    """(N, H, W) bool: per image, the 4-connected piece of its top ``share`` of (positive) saliency that holds
    the most saliency (the first in scan order on a tie); all False where no pixel is positive.

    Args:
        saliency: (N, H, W) non-negative saliency.
        share: fraction of each image's pixels the piece is drawn from.
    """
    from scipy import ndimage

    n = len(saliency)
    if not n:
        return np.zeros(saliency.shape, dtype=bool)
    top = (saliency >= np.quantile(saliency.reshape(n, -1), 1 - share, axis=1)[:, None, None]) & (saliency > 0)
    within = np.zeros((3, 3, 3), dtype=bool)  # 4-connected within an image, never across images:
    within[1] = ndimage.generate_binary_structure(2, 1)  # pieces are numbered image by image, in scan order
    pieces, _ = ndimage.label(top, structure=within)
    mass = np.bincount(pieces.ravel(), weights=saliency.ravel())
    last = np.maximum.accumulate(pieces.reshape(n, -1).max(1))  # image i's pieces are (last[i - 1], last[i]]
    best = np.zeros(n, dtype=np.int64)  # 0: no piece
    for i, (lo, hi) in enumerate(zip(np.r_[0, last[:-1]], last)):
        if hi > lo:
            best[i] = lo + 1 + int(np.argmax(mass[lo + 1:hi + 1]))
    return (pieces == best[:, None, None]) & (best > 0)[:, None, None]


def pixel_positions(h: int, w: int) -> np.ndarray:
    """(H * W, 2) float64 (row, col) pixel centres in units of the longer side."""
    rows, cols = np.divmod(np.arange(h * w), w)
    return np.stack([rows, cols], axis=-1) / max(h, w)


def body_frames(foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre (N, 2), spread (N,)) of each image's foreground pixels; an empty foreground gets the image's."""
    n, h, w = foreground.shape
    pos = pixel_positions(h, w)
    weight = foreground.reshape(n, -1).astype(np.float64)
    weight[weight.sum(1) == 0] = 1.0
    weight /= weight.sum(1, keepdims=True)
    centre = weight @ pos
    spread = np.sqrt(np.einsum("np,npi->n", weight, (pos[None] - centre[:, None]) ** 2))
    return centre, np.maximum(spread, 1.0 / max(h, w))


def frame_coordinates(shape: tuple[int, int], centre: np.ndarray, spread: np.ndarray,
                      mirrored: np.ndarray) -> np.ndarray:
    """(N, H * W, 2) every pixel's body-frame position (along, across), in spreads; ``mirrored`` flips along."""
    pos = pixel_positions(*shape)
    rel = (pos[None] - centre[:, None]) / spread[:, None, None]
    along = np.where(np.asarray(mirrored)[:, None], -rel[..., 1], rel[..., 1])
    return np.stack([along, rel[..., 0]], axis=-1)


def frame_cells(coords: np.ndarray, bins: int) -> np.ndarray:
    """(..., ) int64 cell (across * bins + along) of a ``bins`` x ``bins`` grid over +-``FRAME_EXTENT`` spreads of
    the body frame, for body-frame positions ``coords`` (..., 2); positions beyond the grid fall in its edge cells."""
    cell = np.clip(((coords + FRAME_EXTENT) / (2 * FRAME_EXTENT) * bins).astype(np.int64), 0, bins - 1)
    return cell[..., 1] * bins + cell[..., 0]


@dataclass
class BodyFrames:
    """Each image's body frame (``units: aligned``), the frame its parts are placed in.

    Attributes:
        centre: (N, 2) the foreground's centre (row, col) in units of the image's longer side.
        spread: (N,) the foreground's spread in the same units.
        mirrored: (N,) bool: the image faces the other way than the template, so its along axis is flipped.
    """

    centre: np.ndarray
    spread: np.ndarray
    mirrored: np.ndarray

    @classmethod
    def concatenate(cls, parts: list[BodyFrames]) -> BodyFrames:
        """The frames of several batches, in order."""
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("centre", "spread", "mirrored")))

    def cells(self, shape: tuple[int, int], bins: int) -> np.ndarray:
        """(N, H, W) every pixel's cell of the ``bins`` x ``bins`` body-frame grid (``frame_cells``)."""
        coords = frame_coordinates(shape, self.centre, self.spread, self.mirrored)
        return frame_cells(coords, bins).reshape(len(self.spread), *shape)


def frame_maps(saliency: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """(N, FRAME_BINS ** 2) each image's saliency drawn on the body-frame grid, summing to 1 (0 where none)."""
    n = len(saliency)
    index = frame_cells(coords, FRAME_BINS) + (np.arange(n) * FRAME_BINS ** 2)[:, None]
    maps = np.bincount(index.ravel(), weights=saliency.reshape(n, -1).ravel(),
                       minlength=n * FRAME_BINS ** 2).reshape(n, -1)
    return maps / np.maximum(maps.sum(1, keepdims=True), 1e-12)


def congeal_facing(maps: np.ndarray, mirrored_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mirror (N,) bool, template (B,)): the side of each image that agrees with the mean of all chosen sides.

    Args:
        maps: (N, B) body-frame saliency maps as seen.
        mirrored_maps: (N, B) the same, mirrored along the body axis.
    """
    both = np.stack([maps, mirrored_maps], axis=1)
    agreement = np.maximum(maps @ maps.T, maps @ mirrored_maps.T)
    template = maps[int(np.argmax(agreement.sum(1)))]  # the medoid up to facing
    mirror = np.zeros(len(maps), dtype=bool)
    for round_ in range(CONGEAL_ROUNDS):
        new = mirrored_maps @ template > maps @ template
        template = both[np.arange(len(maps)), new.astype(np.int64)].mean(0)
        if round_ and (new == mirror).all():
            break
        mirror = new
    return mirror, template


@dataclass
class AlignedVocabulary:
    """A part vocabulary of body-frame places (``units: aligned``).

    Attributes:
        template: (FRAME_BINS ** 2,) the mean body-frame saliency of the fit sample, facing one way.
        part_centres: (k, 5) centres of the parts in segment-place space (``segment_places``: body-frame
            along, across, weighted log size, border share outside, log shape); label i + 1 is row i.
        tolerance: the colour step that ends a segment.
        share: the fraction of each image's pixels the foreground is drawn from.
    """

    template: np.ndarray
    part_centres: np.ndarray
    tolerance: float
    share: float

    @property
    def k(self) -> int:
        return len(self.part_centres)


def segment_places(segments: np.ndarray, foreground: np.ndarray, coords: np.ndarray,
                   spread: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features (M, 5), inverse (N * H * W,)): what each of the M colour segments is clustered by, its place,
    size and shape in the body frame, and each pixel's segment (``features[inverse]`` is per pixel; only
    the pixels needed are ever expanded, which keeps CUB-scale fits in memory).

    Per segment, over its foreground pixels: the mean body-frame position (along, across); the log of
    their count in squared spreads (times ``SEGMENT_SIZE_WEIGHT``); the share of its border that faces
    background (times ``SEGMENT_BORDER_WEIGHT``); and the log of its spatial variance over its area
    (times ``SEGMENT_SHAPE_WEIGHT``). Every pixel of a segment is clustered alike. An eye in a crown sits
    at the crown's place; it is a compact disk that touches no background, where the crown's pieces
    are rings or stripes at the bird's edge.

    Args:
        segments: (N, H, W) segment ids (``colour_segments``).
        foreground: (N, H, W) bool.
        coords: (N, H * W, 2) body-frame positions (``frame_coordinates``).
        spread: (N,) each image's spread in units of the longer side.
    """
    n, h, w = foreground.shape
    inverse, m = compact_ids(segments.ravel())
    fg = foreground.ravel().astype(np.float64)
    count = np.maximum(np.bincount(inverse, weights=fg, minlength=m), 1.0)
    flat = coords.reshape(-1, 2)
    place = np.stack([np.bincount(inverse, weights=flat[:, j] * fg, minlength=m) for j in range(2)], 1) / count[:, None]
    square = sum(np.bincount(inverse, weights=flat[:, j] ** 2 * fg, minlength=m) for j in range(2)) / count
    image = np.zeros(m, dtype=np.int64)
    image[inverse] = np.repeat(np.arange(n), h * w)
    pixel = (spread[image] * max(h, w)) ** 2  # one pixel's area in squared spreads is 1 / pixel
    variance = np.maximum(square - (place ** 2).sum(1), 0.0) + 1.0 / (6.0 * pixel)  # a lone pixel's own
    size = np.log(count / pixel)
    shape = np.log(variance * pixel / count)  # a disk: log(1 / (2 pi)); rings and stripes: more
    outside = segment_border_outside(inverse.reshape(n, h, w), foreground, m)
    return np.concatenate([place, SEGMENT_SIZE_WEIGHT * size[:, None], SEGMENT_BORDER_WEIGHT * outside[:, None],
                           SEGMENT_SHAPE_WEIGHT * shape[:, None]], 1), inverse


def segment_border_outside(segments: np.ndarray, foreground: np.ndarray, count: int) -> np.ndarray:
    """(count,) per segment id 0..count-1: the share of its border (4-neighbour steps into another segment
    or off the image) that lands outside the foreground (0 where it has no border).

    Args:
        segments: (N, H, W) segment ids in 0..count-1.
        foreground: (N, H, W) bool.
    """
    border = np.zeros(count)
    outside = np.zeros(count)
    for axis in (1, 2):
        ids, fg = np.moveaxis(segments, axis, -1), np.moveaxis(foreground, axis, -1)
        step = ids[..., 1:] != ids[..., :-1]
        for here, there_fg in ((ids[..., 1:], fg[..., :-1]), (ids[..., :-1], fg[..., 1:])):  # each side of a step
            border += np.bincount(here[step], minlength=count)
            outside += np.bincount(here[step], weights=~there_fg[step], minlength=count)
        for edge in (ids[..., 0], ids[..., -1]):  # off the image is outside
            border += np.bincount(edge.ravel(), minlength=count)
            outside += np.bincount(edge.ravel(), minlength=count)
    return outside / np.maximum(border, 1.0)


def _aligned_units(rgb, gradient, tolerance, share, template=None):
    """Foreground, segments, (the segments' places, each pixel's segment) (``segment_places``), the
    facing template and the ``BodyFrames`` of a batch (facing by ``template``, or congealed)."""
    saliency, foreground, segments = salient_foreground(rgb, gradient, tolerance, share)
    centre, spread = body_frames(foreground)
    coords = frame_coordinates(foreground.shape[1:], centre, spread, np.zeros(len(rgb), bool))
    seen = frame_maps(saliency, coords)
    coords[..., 0] *= -1  # mirrored along the body axis
    mirrored = frame_maps(saliency, coords)
    if template is None:
        mirror, template = congeal_facing(seen, mirrored)
    else:
        mirror = mirrored @ template > seen @ template
    coords[..., 0] *= np.where(mirror, 1.0, -1.0)[:, None]  # back to as seen where the image is not mirrored
    frames = BodyFrames(centre, spread, mirror)
    return foreground, segments, segment_places(segments, foreground, coords, spread), template, frames


def segment_points(places: np.ndarray, inverse: np.ndarray, foreground: np.ndarray,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(points (M, F), weights (M,)): the foreground segments' features, each weighted by its foreground pixels.

    k-means on them is k-means on every foreground pixel (a pixel is clustered by its segment's
    features), without a pixel subsample: a small part (an eye: a few pixels in a few hundred
    thousand) is always fully in the fit, where a subsample of pixels held it by chance, so the
    parts found changed with the seed. Above ``FIT_SEGMENTS`` segments, a seeded subsample of them.

    Args:
        places, inverse: from ``segment_places``.
        foreground: (N, H, W) bool.
        seed: seed of the subsample.
    """
    count = np.bincount(inverse[foreground.ravel()], minlength=len(places))
    keep = np.flatnonzero(count)
    if len(keep) > FIT_SEGMENTS:
        keep = np.sort(np.random.default_rng(seed).choice(keep, FIT_SEGMENTS, replace=False))
    return places[keep], count[keep].astype(np.float64)


def fit_aligned_vocabulary(rgb: np.ndarray, gradient: np.ndarray, k: int | str, k_range: tuple[int, int] = K_RANGE,
                           tolerance: float = 0.1, share: float = 0.2,
                           seed: int = 0) -> tuple[AlignedVocabulary, PartCountChoice | None]:
    """Learn the facing template and k body-frame parts from a sample of (unlabelled) images.

    Returns the vocabulary and, with ``k: auto``, the choice of k (the elbow of
    the parts k-means' inertia over ``k_range``, as for patches).

    Args:
        rgb: (N, 3, H, W) the network input in 0-1.
        gradient: (N, 3, H, W) gradient of the top predicted class's logit w.r.t. the input.
        k: number of parts (background comes on top), or ``auto``.
        k_range: [min, max] k tried by ``auto``.
        tolerance: colour step that ends a segment (0-1 per channel).
        share: fraction of each image's pixels the foreground is drawn from.
        seed: seed of the subsample and of k-means.
    """
    foreground, _, (places, inverse), template, _ = _aligned_units(rgb, gradient, tolerance, share)
    points, weights = segment_points(places, inverse, foreground, seed)
    choice = sweep_part_count(points, tuple(k_range), seed, "segments", weights) if k == "auto" else None
    k = choice.k if choice is not None else int(k)
    if len(points) < k:
        raise ValueError(f"only {len(points)} foreground segments in the sample for k = {k} parts; sample more images")
    centres = _kmeans(k, 3, seed).fit(points, sample_weight=weights).cluster_centers_
    return AlignedVocabulary(template, centres, tolerance, share), choice


def assign_aligned_parts(vocabulary: AlignedVocabulary, rgb: np.ndarray, gradient: np.ndarray) -> np.ndarray:
    """(N, H, W) int8 pixel part labels: 0 background, 1..k the nearest body-frame part, snapped to colour segments.

    Args:
        vocabulary: from ``fit_aligned_vocabulary``.
        rgb: (N, 3, H, W) the network input in 0-1.
        gradient: (N, 3, H, W) gradient of the top predicted class's logit w.r.t. the input.
    """
    return assign_aligned_parts_and_frames(vocabulary, rgb, gradient)[0]


def assign_aligned_parts_and_frames(vocabulary: AlignedVocabulary, rgb: np.ndarray,
                                    gradient: np.ndarray) -> tuple[np.ndarray, BodyFrames]:
    """(``assign_aligned_parts``' labels, the images' ``BodyFrames``), arguments as there."""
    foreground, segments, (places, inverse), _, frames = _aligned_units(rgb, gradient, vocabulary.tolerance,
                                                                        vocabulary.share, vocabulary.template)
    labels = np.zeros(foreground.size, dtype=np.int64)
    fg = foreground.ravel()
    labels[fg] = _nearest(places, vocabulary.part_centres)[inverse[fg]] + 1
    return segment_majority(segments, labels.reshape(foreground.shape), vocabulary.k + 1), frames


def compact_ids(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """(rank, m): each of the non-negative ``ids``' rank among the m distinct ones (``np.unique``'s inverse,
    by one pass over a table as long as the largest id instead of a sort)."""
    present = np.zeros(int(ids.max()) + 1 if ids.size else 0, dtype=bool)
    present[ids] = True
    rank = np.cumsum(present) - 1
    return rank[ids], int(rank[-1]) + 1 if ids.size else 0


def segment_majority(segments: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """(N, H, W) int8: every pixel takes the label most pixels of its segment have (ties: the smaller label)."""
    segment, m = compact_ids(segments.ravel())
    counts = np.bincount(segment * n_labels + labels.ravel(), minlength=m * n_labels).reshape(m, n_labels)
    return counts.argmax(1).astype(np.int8)[segment].reshape(segments.shape)  # argmax: the first of a tie


def write_discovered_parts(out: str | Path, image_ids: np.ndarray, labels: np.ndarray, frames: BodyFrames | None,
                           metadata: dict) -> Path:
    """``discovered_parts.parquet``: every image's label map (N, cells) and body frame (null without one).

    Args:
        out: the file to write.
        image_ids: (N,) the images.
        labels: (N, cells) part labels: 0 background, 1..k the parts.
        frames: the images' body frames (``units: aligned``; None: none, as with ``units: patches``).
        metadata: the table's metadata (``grid_h``, ``grid_w``, ``k``, ...: docs/tables.md).
    """
    from analysis import tables
    from analysis.regions import DiscoveredParts

    if frames is None:
        placed = {name: [None] * len(image_ids) for name in DiscoveredParts.FRAME_COLUMNS}
    else:
        placed = dict(zip(DiscoveredParts.FRAME_COLUMNS, (frames.centre[:, 0].astype(np.float32),
                                                          frames.centre[:, 1].astype(np.float32),
                                                          frames.spread.astype(np.float32),
                                                          frames.mirrored.astype(bool))))
    return tables.write_columns("discovered_parts", {"image_id": np.asarray(image_ids, dtype=np.int32),
                                                     "labels": labels, **placed},
                                out, metadata=metadata, cells=labels.shape[1])
