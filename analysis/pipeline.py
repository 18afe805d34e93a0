"""``intr analyze``: trait discovery on one method's extracted tables (no network, no torch).

    >>> from analysis.pipeline import AnalysisInputs, analyze
    >>> inputs = AnalysisInputs.conventional("results/synthetic/prompt_cam",
    ...                                      "results/synthetic/manifest.parquet", "results/synthetic/data")
    >>> metrics = analyze(inputs, "results/synthetic/prompt_cam")

Reads the tables named in ``AnalysisInputs`` (explicit paths; nothing is
found by naming convention) and writes ``head_types``, ``traits``,
``trait_members``, ``regions``, ``contrasts`` and ``metrics_analysis``
(docs/tables.md); returns the metric rows. The steps, one function each:

1. read maps: ``read_maps`` (``MapTable``: one row per image, query class
   and head) and ``read_images`` (``ImageTable``: label, correctness and
   manifest row per image);
2. region mass: ``image_regions`` (``RegionGeometry``: the patch weights of
   each image, computed once per run and kept in memory), ``region_mass``
   (a map's mass is ``weights @ map``, vectorised in chunks) and ``top_maps``
   (``TopMaps``: a (image, query class)'s top map is the mean of that query
   class's ``top_heads`` best-ranked heads);
3. head types and traits: ``discover_traits``;
4. species regions: ``species_region_table``;
5. contrasts: ``contrast_table`` (with ``read_region_effects`` for the
   occlusion score and ``read_pair_attention`` for the pair's own top head);
   look-alike pairs come from
   ``lookalike_pairs.parquet`` where given (both directions), else every
   (true class, queried sibling) of the attention table, and its reverse;
6. ground-truth scores: ``ground_truth_scores``;
7. write: ``write_tables``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import io, tables
from analysis.config import defaults
from analysis.contrasts import COMBINED_RULE, contrast_sample, pair_contrasts, species_regions
from analysis.counterfactual import agreement_rows, counterfactual_scores
from analysis.ground_truth import planted_parts_by_class
from analysis.localization import box_cells, localization_rows, peak_on_planted_part_rows
from analysis.part_discovery import part_discovery_scores
from analysis.recovery import attribute_rows, recovery_rows
from analysis.regions import (BACKGROUND, DiscoveredParts, RegionLayout, cells_on_regions, image_geometry,
                              label_overlap, region_density)
from analysis.tables import EVALUATION_COLUMNS, write_table
from analysis.traits import cluster_traits, dominant_region, head_types

# The extract keys the analysis reads too: the regions' rule, and the images the contrasts average over.
ANALYSIS_EXTRACT_KEYS = ("regions", "region_radius", "region_cells", "contrast_images")
# The config schema's defaults: the analysis section plus those extract keys.
DEFAULTS: dict[str, Any] = {**defaults("analysis"),
                            **{k: defaults("extract")[k] for k in ANALYSIS_EXTRACT_KEYS}}
CHUNK = 8192
OUTPUTS = ("head_types", "traits", "trait_members", "regions", "contrasts", "metrics_analysis")


def _write(name: str, frame: pd.DataFrame, out_dir: Path, metadata: dict) -> None:
    write_table(frame, out_dir / f"{name}.parquet", metadata=metadata, schema=tables.schema(name))


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, kw_only=True)
class AnalysisInputs:
    """Every table ``analyze`` reads, by explicit path (None: the data or run does not have it).

    Attributes:
        attention: ``attention.parquet`` (every map, with its head rank; grid in its metadata).
        predictions: ``predictions.parquet`` (label, prediction, correct).
        manifest: ``manifest.parquet``.
        root: the data set root (part masks at ``root / mask_path``).
        head_ranks: ``head_ranks.parquet``; the ranks are read from ``attention``'s
            ``head_rank`` column (the same numbers), so this is declared, not read.
        region_effects: ``region_effects.parquet`` (the occlusion score of the contrasts).
        pair_head_ranks: ``pair_head_ranks.parquet`` (the pair_attention score of the contrasts).
        trait_features: ``trait_features.parquet`` (features the traits cluster on).
        baseline_maps: ``baseline_maps.parquet`` (CAM baselines of the localization scores).
        parts: ``parts.parquet`` (the regions: part masks or keypoints; without it, grid cells).
        lookalike_pairs: ``lookalike_pairs.parquet`` (pairs and planted parts).
        class_attributes: ``class_attributes.parquet`` (attribute precision on CUB).
        discovered_parts: ``discovered_parts.parquet`` (the regions with ``regions: discovered``).
        counterfactuals: ``counterfactuals.parquet`` (synthetic data: what the model relies on).
    """

    attention: Path
    predictions: Path
    manifest: Path
    root: Path
    head_ranks: Path | None = None
    region_effects: Path | None = None
    pair_head_ranks: Path | None = None
    trait_features: Path | None = None
    baseline_maps: Path | None = None
    parts: Path | None = None
    lookalike_pairs: Path | None = None
    class_attributes: Path | None = None
    discovered_parts: Path | None = None
    counterfactuals: Path | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                object.__setattr__(self, f.name, Path(value))

    @classmethod
    def conventional(cls, method_dir: str | Path, manifest: str | Path, root: str | Path) -> AnalysisInputs:
        """The usual layout: a method's tables in ``method_dir``, the data tables beside the manifest.

        Optional tables are filled in only where the file exists (for tests, benchmarks and
        Python users; the workflow passes every path explicitly).

        Args:
            method_dir: ``results/{dataset}/{method}/``.
            manifest: ``results/{dataset}/manifest.parquet``.
            root: the data set root.
        """
        method_dir, manifest = Path(method_dir), Path(manifest)

        def present(path: Path) -> Path | None:
            return path if path.exists() else None

        method_tables = {name: present(method_dir / f"{name}.parquet")
                         for name in ("head_ranks", "region_effects", "pair_head_ranks", "trait_features",
                                      "baseline_maps", "discovered_parts", "counterfactuals")}
        data_tables = {name: present(manifest.parent / f"{name}.parquet")
                       for name in ("parts", "lookalike_pairs", "class_attributes")}
        return cls(attention=method_dir / "attention.parquet", predictions=method_dir / "predictions.parquet",
                   manifest=manifest, root=Path(root), **method_tables, **data_tables)


@dataclass
class DataTables:
    """The data set's tables (None where the data has none)."""

    manifest: pd.DataFrame
    root: Path
    parts: pd.DataFrame | None
    pairs: pd.DataFrame | None
    attributes: pd.DataFrame | None


@dataclass
class MapTable:
    """Every extracted map: one row per (image, query class, head) of ``attention.parquet``."""

    image: np.ndarray        # (M,) index into the ImageTable
    query_class: np.ndarray  # (M,)
    role: np.ndarray         # (M,) str: 'true', 'pred' or 'sibling'
    head: np.ndarray         # (M,)
    head_rank: np.ndarray    # (M,) 1 = the most important head for that query class
    maps: np.ndarray         # (M, G) float32


@dataclass
class ImageTable:
    """One row per image of the attention table, in image_id order."""

    image_id: np.ndarray     # (N,)
    label: np.ndarray        # (N,) the true class
    correct: np.ndarray      # (N,) bool, correctly classified
    rows: pd.DataFrame       # the images' manifest rows, same order

    def __len__(self) -> int:
        return len(self.image_id)

    def index_of(self, image_id: np.ndarray) -> np.ndarray:
        """Row of each image id; -1 where the image is not analysed."""
        return pd.Index(self.image_id).get_indexer(np.asarray(image_id, dtype=np.int64))


@dataclass
class RegionGeometry:
    """Per image: where the regions are, and the ground truth the scores need."""

    vocab: list[str]
    weights: np.ndarray              # (N, R, G) patch weights (``analysis.regions``)
    area: np.ndarray                 # (N, R) the region's share of the image
    dist: np.ndarray | None = None   # (N, G) each cell's distance to the pointing game's targets
    planted: np.ndarray | None = None  # (N, R) bool, the planted parts of the image's class
    scale: np.ndarray | None = None  # (N,) the bird box's longer side (the image's without a box)
    inside: np.ndarray | None = None  # (N, G) bool, cells inside the bird's box (``box_cells``)
    layout: RegionLayout | None = None  # what the label maps were drawn from (``majority_parts`` resamples it)
    grid: tuple[int, int] | None = None  # the patch grid of ``weights``

    @property
    def ranked(self) -> np.ndarray:
        """(R,) bool, the regions that take part in rankings (not background)."""
        return np.array([name != BACKGROUND for name in self.vocab])


class KeyedRows:
    """Distinct integer key tuples (e.g. (image, query class)), sorted, and a lookup of their position."""

    def __init__(self, *columns: np.ndarray):
        stacked = np.column_stack([np.asarray(c, dtype=np.int64) for c in columns])
        self.keys, inverse = np.unique(stacked, axis=0, return_inverse=True)
        self.group = inverse.reshape(-1)  # each input row's position in ``keys``
        self._index = pd.MultiIndex.from_arrays(list(self.keys.T))

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, *columns: np.ndarray) -> np.ndarray:
        """Position of each key tuple in ``keys``; -1 where absent."""
        if not len(self._index):
            return np.full(len(columns[0]), -1, dtype=np.int64)
        wanted = pd.MultiIndex.from_arrays([np.asarray(c, dtype=np.int64) for c in columns])
        return self._index.get_indexer(wanted)


def take_rows(values: np.ndarray, position: np.ndarray) -> np.ndarray:
    """``values[position]`` with NaN rows where ``position`` is -1 (the key was absent)."""
    out = np.full((len(position),) + values.shape[1:], np.nan, dtype=values.dtype)
    hit = position >= 0
    out[hit] = values[position[hit]]
    return out


def _log(progress: bool, t0: float, text: str) -> None:
    if progress:
        print(f"[analyze {time.perf_counter() - t0:6.1f}s] {text}", flush=True)


def _optional(path: Path | None) -> pd.DataFrame | None:
    """The table, or None where no path is given or it has no rows."""
    if path is None:
        return None
    frame = pd.read_parquet(path)
    return frame if len(frame) else None


def _options(options: dict | None) -> dict[str, Any]:
    """The defaults overridden by the given options (None means "default", except for the k's)."""
    given = {k: v for k, v in (options or {}).items() if v is not None or k in ("traits_k", "head_types_k")}
    return {**DEFAULTS, **given}


def attention_metadata(path: Path) -> tuple[str, str, tuple[int, int]]:
    """(method, split, grid) of an attention table, from its metadata."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no attention table (run `intr extract` first)")
    meta = io.metadata(path)
    for key in ("grid_h", "grid_w"):
        if key not in meta:
            raise KeyError(f"{path}: metadata lacks {key!r} (every extraction table carries it)")
    return str(meta.get("method", path.parent.name)), str(meta.get("split", "test")), \
        (int(meta["grid_h"]), int(meta["grid_w"]))


def read_data_tables(inputs: AnalysisInputs) -> DataTables:
    """The manifest and the optional data tables."""
    if not inputs.manifest.exists():
        raise FileNotFoundError(f"{inputs.manifest}: no manifest (run `intr prepare` first)")
    pairs = pd.read_parquet(inputs.lookalike_pairs) if inputs.lookalike_pairs is not None else None
    attributes = pd.read_parquet(inputs.class_attributes) if inputs.class_attributes is not None else None
    return DataTables(pd.read_parquet(inputs.manifest), inputs.root, _optional(inputs.parts), pairs, attributes)


# --------------------------------------------------------------------------- 1. read maps


def read_maps(path: Path, grid: tuple[int, int]) -> tuple[MapTable, np.ndarray]:
    """Every map of the attention table, and the image id of each row."""
    table = io.read(path, columns=["image_id", "query_class", "query_role", "head", "head_rank", "attn"])
    maps = io.fixed_list_to_numpy(table.column("attn"))
    if maps.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"{path}: maps have {maps.shape[1]} cells, metadata grid is {grid}")
    image_id = table.column("image_id").to_numpy().astype(np.int64)
    image = np.searchsorted(np.unique(image_id), image_id)
    column = {name: table.column(name).to_numpy().astype(np.int64) for name in ("query_class", "head", "head_rank")}
    role = table.column("query_role").to_numpy(zero_copy_only=False).astype(str)
    return MapTable(image, column["query_class"], role, column["head"], column["head_rank"], maps), image_id


def read_images(image_id: np.ndarray, manifest: pd.DataFrame, predictions: Path, source: Path) -> ImageTable:
    """The analysed images (those of the attention table) with label, correctness and manifest row.

    Args:
        image_id: the attention table's image id per row.
        manifest: the manifest; every analysed image must be in it.
        predictions: ``predictions.parquet`` (the label falls back to the manifest's class).
        source: the attention table's path (for the error message).
    """
    ids = np.unique(image_id)
    by_id = manifest.set_index("image_id")
    missing = np.setdiff1d(ids, by_id.index.to_numpy())
    if len(missing):
        raise KeyError(f"{source}: image_id {int(missing[0])} (and {len(missing) - 1} more) not in the manifest")
    rows = by_id.loc[ids].reset_index()
    preds = io.load(predictions, columns=["image_id", "label", "pred", "correct"])
    pred = preds.drop_duplicates("image_id").set_index("image_id").reindex(ids)
    label = np.where(pred["label"].notna(), pred["label"].fillna(-1), rows["class_id"]).astype(np.int64)
    return ImageTable(ids, label, pred["correct"].fillna(False).to_numpy(bool), rows)


# --------------------------------------------------------------------------- 2. region mass


def planted_regions(pairs: pd.DataFrame | None, vocab: list[str], label: np.ndarray) -> np.ndarray | None:
    """(N, R) bool: the planted parts of each image's class (None: the data plants none)."""
    planted = planted_parts_by_class(pairs)
    index = {name: i for i, name in enumerate(vocab)}
    of_class = {c: [index[p] for p in parts if p in index] for c, parts in planted.items()}
    if not any(of_class.values()):
        return None
    mask = np.zeros((len(label), len(vocab)), dtype=bool)
    for k, c in enumerate(label):
        mask[k, of_class.get(int(c), [])] = True
    return mask


def image_regions(images: ImageTable, data: DataTables, grid: tuple[int, int], discovered: Path | None,
                  opts: dict[str, Any], progress: bool) -> RegionGeometry:
    """Patch weights of every image in the configured regions (``opts["regions"]``).

    Only ``annotated`` regions read the part keypoints and masks; ``discovered`` regions read
    the learned part maps and nothing annotated.
    """
    parts = data.parts if opts["regions"] == "annotated" else None
    layout = RegionLayout.build(opts["regions"], parts=parts,
                                discovered=DiscoveredParts.read(discovered) if discovered is not None else None,
                                radius=float(opts["region_radius"]), cells=int(opts["region_cells"]))
    weights, _ = image_geometry(layout, images.rows, grid, data.root if layout.mode == "annotated" else None,
                                progress=progress)
    return RegionGeometry(layout.vocab, weights, weights.mean(-1), layout=layout, grid=tuple(grid))


def ground_truth_regions(images: ImageTable, data: DataTables, grid: tuple[int, int],
                         opts: dict[str, Any], progress: bool) -> RegionGeometry | None:
    """The annotated parts of every image with what the scores need (None: the data has no parts).

    Evaluation only. The pointing game's targets: the planted parts of the image's class where
    the data plants them; else the whole bird (every named part).
    """
    if data.parts is None:
        return None
    layout = RegionLayout.build("annotated", parts=data.parts, radius=float(opts["region_radius"]),
                                cells=int(opts["region_cells"]))
    planted = planted_regions(data.pairs, layout.vocab, images.label)
    targets = [np.flatnonzero(m) for m in planted] if planted is not None else \
        [np.flatnonzero(layout.ranked)] * len(images)
    rows = images.rows
    weights, dist = image_geometry(layout, rows, grid, data.root, targets, progress)
    bbox = rows[["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].to_numpy(np.float64) if "bbox_w" in rows else \
        np.full((len(images), 4), np.nan)
    width, height = rows["width"].to_numpy(np.float64), rows["height"].to_numpy(np.float64)
    scale = np.where(np.isfinite(bbox[:, 2:]).all(1), np.nanmax(bbox[:, 2:], 1) if len(bbox) else 0,
                     np.maximum(width, height))
    return RegionGeometry(layout.vocab, weights, weights.mean(-1), dist, planted, scale,
                          box_cells(width, height, bbox, grid), layout, tuple(grid))


def class_overlaps(regions: RegionGeometry, truth: RegionGeometry, images: ImageTable, use: np.ndarray,
                   root: Path | None) -> dict[int, np.ndarray]:
    """Per class: (R, P) the label-map samples of region r on true part p, summed over the class's images.

    Evaluation and display only. Both label maps are sampled ``SAMPLES_PER_CELL`` times per patch side and
    every sample counts where it lies in both (``analysis.regions.label_overlap``), so a region smaller than
    a patch meets the part under it. Both geometries need their ``layout`` and ``grid`` (``image_regions``
    and ``ground_truth_regions`` set them).
    """
    groups = images_by_class(images, use)
    rows = np.concatenate(list(groups.values())) if groups else np.zeros(0, np.int64)
    joint = label_overlap(regions.layout, truth.layout, images.rows.iloc[rows], regions.grid, root)
    position = {int(r): i for i, r in enumerate(rows)}
    return {c: joint[[position[int(i)] for i in imgs]].sum(0) for c, imgs in groups.items()}


def majority_parts(regions: RegionGeometry, truth: RegionGeometry, images: ImageTable, use: np.ndarray,
                   root: Path | None, background: bool = False,
                   overlaps: dict[int, np.ndarray] | None = None) -> dict[int, list[str]]:
    """Per class: the ground-truth part that holds most of each region over the class's images.

    Evaluation and display only ("part 3 ~ beak"), from ``class_overlaps`` (pass ``overlaps`` to reuse
    them), so a region smaller than a patch is named by the part under it. ``background``: the true
    background may win (the strict rule); else the region is named by the bird part that holds most
    of it (a region that touches no part at all is "background").
    """
    if overlaps is None:
        overlaps = class_overlaps(regions, truth, images, use, root)
    parts = np.array([name != BACKGROUND for name in truth.vocab])
    out: dict[int, list[str]] = {}
    for c, overlap in overlaps.items():
        if not background:
            overlap = np.where(parts[None, :] | (overlap[:, parts].sum(1, keepdims=True) == 0), overlap, -1.0)
        out[c] = [truth.vocab[p] for p in overlap.argmax(1)]
    return out


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


@dataclass
class TopMaps:
    """Per (image, query class): the mean of that query class's ``top_heads`` best-ranked heads' maps."""

    keys: KeyedRows          # (image, query class), sorted
    role: np.ndarray         # (Q,) the query's role (the first of its rows)
    mass: np.ndarray         # (Q, R) region mass of the top map
    density: np.ndarray      # (Q, R) mass / area (NaN where the region is absent)
    true_position: np.ndarray  # (N,) each image's own (true class) top map; -1 where it has none

    @property
    def image(self) -> np.ndarray:
        return self.keys.keys[:, 0]

    @property
    def query_class(self) -> np.ndarray:
        return self.keys.keys[:, 1]


def top_maps(maps: MapTable, mass: np.ndarray, images: ImageTable, area: np.ndarray, top_heads: int,
             source: Path) -> TopMaps:
    """The top map of every (image, query class) as region mass and density."""
    top = maps.head_rank <= top_heads
    keys = KeyedRows(maps.image[top], maps.query_class[top])
    qmass = group_mean(keys.group, mass[top], len(keys))
    density = region_density(qmass, area[keys.keys[:, 0]])
    true_position = keys.find(np.arange(len(images)), images.label)
    if not (true_position >= 0).any():
        raise ValueError(f"{source}: no maps of the true class (query_role 'true') with head_rank <= {top_heads}")
    role = pd.Series(maps.role[top]).groupby(keys.group).first().to_numpy()
    return TopMaps(keys, role, qmass, density, true_position)


# --------------------------------------------------------------------------- 3. head types and traits


def trait_member_rows(maps: MapTable, images: ImageTable, top_heads: int) -> np.ndarray:
    """Rows of the true class's top-ranked heads (the trait members), by image id then rank."""
    rows = np.flatnonzero((maps.head_rank <= top_heads) & (maps.query_class == images.label[maps.image]))
    return rows[np.lexsort((maps.head_rank[rows], images.image_id[maps.image[rows]]))]


def member_features(path: Path | None, image_id: np.ndarray, head: np.ndarray) -> np.ndarray | None:
    """(members, D) the trait feature of each member (image id, head); NaN rows where none is stored."""
    if path is None:
        return None
    table = io.read(path, columns=["image_id", "class_id", "head", "feature"])
    values = io.fixed_list_to_numpy(table.column("feature"))
    stored = pd.MultiIndex.from_arrays([table.column(c).to_numpy().astype(np.int64) for c in ("image_id", "head")])
    first = np.flatnonzero(~stored.duplicated())  # a key stored twice: its first row
    position = stored[first].get_indexer(pd.MultiIndex.from_arrays([image_id, head]))
    return take_rows(values[first], position) if len(first) else \
        np.full((len(image_id), values.shape[1]), np.nan, dtype=np.float32)


def discover_traits(maps: MapTable, images: ImageTable, mass: np.ndarray, density: np.ndarray,
                    geometry: RegionGeometry, features_path: Path | None, opts: dict[str, Any]
                    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Head types (every head of the true class) and traits (the true class's top-ranked heads).

    Returns ``(head_types, traits, trait_members, member_rows)``; ``member_rows`` are the map
    rows of the trait members, in ``trait_members`` order.
    """
    seed = int(opts["seed"])
    own = maps.query_class == images.label[maps.image]
    types = head_types(maps.head[own], images.label[maps.image[own]], mass[own], geometry.area[maps.image[own]],
                       geometry.vocab, opts["head_types_k"], seed)
    rows = trait_member_rows(maps, images, int(opts["top_heads"]))
    member_id = images.image_id[maps.image[rows]]
    members = pd.DataFrame({"image_id": member_id, "class_id": images.label[maps.image[rows]],
                            "head": maps.head[rows], "rank": maps.head_rank[rows]})
    features = member_features(features_path, member_id, maps.head[rows])
    traits, trait_members = cluster_traits(members, mass[rows], density[rows], features, geometry.vocab,
                                           opts["traits_k"], opts["traits_k_range"], seed, bool(opts["umap"]))
    return types, traits, trait_members, rows


# --------------------------------------------------------------------------- 4. species regions


def used_images(images: ImageTable, tops: TopMaps) -> np.ndarray:
    """Indices of the images that have a top map of their own class."""
    return np.flatnonzero(tops.true_position >= 0)


def species_region_table(maps: MapTable, images: ImageTable, tops: TopMaps, density: np.ndarray,
                         geometry: RegionGeometry, members: pd.DataFrame, member_rows: np.ndarray,
                         opts: dict[str, Any]) -> pd.DataFrame:
    """regions.parquet: per class and region, the top map's mass and density (``species_regions``)."""
    use = used_images(images, tops)
    member_image = maps.image[member_rows]
    return species_regions(images.label[use], images.correct[use], tops.mass[tops.true_position[use]],
                           geometry.area[use], geometry.vocab, images.label[member_image],
                           maps.head[member_rows], dominant_region(density[member_rows]),
                           members["trait"].to_numpy(), images.correct[member_image],
                           int(opts["bootstrap"]), int(opts["seed"]))


# --------------------------------------------------------------------------- 5. contrasts


@dataclass
class RegionEffects:
    """Occlusion score per (image, class A, class B): the A - B margin drop of blurring each region."""

    keys: KeyedRows      # (image, class_a, class_b)
    drop: np.ndarray     # (K, R), NaN where a region was not blurred


def read_region_effects(path: Path | None, images: ImageTable, vocab: list[str],
                        contrast_images: int = 0) -> RegionEffects | None:
    """The region effects of the analysed images (regions outside the vocabulary warned about, dropped).

    A table filled for every image (``extract.contrast_images`` 0) or for a larger per-class sample
    serves any smaller sample (``contrast_sample`` picks are nested); one filled for fewer images is
    refused: the contrasts would average over images it has no rows for.
    """
    if path is None:
        return None
    filled = int(tables.read_metadata(path).get("contrast_images", 0))  # tables from before the key: all images
    if filled and not 0 < contrast_images <= filled:
        raise ValueError(f"{path} holds region effects of {filled} images per class (extract.contrast_images), "
                         f"fewer than the analysis averages over ({contrast_images or 'all'}): run the "
                         f"region_effects stage again with extract.contrast_images {contrast_images}")
    effects = pd.read_parquet(path, columns=["image_id", "class_a", "class_b", "region", "margin_drop"])
    unknown = set(effects["region"].unique()) - set(vocab)
    if unknown:
        warnings.warn(f"{path}: regions {sorted(unknown)[:5]} are not in the vocabulary {vocab}; ignored",
                      stacklevel=3)
        effects = effects[effects["region"].isin(vocab)]
    image = images.index_of(effects["image_id"].to_numpy(np.int64))
    effects, image = effects[image >= 0], image[image >= 0]
    keys = KeyedRows(image, effects["class_a"].to_numpy(np.int64), effects["class_b"].to_numpy(np.int64))
    drop = np.full((len(keys), len(vocab)), np.nan, dtype=np.float32)
    region = effects["region"].map({name: i for i, name in enumerate(vocab)}).to_numpy(np.int64)
    drop[keys.group, region] = effects["margin_drop"].to_numpy(np.float32)
    return RegionEffects(keys, drop)


@dataclass
class PairAttention:
    """Score (d) per (image, class B): the region density of the true class A's map of the pair's top head.

    The pair's top head of an image is rank 1 of ``pair_head_ranks.parquet``: the head blurred last
    when heads are blurred in A's and B's rows together by the A - B margin.
    """

    pairs: KeyedRows      # (image, class_b), A being the image's label
    head: np.ndarray      # (P,) the pair's top head on that image
    own: KeyedRows        # (image, head) of the true class's maps
    density: np.ndarray   # (O, R) their region density

    def of(self, image: np.ndarray, class_b: int) -> np.ndarray:
        """(n, R) the density of each image's pair top head map (NaN rows where the image has none)."""
        position = self.pairs.find(image, np.full(len(image), class_b))
        head = self.head[np.maximum(position, 0)] if len(self.head) else np.zeros(len(image), np.int64)
        return take_rows(self.density, np.where(position >= 0, self.own.find(image, head), -1))


def read_pair_attention(path: Path | None, maps: MapTable, images: ImageTable,
                        density: np.ndarray) -> PairAttention | None:
    """The pair top head of every analysed (image, class B), and the density of every true-class map.

    Args:
        path: ``pair_head_ranks.parquet`` (None: no such score).
        maps, images: the attention table's maps and images.
        density: (M, R) region density of every map row.
    """
    if path is None:
        return None
    ranks = pd.read_parquet(path, columns=["image_id", "class_a", "class_b", "head", "rank"])
    ranks = ranks[ranks["rank"] == 1]
    image = images.index_of(ranks["image_id"].to_numpy(np.int64))
    keep = image >= 0
    keep[keep] = ranks["class_a"].to_numpy(np.int64)[keep] == images.label[image[keep]]
    pairs = KeyedRows(image[keep], ranks["class_b"].to_numpy(np.int64)[keep])
    head = np.full(len(pairs), -1, dtype=np.int64)
    head[pairs.group] = ranks["head"].to_numpy(np.int64)[keep]
    own = np.flatnonzero(maps.query_class == images.label[maps.image])
    own_keys = KeyedRows(maps.image[own], maps.head[own])
    own_density = np.full((len(own_keys), density.shape[1]), np.nan, dtype=np.float32)
    own_density[own_keys.group] = density[own]
    return PairAttention(pairs, head, own_keys, own_density)


def lookalike_pairs(pairs_table: pd.DataFrame | None, tops: TopMaps, label: np.ndarray) -> pd.DataFrame:
    """Directed look-alike pairs with their planted parts (None where unknown)."""
    if pairs_table is not None and len(pairs_table):
        a = pairs_table["class_a"].to_numpy(np.int64)
        b = pairs_table["class_b"].to_numpy(np.int64)
        parts = [list(p) for p in pairs_table["differing_parts"]] if "differing_parts" in pairs_table else \
            [None] * len(a)
        frame = pd.DataFrame({"class_a": np.r_[a, b], "class_b": np.r_[b, a], "planted": parts + parts})
    else:
        # The extraction's look-alikes (genus, else most confused); a misprediction alone makes no pair.
        sibling = tops.role == "sibling"
        found = pd.DataFrame({"class_a": label[tops.image[sibling]],
                              "class_b": tops.query_class[sibling]}).drop_duplicates()
        both = pd.concat([found, found.rename(columns={"class_a": "class_b", "class_b": "class_a"})])
        frame = both.drop_duplicates().assign(planted=None)
        frame = frame[frame["class_a"] != frame["class_b"]]
    return frame.drop_duplicates(["class_a", "class_b"]).sort_values(["class_a", "class_b"]).reset_index(drop=True)


def images_by_class(images: ImageTable, use: np.ndarray, per_class: int = 0) -> dict[int, np.ndarray]:
    """Per class, the images its scores average over: the correctly classified ones (all where none is).

    ``per_class`` > 0: among the class's seeded sample of that many images (``contrast_sample``,
    ``extract.contrast_images``) only, drawn from all the analysed images as extraction draws it
    from all the split's.
    """
    if per_class > 0:
        use = use[contrast_sample(images.image_id, images.label, per_class)[use]]
    out: dict[int, np.ndarray] = {}
    for c in np.unique(images.label[use]):
        sel = use[images.label[use] == c]
        good = sel[images.correct[sel]]
        out[int(c)] = good if len(good) else sel
    return out


def contrast_table(images: ImageTable, tops: TopMaps, geometry: RegionGeometry, effects: RegionEffects | None,
                   pairs_table: pd.DataFrame | None, opts: dict[str, Any],
                   pair_attention: PairAttention | None = None) -> pd.DataFrame:
    """contrasts.parquet: the scores of every directed look-alike pair (``pair_contrasts``).

    ``pair_attention`` (None: the score is NaN) gives score (d), reported beside the others.
    """
    by_class = images_by_class(images, used_images(images, tops), int(opts["contrast_images"]))
    n_regions = len(geometry.vocab)

    def per_image(a: int, b: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        imgs = by_class.get(a, np.zeros(0, np.int64))
        dens_a = tops.density[tops.true_position[imgs]]
        dens_b = take_rows(tops.density, tops.keys.find(imgs, np.full(len(imgs), b)))
        occlusion = take_rows(effects.drop, effects.keys.find(imgs, np.full(len(imgs), a), np.full(len(imgs), b))) \
            if effects is not None else np.full((len(imgs), n_regions), np.nan, np.float32)
        pair = pair_attention.of(imgs, b) if pair_attention is not None else \
            np.full((len(imgs), n_regions), np.nan, np.float32)
        return {"density": dens_a, "difference": dens_a - dens_b, "occlusion": occlusion,
                "pair_attention": pair}, geometry.area[imgs]

    pairs = lookalike_pairs(pairs_table, tops, images.label)
    pairs = pairs[pairs["class_a"].isin(by_class.keys())].reset_index(drop=True)
    return pair_contrasts(pairs, per_image, geometry.vocab, geometry.ranked, int(opts["permutations"]),
                          int(opts["seed"]))


# --------------------------------------------------------------------------- 6. ground-truth scores


def read_baseline_maps(path: Path | None, images: ImageTable, use: np.ndarray, method: str) -> dict[str, np.ndarray]:
    """Per baseline, its map of each used image's true class ((n, G), NaN rows where it has none)."""
    if path is None:
        return {}
    table = io.read(path, columns=["image_id", "method", "class_id", "attn"])
    maps = io.fixed_list_to_numpy(table.column("attn"))
    image = images.index_of(table.column("image_id").to_numpy().astype(np.int64))
    name = table.column("method").to_numpy(zero_copy_only=False).astype(str)
    cls = table.column("class_id").to_numpy().astype(np.int64)
    keep = (image >= 0) & (cls == images.label[np.maximum(image, 0)]) & (name != method)
    out = {}
    for baseline in np.unique(name[keep]):
        sel = keep & (name == baseline)
        arr = np.full((len(images), maps.shape[1]), np.nan, dtype=np.float32)
        arr[image[sel]] = maps[sel]
        out[str(baseline)] = arr[use]
    return out


def own_maps_by_head(maps: MapTable, images: ImageTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, peaks, ranks): every head's peak cell and rank on the true class's map, (n, H) each.

    Only images with the true class's map of every head are returned.
    """
    own = np.flatnonzero(maps.role == "true")
    n_heads = int(maps.head[own].max()) + 1 if len(own) else 0
    peaks = np.full((len(images), n_heads), -1, dtype=np.int64)
    ranks = np.full((len(images), n_heads), -1, dtype=np.int64)
    peaks[maps.image[own], maps.head[own]] = maps.maps[own].argmax(1)
    ranks[maps.image[own], maps.head[own]] = maps.head_rank[own]
    complete = np.flatnonzero((peaks >= 0).all(1) & (n_heads > 0))
    return complete, peaks[complete], ranks[complete]


def peak_scores(method: str, split: str, maps: MapTable, images: ImageTable, geometry: RegionGeometry,
                seed: int) -> list[dict]:
    """``peak_on_planted_part`` rows, on data with part masks and planted parts (else none)."""
    has_mask = images.rows["mask_path"].notna().to_numpy() if "mask_path" in images.rows else \
        np.zeros(len(images), bool)
    if geometry.planted is None or not has_mask.any():
        return []
    on_planted = cells_on_regions(geometry.weights, geometry.planted)
    image, peaks, ranks = own_maps_by_head(maps, images)
    usable = has_mask[image] & on_planted[image].any(1) & images.correct[image]
    image, peaks, ranks = image[usable], peaks[usable], ranks[usable]
    return peak_on_planted_part_rows(method, split, peaks, ranks, on_planted[image], geometry.inside[image], seed)


def region_parts(contrasts: pd.DataFrame, names: dict[int, list[str]] | None, vocab: list[str]) -> list[str]:
    """The ground-truth part each contrasts row's region stands for: its majority part over the
    pair's A images where ``names`` maps regions to parts (``majority_parts``), else the region."""
    index = {name: i for i, name in enumerate(vocab)}
    return [names[int(a)][index[region]] if names is not None and int(a) in names else str(region)
            for a, region in zip(contrasts["class_a"], contrasts["region"])]


def with_planted_flags(contrasts: pd.DataFrame, pairs: pd.DataFrame | None,
                       names: dict[int, list[str]] | None, vocab: list[str]) -> pd.DataFrame:
    """contrasts with ``planted`` set from the ground truth: the region (by its majority part,
    where ``names`` maps discovered regions to parts) is a planted part of the pair."""
    planted = {(int(a), int(b)): set(d) for a, b, d in zip(pairs["class_a"], pairs["class_b"],
                                                            pairs["differing_parts"])} \
        if pairs is not None and "differing_parts" in pairs else {}
    planted.update({(b, a): d for (a, b), d in list(planted.items())})
    flags = []
    for a, b, part in zip(contrasts["class_a"], contrasts["class_b"], region_parts(contrasts, names, vocab)):
        parts = planted.get((int(a), int(b)))
        flags.append(None if parts is None else part in parts)
    return contrasts.assign(planted=pd.array(flags, dtype="boolean"))


def ground_truth_scores(method: str, split: str, maps: MapTable, images: ImageTable, tops: TopMaps,
                        geometry: RegionGeometry, truth: RegionGeometry | None, contrasts: pd.DataFrame,
                        data: DataTables, baseline_maps: Path | None, opts: dict[str, Any],
                        counterfactuals: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """metrics_analysis.parquet (localization, trait recovery, attribute precision, peak on planted
    part, agreement with the counterfactual renders) and the contrasts with their ``planted`` flags.

    The one step that reads the ground truth. With regions other than the annotated parts, a
    region counts as the part that holds most of it over the pair's A images (``majority_parts``).
    ``counterfactuals`` (``counterfactuals.parquet``; None: no such table) gives the
    ``counterfactual_agreement_*`` and ``counterfactual_spearman*`` rows.
    """
    seed = int(opts["seed"])
    use = used_images(images, tops)
    rows: list[dict] = []
    discovered = truth is not None and truth is not geometry
    overlaps = class_overlaps(geometry, truth, images, use, data.root) if discovered else None
    names = majority_parts(geometry, truth, images, use, data.root, overlaps=overlaps) if discovered else None
    if truth is not None:
        own = (maps.head_rank <= int(opts["top_heads"])) & (maps.query_class == images.label[maps.image])
        model_maps = group_mean(maps.image[own], maps.maps[own], len(images))  # the true class's top map
        baselines = read_baseline_maps(baseline_maps, images, use, method)
        rows += localization_rows(method, split, model_maps[use], baselines, use, truth.weights, truth.dist,
                                  truth.scale, truth.inside, truth.planted, float(opts["pointing_radius"]), seed)
        rows += peak_scores(method, split, maps, images, truth, seed)
    if truth is not None or geometry.planted is not None:
        contrasts = with_planted_flags(contrasts, data.pairs, names, geometry.vocab)
    rows += recovery_rows(contrasts, method, split, seed)
    if discovered and data.pairs is not None:  # the strict rule: a region mostly background names no part
        strict = with_planted_flags(contrasts, data.pairs, majority_parts(
            geometry, truth, images, use, data.root, background=True, overlaps=overlaps), geometry.vocab)
        rows += [{**r, "metric": f"{r['metric']}_strict"} for r in recovery_rows(strict, method, split, seed)
                 if r["metric"] in ("trait_recovery_top1", "trait_recovery_recall3")]
    if counterfactuals is not None and truth is not None and len(contrasts):  # which ranking follows the model
        rows += agreement_rows(counterfactuals, contrasts.assign(part=region_parts(contrasts, names, geometry.vocab)),
                               method, split, seed)
    if data.attributes is not None and len(data.attributes) and len(contrasts):
        labelled = contrasts if names is None else contrasts.assign(region=[
            names[int(a)][geometry.vocab.index(r)] for a, r in zip(contrasts["class_a"], contrasts["region"])])
        rows += attribute_rows(labelled, data.attributes, truth.vocab if truth is not None else geometry.vocab,
                               float(opts["attribute_threshold"]), method, split, seed)
    return pd.DataFrame(rows, columns=list(EVALUATION_COLUMNS)), contrasts


# --------------------------------------------------------------------------- 7. write


def write_tables(out_dir: Path, frames: dict[str, pd.DataFrame], method: str, split: str,
                 vocab: list[str], top_heads: int) -> None:
    """The six analysis tables, each with the run's metadata."""
    common = {"method": method, "split": split, "regions": vocab, "top_heads": top_heads}
    out_dir.mkdir(parents=True, exist_ok=True)
    ht = frames["head_types"]
    tables.write_columns("head_types", {
        **{c: ht[c].to_numpy() for c in ("head", "head_type", "consistency", "n_maps")},
        **{c: ht[c].astype(str).tolist() for c in ("dominant_region", "type_dominant_region")},
        "profile": np.stack(ht["profile"].to_list()).astype(np.float32)},
        out_dir / "head_types.parquet", common)
    for name in ("traits", "trait_members", "regions"):
        _write(name, frames[name], out_dir, common)
    _write("contrasts", frames["contrasts"], out_dir, {**common, "combined": COMBINED_RULE})
    _write("metrics_analysis", frames["metrics_analysis"], out_dir, {"method": method, "split": split})


# --------------------------------------------------------------------------- the steps in order


def analyze(inputs: AnalysisInputs, out_dir: str | Path, options: dict | None = None,
            progress: bool = True) -> pd.DataFrame:
    """Run the trait analysis of one method and write its six tables.

    Args:
        inputs: the tables to read (``AnalysisInputs``; ``AnalysisInputs.conventional`` for the
            usual layout).
        out_dir: where the analysis tables go.
        options: the config's ``analysis`` section plus ``ANALYSIS_EXTRACT_KEYS`` from
            ``extract`` (defaults: ``DEFAULTS``); ``umap: false`` swaps UMAP for PCA
            coordinates.
        progress: print stage timings.

    Returns:
        The metric rows (``metrics_analysis.parquet``, evaluation layout).
    """
    t0 = time.perf_counter()
    opts = _options(options)
    method, split, grid = attention_metadata(inputs.attention)
    data = read_data_tables(inputs)
    maps, image_id = read_maps(inputs.attention, grid)
    images = read_images(image_id, data.manifest, inputs.predictions, inputs.attention)
    _log(progress, t0, f"read {len(maps.maps):,} maps ({method}, split {split}, grid {grid})")

    truth = ground_truth_regions(images, data, grid, opts, progress)  # evaluation only
    annotated = opts["regions"] == "annotated" and truth is not None
    geometry = truth if annotated else image_regions(images, data, grid, inputs.discovered_parts, opts, progress)
    _log(progress, t0, f"region weights of {len(images):,} images, {len(geometry.vocab)} regions")
    mass = region_mass(maps.maps, geometry.weights, maps.image)
    density = region_density(mass, geometry.area[maps.image])
    tops = top_maps(maps, mass, images, geometry.area, int(opts["top_heads"]), inputs.attention)
    _log(progress, t0, "region mass of every map")

    types, traits, members, member_rows = discover_traits(maps, images, mass, density, geometry,
                                                          inputs.trait_features, opts)
    _log(progress, t0, f"{len(traits)} traits from {len(members):,} maps; {types['head_type'].nunique()} head types")
    regions = species_region_table(maps, images, tops, density, geometry, members, member_rows, opts)
    effects = read_region_effects(inputs.region_effects, images, geometry.vocab, int(opts["contrast_images"]))
    pair_attention = read_pair_attention(inputs.pair_head_ranks, maps, images, density)
    # Which classes are look-alikes and what differs come from the data only in annotated mode.
    contrasts = contrast_table(images, tops, geometry, effects, data.pairs if annotated else None, opts,
                               pair_attention)
    _log(progress, t0, f"contrasts of {contrasts.groupby(['class_a', 'class_b']).ngroups} directed pairs")

    counterfactuals = _optional(inputs.counterfactuals)
    metrics, contrasts = ground_truth_scores(method, split, maps, images, tops, geometry, truth, contrasts, data,
                                             inputs.baseline_maps, opts, counterfactuals)
    if counterfactuals is not None:  # counterfactual renders: does the model use the planted part
        metrics = pd.concat([metrics, counterfactual_scores(counterfactuals, method, split)], ignore_index=True)
    if inputs.discovered_parts is not None:  # the discovered parts against the true ones (evaluation)
        metrics = pd.concat([metrics, part_discovery_scores(inputs.discovered_parts, inputs.manifest, inputs.parts,
                                                            inputs.root, method, int(opts["region_cells"]),
                                                            int(opts["seed"]))], ignore_index=True)
    write_tables(Path(out_dir), {"head_types": types, "traits": traits, "trait_members": members,
                                 "regions": regions, "contrasts": contrasts, "metrics_analysis": metrics},
                 method, split, geometry.vocab, int(opts["top_heads"]))
    _log(progress, t0, f"wrote {', '.join(OUTPUTS)} to {out_dir}")
    return metrics
