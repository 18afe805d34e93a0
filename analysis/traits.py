"""Head types and trait clusters: what each attention head looks at, and which traits recur.

* **Head types** (``head_types``): every head is described by its mean
  region-mass profile over the true class's maps (the mean over classes of
  each class's mean, so every species weighs the same). Heads are clustered
  by Ward agglomeration on the profiles standardised per region across heads
  (so a head type means "looks at the beak *more than the other heads do*"),
  k fixed or chosen by silhouette. A head's ``dominant_region`` is the
  region of highest mean density (mass / area); ``consistency`` is the share
  of classes whose own dominant region for that head is the same ("head 7
  looks at the beak, in 90 % of species").
* **Traits** (``cluster_traits``): every (image, true class, top-ranked
  head) map is one member. Its feature joins the map's region-mass vector
  (standardised per region) with the attention-weighted patch feature from
  ``trait_features.parquet`` (L2-normalised, reduced by PCA to at most 32
  dimensions); each block is scaled to unit total variance so neither
  outweighs the other. k-means, k fixed or chosen by silhouette (on a seeded
  sample of at most 3,000 members) within ``k_range``. A member's dominant
  region is its region of highest density; a trait's dominant region is its
  members' most frequent one, ``purity`` the share of members that agree,
  and the name is the dominant region made unique with a suffix (``beak``,
  ``beak_2``). Representatives are the members nearest the centroid. 2-D
  coordinates come from UMAP (umap-learn, seeded); below 5 members, or if
  UMAP fails, from PCA.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd

REPRESENTATIVES = 8
PCA_DIMS = 32
SILHOUETTE_SAMPLE = 3000


def dominant_region(density: np.ndarray) -> np.ndarray:
    """(n,) index of each row's region of highest density (NaN regions, absent from the image, never win)."""
    d = np.where(np.isfinite(density), density, -np.inf)
    return d.argmax(1)


def _standardise(x: np.ndarray) -> np.ndarray:
    """Columns to zero mean and unit variance (constant columns become 0)."""
    sd = x.std(0)
    return (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)


def _silhouette_k(x: np.ndarray, ks: Sequence[int], fit, seed: int) -> tuple[int, np.ndarray]:
    """The k (and labels) of highest silhouette among ``ks``; ``fit(k)`` returns labels."""
    from sklearn.metrics import silhouette_score

    best = (-np.inf, None, None)
    sample = min(len(x), SILHOUETTE_SAMPLE)
    for k in ks:
        labels = fit(k)
        if len(np.unique(labels)) < 2:
            continue
        score = silhouette_score(x, labels, sample_size=sample, random_state=seed)
        if score > best[0]:
            best = (score, k, labels)
    if best[1] is None:
        return 1, np.zeros(len(x), dtype=np.int64)
    return best[1], best[2]


def head_types(head: np.ndarray, class_id: np.ndarray, mass: np.ndarray, area: np.ndarray,
               vocab: Sequence[str], k: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Cluster heads by their mean region-mass profile.

    Args:
        head, class_id: per map (true-class maps, every head).
        mass: (n, R) region mass of each map; area: (n, R) the regions' areas in its image.
        vocab: the R region names.
        k: number of head types; None picks it by silhouette (2 .. min(8, heads - 1)).
        seed: unused by Ward (deterministic); kept for the silhouette sample.

    Returns:
        head_types rows: head, head_type, dominant_region, profile (mean mass, R floats),
        type_dominant_region, consistency, n_maps.
    """
    from sklearn.cluster import AgglomerativeClustering

    heads = np.unique(head)
    classes, cls_idx = np.unique(class_id, return_inverse=True)
    h_idx = np.searchsorted(heads, head)
    H, C, R = len(heads), len(classes), mass.shape[1]
    key = cls_idx * H + h_idx
    counts = np.bincount(key, minlength=C * H).reshape(C, H)
    sums = np.stack([np.bincount(key, mass[:, r], minlength=C * H) for r in range(R)], -1).reshape(C, H, R)
    asum = np.stack([np.bincount(key, area[:, r], minlength=C * H) for r in range(R)], -1).reshape(C, H, R)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = sums / counts[..., None]
        per_class_area = asum / counts[..., None]
        profile = np.nanmean(np.where(counts[..., None] > 0, per_class, np.nan), axis=0)  # (H, R)
        mean_area = np.nanmean(np.where(counts[..., None] > 0, per_class_area, np.nan), axis=0)
        dens = np.where(mean_area > 0, profile / mean_area, np.nan)
        class_dens = np.where(per_class_area > 0, per_class / per_class_area, np.nan)  # (C, H, R)
    dom = dominant_region(dens)
    class_dom = np.where(np.isfinite(class_dens).any(-1), np.nanargmax(np.where(np.isfinite(class_dens),
                                                                               class_dens, -np.inf), -1), -1)
    present = counts > 0
    consistency = ((class_dom == dom[None]) & present).sum(0) / np.maximum(present.sum(0), 1)
    x = _standardise(np.nan_to_num(profile))
    if H < 3:
        labels = np.arange(H)
    else:
        def fit(kk: int) -> np.ndarray:
            return AgglomerativeClustering(n_clusters=kk, linkage="ward").fit_predict(x)

        if k is not None:
            labels = fit(min(int(k), H))
        else:
            _, labels = _silhouette_k(x, range(2, min(8, H - 1) + 1), fit, seed)
    labels = _relabel_by_first(labels)
    type_dom = {}
    for t in np.unique(labels):
        with np.errstate(invalid="ignore"):
            td = np.nanmean(dens[labels == t], 0)
        type_dom[t] = vocab[int(dominant_region(td[None])[0])]
    return pd.DataFrame({
        "head": heads.astype(np.int8), "head_type": labels.astype(np.int16),
        "dominant_region": [vocab[i] for i in dom], "profile": list(profile.astype(np.float32)),
        "type_dominant_region": [type_dom[t] for t in labels],
        "consistency": consistency.astype(np.float32), "n_maps": counts.sum(0).astype(np.int32)})


def _relabel_by_first(labels: np.ndarray) -> np.ndarray:
    """Cluster ids renumbered 0, 1, ... in order of first appearance (stable across runs)."""
    uniq, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(uniq))
    return rank[inverse]


def trait_features_matrix(mass: np.ndarray, features: np.ndarray | None, seed: int = 0) -> np.ndarray:
    """The clustering feature: standardised region mass joined with the PCA-reduced patch feature.

    Each block is scaled to unit total variance. Rows with no patch feature
    (NaN) get the feature block's mean (zero).
    """
    blocks = []
    region = _standardise(np.nan_to_num(mass.astype(np.float64)))
    blocks.append(region / np.sqrt(max(region.var(0).sum(), 1e-12)))
    if features is not None and features.shape[1] and np.isfinite(features).any():
        have = np.isfinite(features).all(1)
        f = features[have].astype(np.float64)
        f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        f -= f.mean(0)
        dims = int(min(PCA_DIMS, f.shape[1], max(have.sum() - 1, 1)))
        if have.sum() > 2 and dims >= 1:
            from sklearn.decomposition import PCA

            f = PCA(n_components=dims, random_state=seed, svd_solver="randomized" if f.shape[1] > 64 else "full"
                    ).fit_transform(f)
        total = f.var(0).sum()
        fb = np.zeros((len(mass), f.shape[1]))
        fb[have] = f / np.sqrt(total) if total > 0 else 0.0
        blocks.append(fb)
    return np.hstack(blocks).astype(np.float32)


def embed_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """(n, 2) float32 UMAP coordinates (seeded); PCA below 5 points or if UMAP fails.

    The k nearest neighbours (k = min(15, n - 1)) come from scikit-learn's
    exact search and are handed to UMAP (``precomputed_knn``): the same graph
    UMAP would build, without compiling pynndescent (a minute per process);
    200 optimisation epochs at every size.
    """
    n = len(x)
    if n >= 5:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import umap
                from sklearn.neighbors import NearestNeighbors

                k = int(min(15, n - 1))
                dist, idx = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
                reducer = umap.UMAP(n_components=2, n_neighbors=k, min_dist=0.1, random_state=seed, n_epochs=200,
                                    precomputed_knn=(idx, dist, None), init="spectral" if n > 20 else "random")
                return reducer.fit_transform(x).astype(np.float32)
        except Exception as err:  # tiny or degenerate inputs: fall back, say why
            warnings.warn(f"UMAP failed on {n} trait members ({err}); using PCA coordinates", stacklevel=2)
    return _pca_2d(x)


def _pca_2d(x: np.ndarray) -> np.ndarray:
    """(n, 2) float32 first two principal-component scores (zeros where undefined)."""
    out = np.zeros((len(x), 2), dtype=np.float32)
    if len(x) >= 2:
        u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
        m = min(2, u.shape[1])
        out[:, :m] = (u[:, :m] * s[:m]).astype(np.float32)
    return out


def cluster_traits(members: pd.DataFrame, mass: np.ndarray, density: np.ndarray, features: np.ndarray | None,
                   vocab: Sequence[str], k: int | None = None, k_range: Sequence[int] = (4, 16),
                   seed: int = 0, umap: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cluster the top-ranked heads' maps into traits.

    Args:
        members: one row per map: image_id, class_id, head, rank.
        mass, density: (n, R) region mass and density of each map.
        features: (n, D) attention-weighted patch features (NaN rows where missing), or None.
        vocab: region names.
        k: fixed number of traits, or None for the silhouette search over ``k_range`` (inclusive).
        seed: k-means, silhouette sample and UMAP seed.
        umap: UMAP coordinates (else PCA; for speed in tests).

    Returns:
        (traits, trait_members) DataFrames in the table contract's columns.
    """
    from sklearn.cluster import KMeans

    n = len(members)
    x = trait_features_matrix(mass, features, seed)
    if n < 3:
        labels = np.zeros(n, dtype=np.int64)
        centres = x.mean(0, keepdims=True) if n else np.zeros((1, x.shape[1]), np.float32)
    else:
        def fit(kk: int) -> np.ndarray:
            return KMeans(n_clusters=kk, n_init=3, random_state=seed).fit_predict(x)

        if k is not None:
            labels = fit(int(min(k, n - 1)))
        else:
            lo, hi = int(k_range[0]), int(k_range[1])
            ks = list(range(max(2, lo), min(hi, n - 1) + 1)) or [2]
            _, labels = _silhouette_k(x, ks, fit, seed)
        labels = _relabel_by_first(labels)
        centres = np.stack([x[labels == t].mean(0) for t in range(labels.max() + 1)])
    dom = dominant_region(density)
    coords = embed_2d(x, seed) if umap else _pca_2d(x)
    t_count = int(labels.max()) + 1 if n else 0
    rows, used = [], {}
    cls = members["class_id"].to_numpy()
    for t in range(t_count):
        idx = np.flatnonzero(labels == t)
        counts = np.bincount(dom[idx], minlength=len(vocab))
        d = int(counts.argmax())
        region = vocab[d]
        used[region] = used.get(region, 0) + 1
        name = region if used[region] == 1 else f"{region}_{used[region]}"
        c, cc = np.unique(cls[idx], return_counts=True)
        order = np.argsort(-cc, kind="stable")
        dist = np.linalg.norm(x[idx] - centres[t], axis=1)
        reps = idx[np.argsort(dist, kind="stable")[:REPRESENTATIVES]]
        rows.append({"trait": t, "name": name, "dominant_region": region,
                     "purity": float(counts[d] / len(idx)), "size": len(idx),
                     "classes": c[order].astype(np.int16).tolist(), "class_counts": cc[order].astype(np.int32).tolist(),
                     "representatives": reps.astype(np.int32).tolist()})
    traits = pd.DataFrame(rows, columns=["trait", "name", "dominant_region", "purity", "size", "classes",
                                         "class_counts", "representatives"])
    trait_members = pd.DataFrame({
        "member": np.arange(n, dtype=np.int32), "image_id": members["image_id"].to_numpy(np.int32),
        "class_id": cls.astype(np.int16), "head": members["head"].to_numpy(np.int8),
        "rank": members["rank"].to_numpy(np.int8), "trait": labels.astype(np.int16),
        "umap_x": coords[:, 0].astype(np.float32), "umap_y": coords[:, 1].astype(np.float32),
        "dominant_region": np.array(vocab, dtype=object)[dom] if n else np.array([], dtype=object)})
    return traits, trait_members
