"""``intr analyze``: trait discovery on one method's extracted tables (no network, no torch).

    >>> from analysis.pipeline import analyze
    >>> metrics = analyze("results/synthetic/prompt_cam", "results/synthetic/manifest.parquet",
    ...                   "results/synthetic/data", "results/synthetic/prompt_cam")

Reads ``attention``, ``predictions``, ``region_effects``, ``trait_features``
(and ``baseline_maps`` where present) from the method's folder; the
manifest, and beside it ``parts``, ``lookalike_pairs``, ``class_attributes``
where the data has them. Writes ``head_types``, ``traits``,
``trait_members``, ``regions``, ``contrasts`` and ``metrics_analysis``
(docs/tables.md) and returns the metric rows.

Every map becomes a region-mass vector once (``analysis.regions``: the
patch weights of each image are computed once per run and kept in memory;
a map's mass is ``weights @ map``, vectorised in chunks). A (image, query
class)'s *top map* is the mean of that query class's ``top_heads``
best-ranked heads. Look-alike pairs: ``lookalike_pairs.parquet`` where the
data has it (both directions); else every (true class, queried sibling)
of the attention table, and its reverse.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from analysis import io
from analysis.config import defaults
from analysis.contrasts import pair_contrasts, species_regions
from analysis.localization import box_cells, localization_rows
from analysis.recovery import attribute_rows, recovery_rows
from analysis.regions import BACKGROUND, image_geometry, region_vocabulary
from analysis.stats import EVALUATION_COLUMNS
from analysis.traits import cluster_traits, dominant_region, head_types

# The config schema's defaults: the analysis section plus the region rule's two extract keys.
DEFAULTS: dict[str, Any] = {**defaults("analysis"),
                            **{k: defaults("extract")[k] for k in ("region_radius", "region_cells")}}
CHUNK = 8192
OUTPUTS = ("head_types", "traits", "trait_members", "regions", "contrasts", "metrics_analysis")


def _log(progress: bool, t0: float, text: str) -> None:
    if progress:
        print(f"[analyze {time.perf_counter() - t0:6.1f}s] {text}", flush=True)


def region_mass(maps: np.ndarray, weights: np.ndarray, img: np.ndarray) -> np.ndarray:
    """(rows, R) float32: each map's mass per region, ``weights[img[i]] @ maps[i]``, in chunks."""
    out = np.empty((len(maps), weights.shape[1]), dtype=np.float32)
    for s in range(0, len(maps), CHUNK):
        sl = slice(s, s + CHUNK)
        out[sl] = np.matmul(weights[img[sl]], maps[sl, :, None])[..., 0]
    return out


def group_mean(inverse: np.ndarray, values: np.ndarray, groups: int) -> np.ndarray:
    """(groups, ...) mean of ``values`` rows per group id."""
    out = np.zeros((groups,) + values.shape[1:], dtype=np.float64)
    np.add.at(out, inverse, values)
    counts = np.bincount(inverse, minlength=groups).astype(np.float64)
    return (out / np.maximum(counts, 1).reshape((-1,) + (1,) * (values.ndim - 1))).astype(np.float32)


def _optional(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.exists() else None


def _fixed_list(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    values = np.ascontiguousarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=value_type), values.shape[1])


SCHEMAS = {
    "traits": pa.schema([("trait", pa.int16()), ("name", pa.string()), ("dominant_region", pa.string()),
                         ("purity", pa.float32()), ("size", pa.int32()), ("classes", pa.list_(pa.int16())),
                         ("class_counts", pa.list_(pa.int32())), ("representatives", pa.list_(pa.int32()))]),
    "trait_members": pa.schema([("member", pa.int32()), ("image_id", pa.int32()), ("class_id", pa.int16()),
                                ("head", pa.int8()), ("rank", pa.int8()), ("trait", pa.int16()),
                                ("umap_x", pa.float32()), ("umap_y", pa.float32()),
                                ("dominant_region", pa.string())]),
    "regions": pa.schema([("class_id", pa.int16()), ("region", pa.string()), ("mass", pa.float32()),
                          ("mass_lo", pa.float32()), ("mass_hi", pa.float32()), ("density", pa.float32()),
                          ("density_lo", pa.float32()), ("density_hi", pa.float32()), ("area", pa.float32()),
                          ("n_images", pa.int32()), ("rank", pa.int16()), ("heads", pa.list_(pa.int8())),
                          ("trait", pa.int16()), ("correct_only", pa.bool_())]),
    "contrasts": pa.schema([("class_a", pa.int16()), ("class_b", pa.int16()), ("region", pa.string()),
                            ("density_a", pa.float32()), ("difference", pa.float32()), ("occlusion", pa.float32()),
                            ("combined", pa.float32()), ("rank_density", pa.int16()),
                            ("rank_difference", pa.int16()), ("rank_occlusion", pa.int16()),
                            ("rank_combined", pa.int16()), ("p_value", pa.float32()), ("q_value", pa.float32()),
                            ("n_images", pa.int32()), ("planted", pa.bool_()), ("area", pa.float32())]),
    "metrics_analysis": pa.schema([("method", pa.string()), ("metric", pa.string()), ("split", pa.string()),
                                   ("value", pa.float64()), ("ci_lo", pa.float64()), ("ci_hi", pa.float64()),
                                   ("n", pa.int64())]),
}


def _write(name: str, frame: pd.DataFrame | pa.Table, out_dir: Path, metadata: dict) -> None:
    from intr.tables import write_table  # pyarrow only: intr/__init__ and intr.tables import no torch

    write_table(frame, out_dir / f"{name}.parquet", metadata=metadata, schema=SCHEMAS.get(name))


def _pairs(pairs_table: pd.DataFrame | None, q_true_class: np.ndarray, q_cls: np.ndarray,
           q_role: np.ndarray) -> pd.DataFrame:
    """Directed look-alike pairs with their planted parts (None where unknown)."""
    if pairs_table is not None and len(pairs_table):
        a = pairs_table["class_a"].to_numpy(np.int64)
        b = pairs_table["class_b"].to_numpy(np.int64)
        parts = [list(p) for p in pairs_table["differing_parts"]] if "differing_parts" in pairs_table else \
            [None] * len(a)
        frame = pd.DataFrame({"class_a": np.r_[a, b], "class_b": np.r_[b, a], "planted": parts + parts})
    else:
        sib = q_role != "true"
        found = pd.DataFrame({"class_a": q_true_class[sib], "class_b": q_cls[sib]}).drop_duplicates()
        both = pd.concat([found, found.rename(columns={"class_a": "class_b", "class_b": "class_a"})])
        frame = both.drop_duplicates().assign(planted=None)
        frame = frame[frame["class_a"] != frame["class_b"]]
    return frame.drop_duplicates(["class_a", "class_b"]).sort_values(["class_a", "class_b"]).reset_index(drop=True)


def analyze(method_dir, manifest, root, out_dir, options: dict | None = None, progress: bool = True) -> pd.DataFrame:
    """Run the trait analysis of one method and write its six tables.

    Args:
        method_dir: ``results/{dataset}/{method}/`` with the extraction tables.
        manifest: ``results/{dataset}/manifest.parquet`` (parts, lookalike_pairs and
            class_attributes are read from beside it where present).
        root: the data set root (part masks at ``root / mask_path``).
        out_dir: where the analysis tables go.
        options: the config's ``analysis`` section plus ``region_radius`` and
            ``region_cells`` from ``extract`` (defaults: ``DEFAULTS``); ``umap: false``
            swaps UMAP for PCA coordinates.
        progress: print stage timings.

    Returns:
        The metric rows (``metrics_analysis.parquet``, evaluation layout).
    """
    t0 = time.perf_counter()
    opts = {**DEFAULTS, **{k: v for k, v in (options or {}).items() if v is not None or k in ("traits_k",
                                                                                              "head_types_k")}}
    method_dir, out_dir, root = Path(method_dir), Path(out_dir), Path(root)
    manifest = Path(manifest)
    data_dir = manifest.parent
    k_top, seed = int(opts["top_heads"]), int(opts["seed"])
    attn_path = method_dir / "attention.parquet"
    meta = io.metadata(attn_path) if attn_path.exists() else {}
    if not attn_path.exists():
        raise FileNotFoundError(f"{attn_path}: no attention table (run `intr extract` first)")
    for key in ("grid_h", "grid_w"):
        if key not in meta:
            raise KeyError(f"{attn_path}: metadata lacks {key!r} (every extraction table carries it)")
    method = str(meta.get("method", method_dir.name))
    split = str(meta.get("split", "test"))
    grid = (int(meta["grid_h"]), int(meta["grid_w"]))

    # ---- inputs
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest}: no manifest (run `intr prepare` first)")
    man = pd.read_parquet(manifest)
    parts = _optional(data_dir / "parts.parquet")
    if parts is not None and not len(parts):
        parts = None
    pairs_table = _optional(data_dir / "lookalike_pairs.parquet")
    attributes = _optional(data_dir / "class_attributes.parquet")
    preds = io.load(method_dir / "predictions.parquet", columns=["image_id", "label", "pred", "correct"])
    table = io.read(attn_path, columns=["image_id", "query_class", "query_role", "head", "head_rank", "attn"])
    maps = io.fixed_list_to_numpy(table.column("attn"))
    if maps.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"{attn_path}: maps have {maps.shape[1]} cells, metadata grid is {grid}")
    image_id = table.column("image_id").to_numpy().astype(np.int64)
    query = table.column("query_class").to_numpy().astype(np.int64)
    role = table.column("query_role").to_numpy(zero_copy_only=False).astype(str)
    head = table.column("head").to_numpy().astype(np.int64)
    hrank = table.column("head_rank").to_numpy().astype(np.int64)
    del table
    _log(progress, t0, f"read {len(maps):,} maps ({method}, split {split}, grid {grid})")

    img_ids = np.unique(image_id)
    img = np.searchsorted(img_ids, image_id)
    man_idx = man.set_index("image_id")
    missing = np.setdiff1d(img_ids, man_idx.index.to_numpy())
    if len(missing):
        raise KeyError(f"{attn_path}: image_id {int(missing[0])} (and {len(missing) - 1} more) not in {manifest}")
    rows = man_idx.loc[img_ids].reset_index()
    pred_idx = preds.drop_duplicates("image_id").set_index("image_id").reindex(img_ids)
    label = np.where(pred_idx["label"].notna(), pred_idx["label"].fillna(-1), rows["class_id"]).astype(np.int64)
    correct = pred_idx["correct"].fillna(False).to_numpy(bool)
    n_img = len(img_ids)
    C = int(max(label.max(), query.max())) + 1

    # ---- regions: weights (and distances to the targets of the pointing game) once per image
    vocab = region_vocabulary(parts, int(opts["region_cells"]))
    R = len(vocab)
    index = {name: i for i, name in enumerate(vocab)}
    ranked = np.array([v != BACKGROUND for v in vocab])
    planted_by_class: dict[int, set[str]] = {}
    if pairs_table is not None and "differing_parts" in pairs_table:
        for a, b, dp in zip(pairs_table["class_a"], pairs_table["class_b"], pairs_table["differing_parts"]):
            for c in (int(a), int(b)):
                planted_by_class.setdefault(c, set()).update(p for p in dp if p in index)
    planted_mask = None
    if planted_by_class:
        planted_mask = np.zeros((n_img, R), dtype=bool)
        cls_mask = np.zeros((C, R), dtype=bool)
        for c, ps in planted_by_class.items():
            if c < C:
                cls_mask[c, [index[p] for p in ps]] = True
        planted_mask = cls_mask[label]
        targets = [np.flatnonzero(m) for m in planted_mask]
    elif parts is not None:
        bird = np.flatnonzero(ranked)
        targets = [bird] * n_img
    else:
        targets = None
    weights, dist = image_geometry(vocab, rows, parts, grid, root, float(opts["region_radius"]),
                                   int(opts["region_cells"]), targets, progress)
    area = weights.mean(-1)  # (n_img, R): the region's share of the image
    bbox = rows[["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].to_numpy(np.float64) if "bbox_w" in rows else \
        np.full((n_img, 4), np.nan)
    width, height = rows["width"].to_numpy(np.float64), rows["height"].to_numpy(np.float64)
    scale = np.where(np.isfinite(bbox[:, 2:]).all(1), np.nanmax(bbox[:, 2:], 1) if len(bbox) else 0,
                     np.maximum(width, height))
    _log(progress, t0, f"region weights of {n_img:,} images, {R} regions")

    # ---- region mass of every map; top maps per (image, query class)
    mass = region_mass(maps, weights, img)
    with np.errstate(invalid="ignore", divide="ignore"):
        row_density = np.where(area[img] > 0, mass / area[img], np.nan)
    top = hrank <= k_top
    key = img * C + query
    q_keys, q_inv = np.unique(key[top], return_inverse=True)
    qmass = group_mean(q_inv, mass[top], len(q_keys))
    q_img, q_cls = q_keys // C, q_keys % C
    with np.errstate(invalid="ignore", divide="ignore"):
        qdens = np.where(area[q_img] > 0, qmass / area[q_img], np.nan)
    true_key = np.arange(n_img) * C + label
    t_pos = np.searchsorted(q_keys, true_key)
    has_true = (t_pos < len(q_keys)) & (q_keys[np.minimum(t_pos, len(q_keys) - 1)] == true_key)
    if not has_true.any():
        raise ValueError(f"{attn_path}: no maps of the true class (query_role 'true') with head_rank <= {k_top}")
    q_role_of = pd.Series(role[top]).groupby(q_inv).first().to_numpy()
    is_true_row = (query == label[img])
    t_rows = top & is_true_row
    model_maps = group_mean(img[t_rows], maps[t_rows], n_img)  # (n_img, G) the top maps of the true class
    _log(progress, t0, "region mass of every map")

    # ---- head types (every head of the true class)
    ht = head_types(head[is_true_row], label[img[is_true_row]], mass[is_true_row], area[img[is_true_row]],
                    vocab, opts["head_types_k"], seed)

    # ---- traits: the true class's top-ranked heads
    m_rows = np.flatnonzero(t_rows)
    m_rows = m_rows[np.lexsort((hrank[m_rows], image_id[m_rows]))]
    members = pd.DataFrame({"image_id": image_id[m_rows], "class_id": label[img[m_rows]], "head": head[m_rows],
                            "rank": hrank[m_rows]})
    features = None
    tf_path = method_dir / "trait_features.parquet"
    if tf_path.exists():
        tf = io.read(tf_path, columns=["image_id", "class_id", "head", "feature"])
        f_vals = io.fixed_list_to_numpy(tf.column("feature"))
        H = int(max(head.max(), pc.max(tf.column("head")).as_py() or 0)) + 1
        tf_key = tf.column("image_id").to_numpy().astype(np.int64) * H + tf.column("head").to_numpy().astype(np.int64)
        order = np.argsort(tf_key, kind="stable")
        tf_key = tf_key[order]
        m_key = image_id[m_rows] * H + head[m_rows]
        pos = np.minimum(np.searchsorted(tf_key, m_key), len(tf_key) - 1)
        found = tf_key[pos] == m_key if len(tf_key) else np.zeros(len(m_key), bool)
        features = np.full((len(m_rows), f_vals.shape[1]), np.nan, dtype=np.float32)
        features[found] = f_vals[order[pos[found]]]
        del f_vals, tf
    traits, trait_members = cluster_traits(members, mass[m_rows], row_density[m_rows], features, vocab,
                                           opts["traits_k"], opts["traits_k_range"], seed, bool(opts["umap"]))
    _log(progress, t0, f"{len(traits)} traits from {len(members):,} maps; {ht['head_type'].nunique()} head types")

    # ---- per species regions (trait cards)
    use_img = np.flatnonzero(has_true)
    m_region = dominant_region(row_density[m_rows])
    regions = species_regions(label[use_img], correct[use_img], qmass[t_pos[use_img]], area[use_img], vocab,
                              label[img[m_rows]], head[m_rows], m_region,
                              trait_members["trait"].to_numpy(), correct[img[m_rows]],
                              int(opts["bootstrap"]), seed)

    # ---- look-alike contrasts
    effects = None
    re_path = method_dir / "region_effects.parquet"
    if re_path.exists():
        re = pd.read_parquet(re_path, columns=["image_id", "class_a", "class_b", "region", "margin_drop"])
        unknown = set(re["region"].unique()) - set(vocab)
        if unknown:
            warnings.warn(f"{re_path}: regions {sorted(unknown)[:5]} are not in the vocabulary {vocab}; ignored",
                          stacklevel=2)
            re = re[re["region"].isin(vocab)]
        e_img = np.searchsorted(img_ids, re["image_id"].to_numpy(np.int64))
        ok = (e_img < n_img) & (img_ids[np.minimum(e_img, n_img - 1)] == re["image_id"].to_numpy(np.int64))
        re, e_img = re[ok], e_img[ok]
        e_key = (e_img * C + re["class_a"].to_numpy(np.int64)) * C + re["class_b"].to_numpy(np.int64)
        e_keys, e_inv = np.unique(e_key, return_inverse=True)
        e_vals = np.full((len(e_keys), R), np.nan, dtype=np.float32)
        e_vals[e_inv, re["region"].map(index).to_numpy(np.int64)] = re["margin_drop"].to_numpy(np.float32)
        effects = (e_keys, e_vals)
        del re

    by_class: dict[int, np.ndarray] = {}
    for c in np.unique(label[use_img]):
        sel = use_img[label[use_img] == c]
        good = sel[correct[sel]]
        by_class[int(c)] = good if len(good) else sel

    def lookup(keys: np.ndarray, values: np.ndarray, want: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(keys, want), max(len(keys) - 1, 0))
        hit = keys[pos] == want if len(keys) else np.zeros(len(want), bool)
        out = np.full((len(want), R), np.nan, dtype=np.float32)
        out[hit] = values[pos[hit]]
        return out

    def per_image(a: int, b: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        imgs = by_class.get(a, np.zeros(0, np.int64))
        dens_a = qdens[t_pos[imgs]]
        dens_b = lookup(q_keys, qdens, imgs * C + b)
        occ = lookup(effects[0], effects[1], (imgs * C + a) * C + b) if effects is not None else \
            np.full((len(imgs), R), np.nan, np.float32)
        return {"density": dens_a, "difference": dens_a - dens_b, "occlusion": occ}, area[imgs]

    pairs = _pairs(pairs_table, label[q_img], q_cls, q_role_of)
    pairs = pairs[pairs["class_a"].isin(by_class.keys())].reset_index(drop=True)
    contrasts = pair_contrasts(pairs, per_image, vocab, ranked, int(opts["permutations"]), seed)
    _log(progress, t0, f"contrasts of {len(pairs)} directed pairs")

    # ---- metrics
    metrics: list[dict] = []
    baselines: dict[str, np.ndarray] = {}
    bl_path = method_dir / "baseline_maps.parquet"
    if bl_path.exists():
        bl = io.read(bl_path, columns=["image_id", "method", "class_id", "attn"])
        bl_maps = io.fixed_list_to_numpy(bl.column("attn"))
        b_img_id = bl.column("image_id").to_numpy().astype(np.int64)
        b_method = bl.column("method").to_numpy(zero_copy_only=False).astype(str)
        b_cls = bl.column("class_id").to_numpy().astype(np.int64)
        b_img = np.minimum(np.searchsorted(img_ids, b_img_id), n_img - 1)
        keep = (img_ids[b_img] == b_img_id) & (b_cls == label[b_img]) & (b_method != method)
        for name in np.unique(b_method[keep]):
            sel = keep & (b_method == name)
            arr = np.full((n_img, bl_maps.shape[1]), np.nan, dtype=np.float32)
            arr[b_img[sel]] = bl_maps[sel]
            baselines[str(name)] = arr[use_img]
        del bl, bl_maps
    inside = box_cells(width, height, bbox, grid)
    metrics += localization_rows(method, split, model_maps[use_img], baselines, use_img, weights, dist, scale,
                                 inside, planted_mask, float(opts["pointing_radius"]), seed)
    metrics += recovery_rows(contrasts, method, split, seed)
    if attributes is not None and len(attributes) and len(contrasts):
        metrics += attribute_rows(contrasts, attributes, vocab, float(opts["attribute_threshold"]), method,
                                  split, seed)
    metric_frame = pd.DataFrame(metrics, columns=list(EVALUATION_COLUMNS))

    # ---- write
    common = {"method": method, "split": split, "regions": vocab, "top_heads": k_top}
    out_dir.mkdir(parents=True, exist_ok=True)
    ht_table = pa.table({
        "head": pa.array(ht["head"].to_numpy(np.int8)), "head_type": pa.array(ht["head_type"].to_numpy(np.int16)),
        "dominant_region": pa.array(ht["dominant_region"].astype(str).tolist(), pa.string()),
        "profile": _fixed_list(np.stack(ht["profile"].to_list()).astype(np.float32), pa.float32()),
        "type_dominant_region": pa.array(ht["type_dominant_region"].astype(str).tolist(), pa.string()),
        "consistency": pa.array(ht["consistency"].to_numpy(np.float32)),
        "n_maps": pa.array(ht["n_maps"].to_numpy(np.int32))})
    _write("head_types", ht_table, out_dir, common)
    _write("traits", traits, out_dir, common)
    _write("trait_members", trait_members, out_dir, common)
    _write("regions", regions, out_dir, common)
    _write("contrasts", contrasts, out_dir, {**common, "combined": "mean z-score of difference and occlusion (density when neither exists)"})
    _write("metrics_analysis", metric_frame, out_dir, {"method": method, "split": split})
    _log(progress, t0, f"wrote {', '.join(OUTPUTS)} to {out_dir}")
    return metric_frame
