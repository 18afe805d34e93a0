"""The trait report: one self-contained HTML file a biologist reads.

``build_report`` reads only tables (the data set's manifest and parts, and per
method its extraction and analysis tables; layouts in docs/tables.md) plus a
few images from the data set root for thumbnails, and writes one HTML file
with every figure and thumbnail inline as a ``data:`` URI. Sections:

0. The answer first: per look-alike pair and method, the region ranked first
   as telling A from B (contrasts.parquet), its q-value, the images it was
   measured on and the share of them where filling it (extract.region_fill) lowers the A − B margin
   (region_effects.parquet), with a crop of that region from the A image and
   the B image where it is largest. Then the parts gallery: every region of
   each method's layout outlined on a few exemplar images, so that a
   discovered ``part_k`` can be named.
1. Summary: data set, methods, accuracy, faithfulness against the CAM
   baselines, ground-truth scores (all with 95 % intervals).
2. Species atlas: per species (at most ``report.max_species``), per method the
   regions ranked by attention density with intervals, the trait cards, and
   exemplar images (``report.exemplars``) with the top heads' maps overlaid and
   the region where each map is densest.
3. Look-alike pairs: side-by-side maps of both classes' queries on the same
   image and their difference, and the ranked distinguishing regions of both
   directions with q-values; on synthetic data, beside them the counterfactual
   strip of each direction (counterfactuals.parquet and
   counterfactual_examples.parquet): A's image re-rendered with each planted part
   set to B's state, the predictions and margin changes, the share of images that
   become B, and the parts ranked by what their swap does to the model. Where the
   model does not flip, the strip says so: a finding about the model.
4. Traits: per method the UMAP of trait members coloured by trait, a gallery
   per trait (``report.gallery`` images), and the head types.
5. INTR against Prompt-CAM on the same species (when both ran).
6. How to read this; the exact config.

Every string that comes from the data (class folders, part names, trait
names) goes through Jinja2's autoescaping, so a class called
``<img src=x onerror=alert(1)>`` is shown as text. A table that is missing
drops the part of the report that needs it and leaves a note saying so.
"""

from __future__ import annotations

import base64
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from analysis import io, plots, regions
from analysis.config import validated
from analysis.counterfactual import causal_effects, pair_part_effects
from analysis.ground_truth import planted_parts_by_class
from analysis.pixels import to_rgb8
from analysis.traits import dominant_region

TEMPLATES = Path(__file__).parent / "templates"
METHOD_TABLES = ("evaluation", "predictions", "head_ranks", "region_effects", "baseline_maps", "head_types",
                 "traits", "trait_members", "regions", "contrasts")
# Read where given, with no note where absent: only synthetic data has counterfactual renders.
OPTIONAL_METHOD_TABLES = ("counterfactuals", "counterfactual_examples")
ACCURACY_METRICS = ("top1", "top5")
FAITHFULNESS_METRICS = ("insertion_auc", "deletion_auc")
METHOD_LABELS = {"prompt_cam": "Prompt-CAM", "intr": "INTR"}
HEADS_PER_EXEMPLAR = 3      # overlays per exemplar and method (the top-ranked heads)
MAX_TRAIT_GALLERIES = 20    # trait galleries per method (the rest are in the table)
CARDS_PER_SPECIES = 5
CONTRAST_ROWS = 5
MAX_PAIRS = 30              # look-alike pairs drawn (the rest are in contrasts.parquet)
THUMB_BUDGET_BYTES = 3.0e6  # all thumbnails together; their size shrinks to fit (between 56 and 96 px)
BYTES_PER_THUMB_PIXEL = 0.45  # base64 JPEG bytes per pixel of a thumbnail, measured on photos and the synthetic birds
CROP_SIDE = 80              # longer side of a region crop on the first screen, px
CROP_MARGIN = 0.15          # a crop's margin around the region's box, as a share of the box's longer side
MAX_CROP_CANDIDATES = 32    # images of a class searched for the one where a region is largest
AREA_SAMPLES = 64           # sample points a side when measuring a region's share of an image
GALLERY_IMAGES = 3          # exemplar images per region in the parts gallery (one per species)
GALLERY_SIDE = 64           # their longer side, px
FLIP_FINDING = 0.5          # below this share of images becoming B with the planted parts swapped, the strip
                            # says the model does not rely on them
CAUSAL_PARTS = 4            # parts listed in a strip's model-causal ranking


class ReportError(RuntimeError):
    """A table the report cannot do without is missing or malformed."""


# --------------------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table cell ('—' for missing)."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    v = float(value)
    if v != 0 and abs(v) < 10 ** -(digits - 1):
        return f"{v:.1e}"
    return f"{v:.{digits}f}"


def fmt_interval(value: Any, lo: Any, hi: Any) -> str:
    """'0.812 [0.790, 0.834]' (the interval dropped where it is missing)."""
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return fmt(value)
    return f"{fmt(value)} [{fmt(lo)}, {fmt(hi)}]"


def fmt_rank(value: Any) -> str:
    """A rank ('—' for missing or unranked, i.e. below 1)."""
    if value is None or pd.isna(value) or float(value) < 1:
        return "—"
    return str(int(value))


def method_label(method: str) -> str:
    """Display name of a method folder."""
    return METHOD_LABELS.get(method, method)


def _as_list(value: Any) -> list:
    """A list cell (Arrow list → numpy array or list) as a Python list."""
    if value is None:
        return []
    if isinstance(value, float) and np.isnan(value):
        return []
    return list(np.asarray(value).tolist())


# --------------------------------------------------------------------------- loading


@dataclass
class MethodData:
    """One method's tables (each optional) and its attention table's geometry."""

    name: str
    folder: Path
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    attention: Path | None = None
    grid: tuple[int, int] | None = None
    head_regions: list[str] | None = None

    def has(self, *names: str) -> bool:
        return all(n in self.tables for n in names)


def _read_optional(path: Path | None) -> pd.DataFrame | None:
    if path is None or not path.is_file():
        return None
    return io.load(path)


@dataclass
class ReportTables:
    """Every table the report reads, each by its own path (the workflow declares each one).

    Args:
        manifest: ``manifest.parquet`` (required).
        parts: ``parts.parquet`` (None: none; region names fall back to the coarse grid).
        lookalike_pairs: ``lookalike_pairs.parquet`` (None: pairs come from the contrasts).
        methods: per method, in report order, its tables by name (``METHOD_TABLES`` and
            ``attention``); a name left out or a file not found drops what needs it, with a note.
    """

    manifest: Path
    parts: Path | None = None
    lookalike_pairs: Path | None = None
    methods: dict[str, dict[str, Path]] = field(default_factory=dict)

    @classmethod
    def under(cls, results_dir: str | Path, methods: Sequence[str]) -> "ReportTables":
        """The tables at their documented places under ``results/{dataset}`` (docs/tables.md).

        Args:
            results_dir: ``results/{dataset}``.
            methods: method folders to report, in order.
        """
        results_dir = Path(results_dir)
        return cls(manifest=results_dir / "manifest.parquet", parts=results_dir / "parts.parquet",
                   lookalike_pairs=results_dir / "lookalike_pairs.parquet",
                   methods={m: {name: results_dir / m / f"{name}.parquet"
                                for name in (*METHOD_TABLES, *OPTIONAL_METHOD_TABLES, "attention",
                                             "discovered_parts")} for m in methods})


def load_method(method: str, tables: Mapping[str, Path]) -> MethodData:
    """Read one method's tables; those not given or not found are listed in ``missing``.

    Args:
        method: the method's name (``prompt_cam``, ``intr``).
        tables: its table paths by name (``METHOD_TABLES``, ``OPTIONAL_METHOD_TABLES`` and ``attention``).
    """
    paths = {name: Path(path) for name, path in tables.items()}
    folder = next(iter(paths.values())).parent if paths else Path(method)
    data = MethodData(method, folder)
    for name in METHOD_TABLES:
        frame = _read_optional(paths.get(name))
        if frame is None:
            data.missing.append(f"{name}.parquet")
        else:
            data.tables[name] = frame
    for name in OPTIONAL_METHOD_TABLES:
        frame = _read_optional(paths.get(name))
        if frame is not None:
            data.tables[name] = frame
    attention = paths.get("attention")
    if attention is not None and attention.is_file():
        data.attention = attention
        data.grid = io.grid_of(attention)
    else:
        data.missing.append("attention.parquet")
    if "head_types" in data.tables:
        meta = io.metadata(paths["head_types"])
        names = meta.get("regions")
        data.head_regions = [str(r) for r in names] if isinstance(names, list) else None
    return data


class AttentionIndex:
    """Maps of one method for a set of images, looked up by (image, query class, head)."""

    def __init__(self, path: Path, image_ids: Iterable[int]):
        ids = sorted({int(i) for i in image_ids})
        keys, maps = io.maps(path, image_id=ids) if ids else (pd.DataFrame(), np.zeros((0, 1, 1), np.float32))
        self.maps = maps
        self.keys = keys.reset_index(drop=True)
        if len(keys):
            self.groups = self.keys.groupby(["image_id", "query_class"]).indices
        else:
            self.groups = {}

    def rows(self, image_id: int, query_class: int) -> pd.DataFrame:
        """Key rows (with a ``pos`` column into ``maps``) of one (image, query class), best rank first."""
        idx = self.groups.get((int(image_id), int(query_class)))
        if idx is None:
            return self.keys.iloc[0:0].assign(pos=[])
        rows = self.keys.iloc[idx].assign(pos=idx)
        sort = "head_rank" if "head_rank" in rows else "head"
        return rows.sort_values([sort, "head"])

    def top(self, image_id: int, query_class: int, k: int) -> tuple[pd.DataFrame, np.ndarray]:
        """The ``k`` top-ranked heads' key rows and maps (k, grid_h, grid_w)."""
        rows = self.rows(image_id, query_class).head(k)
        return rows, self.maps[rows["pos"].to_numpy(dtype=int)]

    def head(self, image_id: int, query_class: int, head: int) -> np.ndarray | None:
        rows = self.rows(image_id, query_class)
        rows = rows[rows["head"] == head]
        return self.maps[int(rows["pos"].iloc[0])] if len(rows) else None


def region_layout(extract: Mapping[str, Any], parts: pd.DataFrame | None,
                  method_tables: Mapping[str, Path]) -> regions.RegionLayout:
    """The configured regions (``extract.regions``) of one method's report: annotated parts, the
    grid, or the method's discovered parts (its ``discovered_parts`` table)."""
    mode = extract["regions"]
    path = method_tables.get("discovered_parts")
    discovered = regions.DiscoveredParts.read(path) if mode == "discovered" and path is not None \
        and Path(path).is_file() else None
    if mode == "discovered" and discovered is None:
        raise ReportError("extract.regions is 'discovered' but no discovered_parts table was given")
    return regions.RegionLayout.build(mode, parts=parts if mode == "annotated" else None, discovered=discovered,
                                      radius=extract["region_radius"], cells=extract["region_cells"])


class PeakRegions:
    """The region a map falls on: its region of highest density (mass / area), by ``analysis.regions``.

    The rule of ``dominant_region`` in ``trait_members.parquet`` (the same
    functions): mass is ``weights @ map``, density mass / the region's share of
    the image, and a region absent from the image never wins.
    """

    def __init__(self, manifest: pd.DataFrame, layout: regions.RegionLayout, root: Path | None):
        self.manifest = manifest.set_index("image_id", drop=False)
        self.layout = layout
        self.root = root
        self.vocab = layout.vocab
        self._cache: dict[tuple[int, int], dict[int, np.ndarray]] = {}
        self._areas: dict[int, np.ndarray] = {}

    def prepare(self, image_ids: Iterable[int], grid: tuple[int, int]) -> None:
        """Compute the patch weights of these images at this grid (once)."""
        known = self._cache.setdefault(tuple(grid), {})
        todo = [i for i in dict.fromkeys(int(i) for i in image_ids) if i not in known and i in self.manifest.index]
        if not todo:
            return
        rows = self.manifest.loc[todo]
        if self.root is None or not self.root.is_dir():
            rows = rows.drop(columns=["mask_path"], errors="ignore")
        weights = regions.image_weights(self.layout, rows, tuple(grid), root=self.root)
        known.update(zip(todo, weights))

    def peak(self, image_id: int, attn: np.ndarray) -> str:
        """Name of the region where ``attn`` is densest in this image ('?' when unknown)."""
        weights = self._cache.get(tuple(attn.shape), {}).get(int(image_id))
        if weights is None:
            return "?"
        mass = weights @ attn.reshape(-1).astype(np.float32)
        density = regions.region_density(mass, weights.mean(axis=1))
        return self.vocab[int(dominant_region(density[None])[0])]

    def _rows(self, image_ids: Sequence[int]) -> pd.DataFrame:
        """Manifest rows of these images (without masks when there is no data set root to read them)."""
        rows = self.manifest.loc[list(image_ids)]
        if self.root is None or not self.root.is_dir():
            rows = rows.drop(columns=["mask_path"], errors="ignore")
        return rows

    def areas(self, image_ids: Iterable[int]) -> dict[int, np.ndarray]:
        """Each image's (R,) share of its area in every region, on ``AREA_SAMPLES`` squared sample points
        (cached; images the manifest lacks are left out)."""
        cache = self._areas
        todo = [i for i in dict.fromkeys(int(i) for i in image_ids) if i not in cache and i in self.manifest.index]
        if todo:
            n = len(self.vocab)
            for k, labels in regions.iter_label_maps(self.layout, self._rows(todo), (AREA_SAMPLES, AREA_SAMPLES),
                                                     self.root):
                cache[todo[k]] = np.bincount(labels.reshape(-1), minlength=n)[:n] / labels.size
        return {int(i): cache[int(i)] for i in image_ids if int(i) in cache}

    def labels_at(self, image_id: int, hw: tuple[int, int]) -> np.ndarray:
        """(h, w) label map (indices into ``vocab``) of one image sampled at ``hw``, e.g. its own pixel size."""
        _, labels = next(regions.iter_label_maps(self.layout, self._rows([int(image_id)]), tuple(hw), self.root))
        return labels


class ImageStore:
    """Thumbnails of data set images (read once)."""

    def __init__(self, root: Path | None, paths: Mapping[int, str]):
        self.root = root
        self.paths = paths
        self._cache: dict[int, np.ndarray | None] = {}
        self.missing: list[str] = []

    def get(self, image_id: int) -> np.ndarray | None:
        image_id = int(image_id)
        if image_id not in self._cache:
            from PIL import Image

            path = (self.root / self.paths[image_id]) if self.root is not None and image_id in self.paths else None
            if path is None or not path.is_file():
                self._cache[image_id] = None
                self.missing.append(str(path) if path is not None else f"image_id {image_id}")
            else:
                with Image.open(path) as im:  # 16-bit images scaled, not clipped (analysis.pixels)
                    self._cache[image_id] = np.asarray(to_rgb8(im))
        return self._cache[image_id]


# --------------------------------------------------------------------------- report state


@dataclass
class Report:
    """Everything the sections share while the report is built."""

    root: Path | None
    config: dict
    manifest: pd.DataFrame
    parts: pd.DataFrame | None
    pairs: pd.DataFrame | None
    methods: list[MethodData]
    names: dict[int, str]
    species: list[int]
    exemplars: dict[int, list[int]]
    images: ImageStore
    peaks: dict[str, PeakRegions]  # per method (discovered regions are the method's own)
    attention: dict[str, AttentionIndex]
    region_colours: dict[str, str]
    top_heads: int
    notes: list[str] = field(default_factory=list)
    genus_of: dict[int, str | None] = field(default_factory=dict)
    side: int = plots.THUMB

    def name(self, class_id: int) -> str:
        return self.names.get(int(class_id), f"class {int(class_id)}")

    def thumb(self, image_id: int) -> str | None:
        image = self.images.get(image_id)
        return plots.image_uri(plots.thumbnail(image, self.side)) if image is not None else None

    def overlay(self, image_id: int, attn: np.ndarray, diverging: bool = False) -> str | None:
        image = self.images.get(image_id)
        return (plots.image_uri(plots.overlay(image, attn, side=self.side, diverging=diverging))
                if image is not None else None)


def thumbnail_side(n_thumbs: int) -> int:
    """Thumbnail size that keeps ``n_thumbs`` thumbnails within ``THUMB_BUDGET_BYTES`` (56 to 96 px)."""
    side = np.sqrt(THUMB_BUDGET_BYTES / (max(n_thumbs, 1) * BYTES_PER_THUMB_PIXEL))
    return int(np.clip(side, 56, plots.THUMB))


def _count_thumbs(n_species: int, exemplars: int, methods: Sequence[MethodData], heads: int, pairs: int,
                  gallery: int) -> int:
    """How many thumbnails the report will hold, at most."""
    m = len(methods)
    traits = sum(min(len(x.tables["traits"]), MAX_TRAIT_GALLERIES) for x in methods if "traits" in x.tables)
    return (n_species * exemplars * (1 + m * heads)   # atlas
            + pairs * m * 8                           # look-alike maps
            + traits * gallery                        # trait galleries
            + n_species * (1 + m))                    # comparison


def _choose_exemplars(methods: Sequence[MethodData], manifest: pd.DataFrame, species: Sequence[int],
                      count: int) -> dict[int, list[int]]:
    """Per species, ``count`` images every method classified right (most confident first).

    Falls back to images some method got right, then to any evaluated image of the species.
    """
    preds = [m.tables["predictions"][["image_id", "label", "correct", "prob_true"]].assign(method=m.name)
             for m in methods if "predictions" in m.tables]
    if preds:
        joined = pd.concat(preds, ignore_index=True)
        joined["correct"] = joined["correct"].astype(bool)
        per_image = joined.groupby("image_id").agg(label=("label", "first"), n_correct=("correct", "sum"),
                                                   prob=("prob_true", "mean"))
        per_image = per_image.reset_index().sort_values(["n_correct", "prob", "image_id"],
                                                        ascending=[False, False, True])
    else:
        per_image = (manifest[manifest["split"] == "test"][["image_id", "class_id"]]
                     .rename(columns={"class_id": "label"}))
    chosen = per_image[per_image["label"].isin(species)].groupby("label").head(count)
    return {int(c): chosen.loc[chosen["label"] == c, "image_id"].astype(int).tolist() for c in species}


def _needed_images(report_species: Sequence[int], exemplars: Mapping[int, list[int]], methods: Sequence[MethodData],
                   gallery: int) -> dict[str, set[int]]:
    """Images whose maps each method's sections draw."""
    base = {i for ids in exemplars.values() for i in ids}
    out: dict[str, set[int]] = {}
    for m in methods:
        ids = set(base)
        if m.has("traits", "trait_members"):
            members = m.tables["trait_members"].set_index("member")
            for reps in m.tables["traits"]["representatives"].head(MAX_TRAIT_GALLERIES):
                reps = [r for r in _as_list(reps)[:gallery] if r in members.index]
                ids.update(members.loc[reps, "image_id"].astype(int).tolist())
        out[m.name] = ids
    return out


# --------------------------------------------------------------------------- sections: summary


def _evaluation(methods: Sequence[MethodData], split: str | None) -> pd.DataFrame:
    frames = [m.tables["evaluation"].assign(model=m.name) for m in methods if "evaluation" in m.tables]
    if not frames:
        return pd.DataFrame(columns=["model", "method", "metric", "split", "value", "ci_lo", "ci_hi", "n"])
    ev = pd.concat(frames, ignore_index=True)
    for column in ("ci_lo", "ci_hi", "n"):
        if column not in ev:
            ev[column] = np.nan
    if "split" not in ev:
        ev["split"] = ""
    if split is not None and (ev["split"] == split).any():
        ev = ev[(ev["split"] == split) | ev["split"].isna()]
    several_splits = ev["split"].nunique() > 1
    ev["label"] = [m if m == model else f"{m} · on {method_label(model)}"
                   for m, model in zip(ev["method"], ev["model"])]
    if several_splits:
        ev["label"] = ev["label"] + " · " + ev["split"].astype(str)
    return ev.reset_index(drop=True)


def _metric_table(ev: pd.DataFrame, metrics: Sequence[str], rows_are: str = "label") -> dict | None:
    """A table of '{value} [lo, hi]' cells: rows = methods (``label``) or metrics, columns = the other."""
    part = ev[ev["metric"].isin(metrics)]
    if part.empty:
        return None
    part = part.drop_duplicates(["label", "metric"])
    cell = {(r.label, r.metric): (fmt_interval(r.value, r.ci_lo, r.ci_hi), r.n) for r in part.itertuples()}
    labels = list(dict.fromkeys(part["label"]))
    present = [m for m in metrics if (part["metric"] == m).any()]
    if rows_are == "label":
        header, row_keys, col_keys = present, labels, present
        lookup = lambda r, c: cell.get((r, c))  # noqa: E731
    else:
        header, row_keys, col_keys = labels, present, labels
        lookup = lambda r, c: cell.get((c, r))  # noqa: E731
    rows = []
    for r in row_keys:
        cells = [lookup(r, c) for c in col_keys]
        rows.append({"label": r, "cells": [c[0] if c else "—" for c in cells],
                     "n": next((fmt(c[1]) for c in cells if c and pd.notna(c[1])), "—")})
    return {"header": header, "rows": rows}


def summary_section(rep: Report) -> dict:
    manifest = rep.manifest
    split = rep.config["extract"]["split"]
    ev = _evaluation(rep.methods, split)
    known = set(ACCURACY_METRICS) | set(FAITHFULNESS_METRICS)
    truth_metrics = [m for m in dict.fromkeys(ev["metric"]) if m not in known]
    faith_fig = None
    if ev["metric"].isin(FAITHFULNESS_METRICS).any():
        faith_fig = plots.figure_uri(plots.metric_pointrange(ev[ev["metric"].isin(FAITHFULNESS_METRICS)],
                                                             FAITHFULNESS_METRICS))
    truth_tables = []
    for model in dict.fromkeys(ev["model"]):
        table = _metric_table(ev[ev["model"] == model], truth_metrics, rows_are="metric")
        if table:
            truth_tables.append({"method": method_label(model), "table": table})
    accuracy_from_predictions = []
    for m in rep.methods:
        if "predictions" in m.tables:
            p = m.tables["predictions"]
            accuracy_from_predictions.append({"method": method_label(m.name), "images": len(p),
                                              "top1": fmt(float(np.mean(p["correct"].astype(bool))))})
    splits = manifest["split"].value_counts()
    return {
        "dataset": rep.config["dataset"]["name"],
        "kind": rep.config["dataset"]["kind"],
        "n_images": len(manifest),
        "splits": [{"split": s, "n": int(n)} for s, n in splits.items()],
        "n_classes": len(rep.names),
        "n_genera": int(manifest["genus"].nunique()) if "genus" in manifest else None,
        "methods": [method_label(m.name) for m in rep.methods],
        "eval_split": split,
        "accuracy": _metric_table(ev, ACCURACY_METRICS),
        "accuracy_predictions": accuracy_from_predictions,
        "faithfulness": _metric_table(ev, FAITHFULNESS_METRICS),
        "faithfulness_figure": faith_fig,
        "truth": truth_tables,
    }


# --------------------------------------------------------------------------- sections: atlas


def _trait_names(m: MethodData) -> dict[int, str]:
    if "traits" not in m.tables:
        return {}
    t = m.tables["traits"]
    return dict(zip(t["trait"].astype(int), t["name"].astype(str)))


def _ranked(rows: pd.DataFrame, rank: str, score: str) -> pd.DataFrame:
    """Rows in ranking order: by ``rank`` where it is given (ranks below 1 mean unranked and go
    last, e.g. background), else by ``score`` descending."""
    if rank in rows:
        r = pd.to_numeric(rows[rank], errors="coerce")
        key = r.where(r >= 1, np.inf).fillna(np.inf)
        return rows.assign(_key=key).sort_values(["_key", score] if score in rows else ["_key"],
                                                 ascending=[True, False] if score in rows else [True]) \
            .drop(columns="_key")
    return rows.sort_values(score, ascending=False)


def _cards(rows: pd.DataFrame, trait_names: Mapping[int, str], colours: Mapping[str, str]) -> list[dict]:
    """Trait cards: a species' best regions with score, interval, support, heads and trait."""
    rows = _ranked(rows, "rank", "density").head(CARDS_PER_SPECIES)
    cards = []
    for r in rows.to_dict("records"):
        trait = r.get("trait", -1)
        trait = int(trait) if trait is not None and pd.notna(trait) else -1
        cards.append({
            "rank": fmt_rank(r.get("rank")), "region": str(r["region"]),
            "density": fmt_interval(r.get("density"), r.get("density_lo"), r.get("density_hi")),
            "mass": fmt(r.get("mass")),
            "n_images": fmt(r.get("n_images")),
            "heads": ", ".join(str(h) for h in _as_list(r.get("heads"))) or "—",
            "trait": trait_names.get(trait, "—") if trait >= 0 else "—",
            "colour": region_colour(colours, r["region"]),
        })
    return cards


def region_colour(colours: Mapping[str, str], region: str) -> str:
    """The region's palette colour in this report (grey for a region the palette lacks)."""
    return colours.get(str(region), "#888888")


def atlas_section(rep: Report, progress: bool) -> dict:
    k = min(HEADS_PER_EXEMPLAR, rep.top_heads)
    entries = []
    notes = []
    for m in rep.methods:
        if "regions" not in m.tables:
            notes.append(f"{method_label(m.name)}: regions.parquet not found; its ranked regions are left out.")
        if m.attention is None:
            notes.append(f"{method_label(m.name)}: attention.parquet not found; its exemplar maps are left out.")
    iterator = rep.species
    if progress:
        from tqdm import tqdm

        iterator = tqdm(rep.species, desc="report: species", unit="sp", file=sys.stderr)
    for class_id in iterator:
        name = rep.name(class_id)
        per_method = []
        for m in rep.methods:
            entry: dict[str, Any] = {"method": method_label(m.name), "chart": None, "cards": []}
            if "regions" in m.tables:
                rows = m.tables["regions"][m.tables["regions"]["class_id"] == class_id]
                if len(rows):
                    entry["chart"] = plots.figure_uri(plots.ranked_regions_chart(
                        rows, rep.region_colours, title=f"{method_label(m.name)}: {name}"))
                    entry["cards"] = _cards(rows, _trait_names(m), rep.region_colours)
            per_method.append(entry)
        exemplars = []
        for image_id in rep.exemplars.get(class_id, []):
            thumb = rep.thumb(image_id)
            if thumb is None:
                continue
            rows_out = []
            for m in rep.methods:
                if m.name not in rep.attention:
                    continue
                keys, maps = rep.attention[m.name].top(image_id, class_id, k)
                overlays = []
                for key, attn in zip(keys.to_dict("records"), maps):
                    rank = key.get("head_rank")
                    overlays.append({"uri": rep.overlay(image_id, attn), "head": int(key["head"]),
                                     "rank": int(rank) if rank is not None and pd.notna(rank) else None,
                                     "region": rep.peaks[m.name].peak(image_id, attn)})
                rows_out.append({"method": method_label(m.name), "overlays": overlays})
            exemplars.append({"image_id": int(image_id), "uri": thumb, "methods": rows_out})
        entries.append({"class_id": int(class_id), "anchor": f"species-{int(class_id)}", "name": name,
                        "genus": rep.genus_of.get(class_id),
                        "methods": per_method, "exemplars": exemplars})
    omitted = len(rep.names) - len(rep.species)
    if omitted > 0:
        notes.append(f"{omitted} more species are not shown here (report.max_species = {len(rep.species)}); "
                     f"their rows are in regions.parquet.")
    return {"species": entries, "notes": notes, "heads_shown": k}


# --------------------------------------------------------------------------- sections: pairs


def _pairs(rep: Report) -> pd.DataFrame:
    """Unordered look-alike pairs among the shown species: class_a, class_b, differing_parts."""
    shown = set(rep.species)
    if rep.pairs is not None and len(rep.pairs):
        pairs = rep.pairs.copy()
        if "differing_parts" not in pairs:
            pairs["differing_parts"] = [[] for _ in range(len(pairs))]
    else:
        found = [m.tables["contrasts"][["class_a", "class_b"]] for m in rep.methods if "contrasts" in m.tables]
        if not found:
            return pd.DataFrame(columns=["class_a", "class_b", "differing_parts"])
        pairs = pd.concat(found).astype(int)
        lo, hi = np.minimum(pairs["class_a"], pairs["class_b"]), np.maximum(pairs["class_a"], pairs["class_b"])
        pairs = pd.DataFrame({"class_a": lo, "class_b": hi}).drop_duplicates()
        pairs["differing_parts"] = [[] for _ in range(len(pairs))]
    pairs = pairs[pairs["class_a"].isin(shown) & pairs["class_b"].isin(shown)]
    return pairs.sort_values(["class_a", "class_b"]).head(MAX_PAIRS).reset_index(drop=True)


def _contrast_rows(contrasts: pd.DataFrame, a: int, b: int, expected: set[str],
                   colours: Mapping[str, str]) -> list[dict]:
    rows = contrasts[(contrasts["class_a"] == a) & (contrasts["class_b"] == b)]
    order = "rank_combined" if "rank_combined" in rows else "combined"
    rows = _ranked(rows, "rank_combined", "combined").head(CONTRAST_ROWS)
    out = []
    for r in rows.to_dict("records"):
        planted = r.get("planted")
        is_planted = bool(planted) if planted is not None and pd.notna(planted) else str(r["region"]) in expected
        out.append({"rank": fmt_rank(r.get(order)) if order.startswith("rank") else "", "region": str(r["region"]),
                    "combined": fmt(r.get("combined")), "density": fmt(r.get("density_a")),
                    "difference": fmt(r.get("difference")), "occlusion": fmt(r.get("occlusion")),
                    "p": fmt(r.get("p_value")), "q": fmt(r.get("q_value")),
                    "significant": r.get("q_value") is not None and pd.notna(r.get("q_value"))
                    and float(r["q_value"]) < 0.05,
                    "planted": is_planted, "colour": region_colour(colours, r["region"])})
    return out


def _contrast_maps(rep: Report, m: MethodData, image_id: int, own: int, other: int) -> dict | None:
    """Image of ``own``; its query's and ``other``'s query's top-head mean maps; their difference."""
    index = rep.attention.get(m.name)
    if index is None:
        return None
    _, own_maps = index.top(image_id, own, rep.top_heads)
    _, other_maps = index.top(image_id, other, rep.top_heads)
    thumb = rep.thumb(image_id)
    if thumb is None or not len(own_maps):
        return None
    own_mean = own_maps.mean(axis=0)
    item = {"image": thumb, "own": rep.overlay(image_id, own_mean), "own_name": rep.name(own),
            "other_name": rep.name(other), "other": None, "diff": None}
    if len(other_maps):
        other_mean = other_maps.mean(axis=0)
        item["other"] = rep.overlay(image_id, other_mean)
        item["diff"] = rep.overlay(image_id, own_mean - other_mean, diverging=True)
    return item


def png_uri(png: bytes) -> str:
    """Data URI of PNG file bytes (the counterfactual renders are shown as the model scored them)."""
    return "data:image/png;base64," + base64.b64encode(bytes(png)).decode("ascii")


def _strip_images(rep: Report, examples: pd.DataFrame | None, a: int, b: int) -> list[dict]:
    """The pair's example renders (original first) with prediction, margin A − B and its change."""
    if examples is None:
        return []
    shown = examples[(examples["class_a"] == a) & (examples["class_b"] == b)]
    original = shown.loc[shown["kind"] == "original", "margin"]
    before = float(original.iloc[0]) if len(original) else float("nan")
    out = []
    for r in shown.to_dict("records"):
        label = {"original": f"original {rep.name(a)}", "all_planted": f"all planted parts → {rep.name(b)}'s"}.get(
            str(r["kind"]), f"{r['part']} → {rep.name(b)}'s")
        change = float(r["margin"]) - before
        out.append({"uri": png_uri(r["png"]), "label": label, "pred": rep.name(int(r["pred"])),
                    "becomes_b": int(r["pred"]) == b, "margin": f"{float(r['margin']):.2f}",
                    "change": "" if r["kind"] == "original" or not np.isfinite(change) else f"{change:+.2f}"})
    return out


def counterfactual_strip(rep: Report, m: MethodData, a: int, b: int) -> dict | None:
    """The counterfactual evidence of one directed pair (A, B) for one model (None: no renders).

    The example renders of ``counterfactual_examples``; from ``counterfactuals``, the share of A's
    images predicted B with every planted part set to B's state (``all_planted``; with one
    planted part, that swap), each planted part's flip share and margin drop, and the model-causal
    ranking of the parts (single-part swaps, by mean margin drop).
    """
    table = m.tables.get("counterfactuals")
    if table is None:
        return None
    rows = table[(table["class_a"] == a) & (table["class_b"] == b)]
    if not len(rows):
        return None
    everything = rows[rows["kind"] == "all_planted"]
    flipped, n = int((everything["pred_after"] == b).sum()), len(everything)
    per_part = pair_part_effects(rows[rows["kind"] == "planted"])
    planted = set(per_part["part"])
    causal = causal_effects(rows).get((a, b), pd.Series(dtype=float))
    images = _strip_images(rep, m.tables.get("counterfactual_examples"), a, b)
    return {"a": rep.name(a), "b": rep.name(b), "images": images,
            "flipped": flipped, "n": n, "share": f"{flipped / n:.0%}" if n else "—",
            "no_flip": n > 0 and flipped / n < FLIP_FINDING,
            "planted": [{"part": str(r["part"]), "flip": f"{r['flip_rate']:.0%}",
                         "drop": f"{r['mean_margin_drop']:.2f}"} for r in per_part.to_dict("records")],
            "causal": [{"part": str(part), "drop": f"{drop:.2f}", "planted": part in planted}
                       for part, drop in causal.head(CAUSAL_PARTS).items()]}


def pairs_section(rep: Report) -> dict:
    notes = []
    if rep.pairs is None:
        notes.append("lookalike_pairs.parquet not found: pairs are taken from contrasts.parquet.")
    for m in rep.methods:
        if "contrasts" not in m.tables:
            notes.append(f"{method_label(m.name)}: contrasts.parquet not found; its pair rankings are left out.")
    pairs = _pairs(rep)
    if len(pairs) == MAX_PAIRS:
        notes.append(f"The first {MAX_PAIRS} look-alike pairs among the species shown are drawn; "
                     f"every pair's ranking is in contrasts.parquet.")
    out = []
    for p in pairs.to_dict("records"):
        a, b = int(p["class_a"]), int(p["class_b"])
        expected = {str(x) for x in _as_list(p.get("differing_parts"))}
        methods = []
        for m in rep.methods:
            item: dict[str, Any] = {"method": method_label(m.name), "maps": [], "ab": [], "ba": []}
            for own, other in ((a, b), (b, a)):
                ex = rep.exemplars.get(own, [])
                maps = _contrast_maps(rep, m, ex[0], own, other) if ex else None
                if maps:
                    item["maps"].append(maps)
            if "contrasts" in m.tables:
                item["ab"] = _contrast_rows(m.tables["contrasts"], a, b, expected, rep.region_colours)
                item["ba"] = _contrast_rows(m.tables["contrasts"], b, a, expected, rep.region_colours)
            item["strips"] = [s for s in (counterfactual_strip(rep, m, a, b), counterfactual_strip(rep, m, b, a)) if s]
            if item["maps"] or item["ab"] or item["ba"] or item["strips"]:
                methods.append(item)
        out.append({"a": rep.name(a), "b": rep.name(b), "anchor_a": f"species-{a}", "anchor_b": f"species-{b}",
                    "genus": p.get("genus"), "expected": sorted(expected), "methods": methods})
    if not out:
        notes.append("No look-alike pairs among the species shown.")
    return {"pairs": out, "notes": notes}


# --------------------------------------------------------------------------- sections: the answer first


def region_box(labels: np.ndarray, region: int, margin: float = CROP_MARGIN,
               min_pad: int = 2) -> tuple[int, int, int, int] | None:
    """The bounding box of one region's pixels, padded and clipped to the image (None: region absent).

    Args:
        labels: (h, w) label map (indices into the layout's vocabulary).
        region: the region's index.
        margin: padding on every side, as a share of the box's longer side.
        min_pad: padding in pixels at least.

    Returns:
        (top, left, bottom, right), bottom and right exclusive: ``labels[top:bottom, left:right]``.
    """
    hit = labels == region
    rows, cols = np.flatnonzero(hit.any(axis=1)), np.flatnonzero(hit.any(axis=0))
    if not rows.size:
        return None
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    pad = max(int(min_pad), round(margin * max(bottom - top, right - left)))
    h, w = labels.shape
    return max(top - pad, 0), max(left - pad, 0), min(bottom + pad, h), min(right + pad, w)


def _class_images(rep: Report, m: MethodData, own: int, other: int) -> list[int]:
    """Images of ``own`` to search for a crop: those its contrast with ``other`` was measured on
    (region_effects), else its images of the evaluated split, else all of its images."""
    ids: list[int] = []
    if "region_effects" in m.tables:
        e = m.tables["region_effects"]
        ids = e.loc[(e["class_a"] == own) & (e["class_b"] == other), "image_id"].astype(int).unique().tolist()
    if not ids:
        of_class = rep.manifest[rep.manifest["class_id"] == own]
        in_split = of_class[of_class["split"] == rep.config["extract"]["split"]]
        ids = (in_split if len(in_split) else of_class)["image_id"].astype(int).tolist()
    return sorted(ids)[:MAX_CROP_CANDIDATES]


def _largest_region_image(peaks: PeakRegions, image_ids: Sequence[int], region: int) -> int | None:
    """The image where the region covers the largest share (None: absent from all of them)."""
    areas = peaks.areas(image_ids)
    best = max(areas.items(), key=lambda kv: (kv[1][region], -kv[0]), default=None)
    return best[0] if best is not None and best[1][region] > 0 else None


def region_crop(rep: Report, peaks: PeakRegions, image_id: int, region: int, colour: str) -> str | None:
    """Data URI of the crop of one region from one image (its box padded by ``CROP_MARGIN``), scaled to
    ``CROP_SIDE`` with the region outlined in its colour; None when the image or the region is missing."""
    image = rep.images.get(image_id)
    if image is None:
        return None
    labels = peaks.labels_at(image_id, image.shape[:2])
    box = region_box(labels, region, min_pad=max(2, round(0.02 * max(image.shape[:2]))))
    if box is None:
        return None
    top, left, bottom, right = box
    crop = plots.resize_image(image[top:bottom, left:right], CROP_SIDE)
    mask = plots.resize_mask(labels[top:bottom, left:right] == region, (crop.shape[1], crop.shape[0]))
    return plots.image_uri(plots.outline_region(crop, mask, colour))


def _holds(effects: pd.DataFrame | None, a: int, b: int, region: str) -> str:
    """'k of n (share)': A's images where filling the region (extract.region_fill) lowers the A − B margin
    (region_effects: the images the contrast averages over, A's correctly classified ones where it has any,
    among its ``extract.contrast_images`` sample)."""
    if effects is None:
        return "—"
    rows = effects[(effects["class_a"] == a) & (effects["class_b"] == b) & (effects["region"] == region)]
    if not len(rows):
        return "—"
    k = int((rows["margin_drop"] > 0).sum())
    return f"{k} of {len(rows)} ({k / len(rows):.0%})"


def _top_trait(rep: Report, m: MethodData, a: int, b: int, expected: set[str]) -> dict | None:
    """The pair's rank-1 region of ``m`` (contrasts, A vs B) with its q-value, support and crops of A and B."""
    rows = m.tables["contrasts"]
    rows = _ranked(rows[(rows["class_a"] == a) & (rows["class_b"] == b)], "rank_combined", "combined")
    if not len(rows):
        return None
    top = rows.iloc[0]
    name = str(top["region"])
    peaks = rep.peaks[m.name]
    colour = region_colour(rep.region_colours, name)
    crops = []
    for own, other in ((a, b), (b, a)):
        uri, image_id = None, None
        if rep.root is not None and name in peaks.vocab:
            image_id = _largest_region_image(peaks, _class_images(rep, m, own, other), peaks.vocab.index(name))
            uri = region_crop(rep, peaks, image_id, peaks.vocab.index(name), colour) if image_id is not None else None
        crops.append({"uri": uri, "image_id": image_id, "species": rep.name(own)})
    planted = top.get("planted")
    q = top.get("q_value")
    return {"method": method_label(m.name), "region": name, "colour": colour, "q": fmt(q),
            "significant": q is not None and pd.notna(q) and float(q) < 0.05, "n_images": fmt(top.get("n_images")),
            "holds": _holds(m.tables.get("region_effects"), a, b, name),
            "planted": bool(planted) if planted is not None and pd.notna(planted) else name in expected,
            "crop_a": crops[0], "crop_b": crops[1]}


def answer_section(rep: Report) -> dict:
    """The first screen: per look-alike pair and method, the top distinguishing region with its q-value,
    its support and a crop of it from an image of each species."""
    out, notes = [], []
    for m in rep.methods:
        if "contrasts" not in m.tables:
            notes.append(f"{method_label(m.name)}: contrasts.parquet not found; no distinguishing traits.")
    if rep.root is None:
        notes.append("No data set root: the crops are left out.")
    for p in _pairs(rep).to_dict("records"):
        a, b = int(p["class_a"]), int(p["class_b"])
        expected = {str(x) for x in _as_list(p.get("differing_parts"))}
        found = [_top_trait(rep, m, a, b, expected) for m in rep.methods if "contrasts" in m.tables]
        out.append({"a": rep.name(a), "b": rep.name(b), "anchor": f"answer-{a}-{b}",
                    "anchor_a": f"species-{a}", "anchor_b": f"species-{b}", "rows": [t for t in found if t]})
    if not out:
        notes.append("No look-alike pairs among the species shown.")
    return {"pairs": out, "notes": notes}


def _layout_groups(rep: Report) -> list[tuple[list[str], PeakRegions]]:
    """Methods sharing one region layout (discovered parts are each method's own; the others are shared)."""
    groups: dict[Any, tuple[list[str], PeakRegions]] = {}
    for m in rep.methods:
        peaks = rep.peaks[m.name]
        key = m.name if peaks.layout.mode == "discovered" else (peaks.layout.mode, tuple(peaks.vocab))
        groups.setdefault(key, ([], peaks))[0].append(m.name)
    return list(groups.values())


def _gallery_images(rep: Report, peaks: PeakRegions, region: int) -> list[tuple[int, int]]:
    """(image, species) of up to ``GALLERY_IMAGES`` exemplar images where the region is largest, one per species."""
    species_of = {i: c for c, ids in rep.exemplars.items() for i in ids}
    areas = peaks.areas(species_of)
    chosen, seen = [], set()
    for image_id, share in sorted(areas.items(), key=lambda kv: (-kv[1][region], kv[0])):
        if share[region] <= 0 or species_of[image_id] in seen:
            continue
        chosen.append((image_id, species_of[image_id]))
        seen.add(species_of[image_id])
        if len(chosen) == GALLERY_IMAGES:
            break
    return chosen


def region_highlight(rep: Report, peaks: PeakRegions, image_id: int, region: int, colour: str) -> str | None:
    """Data URI of a small image with one region outlined in its colour and the rest dimmed."""
    image = rep.images.get(image_id)
    if image is None:
        return None
    small = plots.thumbnail(image, GALLERY_SIDE)
    labels = peaks.labels_at(image_id, small.shape[:2])
    return plots.image_uri(plots.outline_region(small, labels == region, colour, dim=0.45))


def parts_gallery_section(rep: Report) -> dict:
    """Every region of each layout on a few exemplar images, so a user can name a discovered part."""
    out = []
    if rep.root is None:
        return {"layouts": [], "notes": ["No data set root: the parts gallery is left out."]}
    for names, peaks in _layout_groups(rep):
        rows = []
        for k, region in enumerate(peaks.vocab):
            colour = region_colour(rep.region_colours, region)
            thumbs = []
            for image_id, class_id in _gallery_images(rep, peaks, k):
                uri = region_highlight(rep, peaks, image_id, k, colour)
                if uri:
                    thumbs.append({"uri": uri, "image_id": image_id, "species": rep.name(class_id)})
            rows.append({"region": region, "colour": colour, "thumbs": thumbs})
        out.append({"methods": ", ".join(method_label(n) for n in names), "mode": peaks.layout.mode, "rows": rows})
    return {"layouts": out, "notes": []}


# --------------------------------------------------------------------------- sections: traits


def traits_section(rep: Report, gallery: int) -> dict:
    out = []
    notes = []
    for m in rep.methods:
        entry: dict[str, Any] = {"method": method_label(m.name), "umap": None, "traits": [], "galleries": [],
                                 "head_figure": None, "heads": []}
        if not m.has("traits", "trait_members"):
            notes.append(f"{method_label(m.name)}: traits.parquet or trait_members.parquet not found; "
                         f"its traits are left out.")
        else:
            traits = m.tables["traits"].sort_values("trait")
            members = m.tables["trait_members"]
            names = dict(zip(traits["trait"].astype(int), traits["name"].astype(str)))
            colours = plots.trait_colours(len(names))
            colour_of = {t: colours[i] for i, t in enumerate(names)}
            if {"umap_x", "umap_y"} <= set(members.columns) and len(members):
                entry["umap"] = plots.figure_uri(plots.umap_scatter(members, names, colours))
            by_member = members.set_index("member")
            for k, t in enumerate(traits.to_dict("records")):
                classes = _as_list(t.get("classes"))
                counts = _as_list(t.get("class_counts"))
                top = sorted(zip(counts, classes), reverse=True)[:4] if counts else [(None, c) for c in classes[:4]]
                row = {"trait": int(t["trait"]), "name": str(t["name"]),
                       "region": str(t.get("dominant_region", "")), "purity": fmt(t.get("purity")),
                       "size": fmt(t.get("size")), "colour": colour_of[int(t["trait"])],
                       "classes": [{"name": rep.name(c), "count": fmt(n) if n is not None else ""} for n, c in top],
                       "more_classes": max(len(classes) - 4, 0)}
                entry["traits"].append(row)
                if k >= MAX_TRAIT_GALLERIES or m.name not in rep.attention:
                    continue
                thumbs = []
                for member in _as_list(t.get("representatives"))[:gallery]:
                    if member not in by_member.index:
                        continue
                    mem = by_member.loc[member]
                    attn = rep.attention[m.name].head(mem["image_id"], mem["class_id"], mem["head"])
                    uri = rep.overlay(mem["image_id"], attn) if attn is not None else None
                    if uri:
                        thumbs.append({"uri": uri, "species": rep.name(mem["class_id"]), "head": int(mem["head"])})
                entry["galleries"].append({"name": row["name"], "colour": row["colour"], "thumbs": thumbs})
            if len(traits) > MAX_TRAIT_GALLERIES:
                notes.append(f"{method_label(m.name)}: galleries of the first {MAX_TRAIT_GALLERIES} of "
                             f"{len(traits)} traits shown.")
        if "head_types" in m.tables:
            ht = m.tables["head_types"].sort_values("head")
            if "profile" in ht and len(ht):
                profiles = np.stack(ht["profile"].to_numpy())
                vocab = m.head_regions if m.head_regions and len(m.head_regions) == profiles.shape[1] \
                    else [f"region {i}" for i in range(profiles.shape[1])]
                entry["head_figure"] = plots.figure_uri(plots.head_types_heatmap(
                    profiles, ht["head"].astype(int).tolist(), ht["head_type"].astype(int).tolist(), vocab))
            entry["heads"] = [{"head": int(r["head"]), "type": int(r["head_type"]),
                               "region": str(r.get("dominant_region", ""))} for r in ht.to_dict("records")]
        else:
            notes.append(f"{method_label(m.name)}: head_types.parquet not found; its head types are left out.")
        out.append(entry)
    return {"methods": out, "notes": notes}


# --------------------------------------------------------------------------- sections: comparison


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3:
        return float("nan")
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def comparison_section(rep: Report) -> dict | None:
    with_regions = [m for m in rep.methods if "regions" in m.tables]
    if len(with_regions) < 2:
        return None
    x, y = with_regions[0], with_regions[1]
    rx = x.tables["regions"][["class_id", "region", "density", "density_lo", "density_hi", "mass"]
                             if "density_lo" in x.tables["regions"] else ["class_id", "region", "density", "mass"]]
    ry = y.tables["regions"][rx.columns.intersection(y.tables["regions"].columns)]
    joined = rx.merge(ry, on=["class_id", "region"], suffixes=(f"_{x.name}", f"_{y.name}"))
    expected = planted_parts_by_class(rep.pairs)
    rows, agree, rhos = [], 0, []
    k = min(HEADS_PER_EXEMPLAR, rep.top_heads)
    for class_id in rep.species:
        part = joined[joined["class_id"] == class_id]
        if part.empty:
            continue
        tops = {}
        for m in (x, y):
            tops[m.name] = part.sort_values(f"density_{m.name}", ascending=False)["region"].head(3).astype(str).tolist()
        same = tops[x.name][:1] == tops[y.name][:1]
        agree += same
        rho = _spearman(part[f"density_{x.name}"].to_numpy(), part[f"density_{y.name}"].to_numpy())
        rhos.append(rho)
        frames = {}
        for m in (x, y):
            cols = [c for c in part.columns if c.endswith(f"_{m.name}")]
            frames[m.name] = part[["region", *cols]].rename(columns={c: c[: -len(m.name) - 1] for c in cols})
        chart = plots.figure_uri(plots.grouped_regions_chart(frames, title=rep.name(class_id), labels=METHOD_LABELS))
        same_image = []
        ex = rep.exemplars.get(class_id, [])
        if ex:
            thumb = rep.thumb(ex[0])
            if thumb:
                same_image.append({"label": "image", "uri": thumb})
                for m in (x, y):
                    if m.name in rep.attention:
                        _, maps = rep.attention[m.name].top(ex[0], class_id, k)
                        if len(maps):
                            same_image.append({"label": f"{method_label(m.name)} top-{len(maps)} mean",
                                               "uri": rep.overlay(ex[0], maps.mean(axis=0))})
        rows.append({"name": rep.name(class_id), "anchor": f"species-{class_id}",
                     "top_x": tops[x.name], "top_y": tops[y.name], "agree": bool(same), "rho": fmt(rho, 2),
                     "expected": sorted(expected.get(class_id, set())), "chart": chart, "same_image": same_image})
    scatter = plots.figure_uri(plots.agreement_scatter(joined, x.name, y.name, rep.region_colours,
                                                       labels=METHOD_LABELS)) \
        if len(joined) else None
    valid = [r for r in rhos if np.isfinite(r)]
    return {"x": method_label(x.name), "y": method_label(y.name), "rows": rows, "scatter": scatter,
            "agree": agree, "n": len(rows), "mean_rho": fmt(float(np.mean(valid)), 2) if valid else "—"}


# --------------------------------------------------------------------------- entry point


def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                              autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def build_report(tables: ReportTables, root: str | Path | None, config: Mapping[str, Any] | None,
                 out_html: str | Path, progress: bool = True) -> Path:
    """Write the self-contained HTML trait report.

    Args:
        tables: every table to read, by path (``ReportTables.under(results_dir, methods)``
            finds them at their documented places).
        root: the data set root; images are read from ``root / manifest.path``
            for the thumbnails (None or a missing folder: no thumbnails, noted).
        config: the workflow config (validated here, missing keys at their
            defaults); its ``report`` section sets ``max_species``, ``exemplars``
            and ``gallery``; it is shown in the report.
        out_html: the report file (parent folders are created; written atomically).
        progress: a progress bar on stderr.

    Returns:
        ``out_html`` as a Path.
    """
    started = time.perf_counter()
    config = validated(config)
    root_path = Path(root) if root is not None else None
    manifest_path = Path(tables.manifest)
    if not manifest_path.is_file():
        raise ReportError(f"{manifest_path}: no manifest (run `intr prepare` first)")
    if not tables.methods:
        raise ReportError("build_report: no methods given")
    manifest = io.load(manifest_path)
    for column in ("image_id", "path", "class_id", "class_name", "split"):
        if column not in manifest:
            raise ReportError(f"{manifest_path}: column {column!r} missing")
    parts = _read_optional(tables.parts)
    pairs = _read_optional(tables.lookalike_pairs)
    options = config["report"]
    extract = config["extract"]
    plots.setup()

    notes: list[str] = []
    loaded = []
    for method, method_tables in tables.methods.items():
        data = load_method(method, method_tables)
        if len(data.missing) == len(METHOD_TABLES) + 1:
            notes.append(f"{method_label(method)}: no tables under {data.folder}; left out of the report.")
            continue
        if data.missing:
            notes.append(f"{method_label(method)}: not found: {', '.join(data.missing)}.")
        loaded.append(data)
    if root_path is None or not root_path.is_dir():
        notes.append(f"data set root {root_path} not found: no thumbnails.")
        root_path = None

    classes = manifest[["class_id", "class_name"]].drop_duplicates("class_id").sort_values("class_id")
    names = dict(zip(classes["class_id"].astype(int), classes["class_name"].astype(str)))
    species = classes["class_id"].astype(int).tolist()[: options["max_species"]]
    exemplars = _choose_exemplars(loaded, manifest, species, options["exemplars"])
    peaks = {m.name: PeakRegions(manifest, region_layout(extract, parts, tables.methods[m.name]), root_path)
             for m in loaded}
    vocab = list(dict.fromkeys(v for p in peaks.values() for v in p.vocab))
    colours = plots.region_colours(vocab + sorted({str(r) for m in loaded if "regions" in m.tables
                                                   for r in m.tables["regions"]["region"].unique()} - set(vocab)))

    paths = dict(zip(manifest["image_id"].astype(int), manifest["path"].astype(str)))
    needed = _needed_images(species, exemplars, loaded, options["gallery"])
    attention = {}
    for m in loaded:
        if m.attention is not None:
            attention[m.name] = AttentionIndex(m.attention, needed[m.name])
            peaks[m.name].prepare({i for ids in exemplars.values() for i in ids}, m.grid)
    rep = Report(root=root_path, config=config, manifest=manifest, parts=parts, pairs=pairs,
                 methods=loaded, names=names, species=species, exemplars=exemplars,
                 images=ImageStore(root_path, paths), peaks=peaks, attention=attention, region_colours=colours,
                 top_heads=config["analysis"]["top_heads"], notes=notes)
    rep.side = thumbnail_side(_count_thumbs(len(species), options["exemplars"], loaded,
                                            min(HEADS_PER_EXEMPLAR, rep.top_heads), len(_pairs(rep)),
                                            options["gallery"]))
    genus = dict(zip(manifest["class_id"].astype(int), manifest["genus"])) if "genus" in manifest else {}
    rep.genus_of = {k: (str(v) if v is not None and pd.notna(v) else None) for k, v in genus.items()}

    context = {
        "title": f"Trait report: {config['dataset']['name']}",
        "answer": answer_section(rep),
        "parts_gallery": parts_gallery_section(rep),
        "summary": summary_section(rep),
        "atlas": atlas_section(rep, progress),
        "pairs": pairs_section(rep),
        "traits": traits_section(rep, options["gallery"]),
        "comparison": comparison_section(rep),
        "config_yaml": _config_text(config),
        "notes": notes,
        "discovered_regions": any(p.layout.mode == "discovered" for p in peaks.values()),
        "region_legend": [{"name": r, "colour": c} for r, c in colours.items()],
        "map_legend": plots.figure_uri(_colourbar_figure()),
        "generated": time.strftime("%Y-%m-%d %H:%M"),
    }
    if rep.images.missing:
        notes.append(f"{len(rep.images.missing)} image(s) not found under the data set root, "
                     f"e.g. {rep.images.missing[0]}.")
    html = _environment().get_template("report.html.j2").render(**context)
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    if progress:
        print(f"report: {out} ({out.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - started:.1f} s)",
              file=sys.stderr)
    return out


def _config_text(config: Mapping[str, Any]) -> str:
    """The config as YAML (as JSON when it holds values YAML cannot represent)."""
    try:
        return yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True, default_flow_style=False)
    except yaml.YAMLError:
        import json

        return json.dumps(config, indent=2, default=str)


def _colourbar_figure():
    """The two colour scales of the map overlays."""
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    fig, axes = plt.subplots(2, 1, figsize=(3.2, 0.9))
    for ax, cmap, norm, label in ((axes[0], plots.MAP_CMAP, colors.Normalize(0, 1), "attention (low → peak)"),
                                  (axes[1], plots.DIFF_CMAP, colors.Normalize(-1, 1),
                                   "difference: other class ← 0 → this class")):
        fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), cax=ax, orientation="horizontal")
        ax.set_xticks([])
        ax.set_title(label, fontsize=7)
    fig.subplots_adjust(hspace=1.6)
    return fig
