"""``intr extract``: every attention map of a trained model, into Parquet tables.

For each image of the evaluation split it writes (layouts in docs/tables.md):

* ``predictions.parquet``: label, prediction, top-5 ids and probabilities;
* ``attention.parquet``: the last layer's attention of the query rows of the
  true class, the predicted class (when it differs) and each look-alike
  class, per head, as ``fixed_size_list<float16>[grid_h * grid_w]``, with the
  head's rank for that class (greedy blurring, ``intr.ranking``);
* ``head_ranks.parquet``: the ranking itself, with the target probability
  after each head is blurred;
* ``pair_head_ranks.parquet``: for the true class A and each look-alike B,
  the heads ranked by blurring them in A's and B's rows together, by the
  A - B logit margin (``intr.ranking.rank_pair_heads_by_blurring``);
* ``region_effects.parquet``: for the true class A and each look-alike B, the
  drop of the logit margin A - B (and of A's probability) when one region
  (``analysis.regions``: a discovered part, a part mask, a disc around a part
  keypoint, or a grid cell) is filled (``extract.region_fill``: by default with
  B's mean colour of that region over the split's images, a pre-pass,
  ``intr.occlusion.LookalikeFill``, taken at each pixel's own place of the body
  where discovered parts give the images body frames; else by the
  ``extract.occlusion`` operator); all regions of a batch of images go through
  the model in batched passes;
* ``trait_features.parquet``: for the true class's ``top_heads`` top-ranked
  heads, the map-weighted mean of the backbone's final patch features;
* ``lookalikes.parquet``: the look-alike classes used (class_a, class_b,
  source = ``genus`` or ``confusion``).

Look-alikes: the other classes of the same genus when the manifest has a
``genus`` column; otherwise the ``siblings_k`` classes the model confuses a
class with most (summed softmax mass both ways on the split, a first pass).
A genus with more than ``siblings_k`` other species keeps the ``siblings_k``
of them the model confuses the class with most (source ``genus+confusion``).

One pass per batch: the network runs each batch once up to its last
attention layer (``model.trunk_of``, ``intr.models.Trunk``); the logits, the
maps, both head rankings (every ranked row of every image) and INTR's trait
features are computed from that pass, bit for bit what each gives alone.

Streaming: images are decoded per batch (nothing is preloaded) and every
batch's rows go straight to the Parquet writers, so memory does not grow with
the data set.  The files appear only when the whole split is done (written to
temporary names and renamed), so an interrupted run leaves no truncated table;
a rerun recomputes them, and gives the same bytes of data.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from analysis import regions as reg
from analysis import tables
from analysis.config import defaults
from analysis.contrasts import contrast_sample
from analysis.tables import ParquetStreamWriter, read_table
from intr import precision
from intr.data.images import ImageSet, read_split
from intr.models import Trunk, load_model, resolve_device
from intr.occlusion import LookalikeFill, LookalikeSums, Occlusion
from intr.ranking import rank_heads_by_blurring, rank_pair_heads_by_blurring

ROLE_TRUE, ROLE_PRED, ROLE_SIBLING = "true", "pred", "sibling"
TABLES = ("predictions", "attention", "head_ranks", "pair_head_ranks", "region_effects", "trait_features",
          "lookalikes")
# The tables of one query-map pass (the rest: region_effects, its own pass, which alone reads the regions).
MAP_TABLES = ("attention", "head_ranks", "trait_features")


def blur_images(images: torch.Tensor, sigma_fraction: float) -> torch.Tensor:
    """Gaussian blur with sigma = ``sigma_fraction`` x the image side (the ``blur`` occlusion's fill)."""
    return Occlusion("blur", sigma_fraction).fill(images)


# ----------------------------------------------------------------------------- look-alikes


def lookalikes_from_genus(manifest: pd.DataFrame) -> dict[int, list[int]] | None:
    """Other classes of the same genus, or None when the manifest has no genus."""
    if "genus" not in manifest.columns or manifest["genus"].isna().all():
        return None
    genus = manifest.drop_duplicates("class_id").set_index("class_id")["genus"]
    out = {}
    for cls, g in genus.items():
        out[int(cls)] = sorted(int(c) for c in genus.index[genus == g] if c != cls) if isinstance(g, str) else []
    return out


def lookalikes_from_confusion(probs: np.ndarray, labels: np.ndarray, num_classes: int, k: int) -> dict[int, list[int]]:
    """The ``k`` classes each class is confused with most (softmax mass, both directions)."""
    conf = np.zeros((num_classes, num_classes))
    np.add.at(conf, labels, probs)
    sym = conf + conf.T
    np.fill_diagonal(sym, -np.inf)
    order = np.argsort(-sym, axis=1, kind="stable")[:, :k]
    return {c: [int(j) for j in order[c]] for c in range(num_classes)}


# ----------------------------------------------------------------------------- regions


@dataclass
class RegionSource:
    """The configured regions (``analysis.regions.RegionLayout``) of this split's images."""

    layout: reg.RegionLayout
    rows: pd.DataFrame
    root: Path

    @classmethod
    def load(cls, mode: str, rows: pd.DataFrame, root: Path, parts: Path | None, discovered: Path | None,
             radius: float, cells: int) -> "RegionSource":
        """Regions of ``mode``: ``annotated`` reads ``parts`` (and the masks), ``discovered`` the learned maps.

        Args:
            mode: ``discovered``, ``annotated`` or ``grid``.
            rows: the split's manifest rows.
            root: the data set root (part masks).
            parts: ``parts.parquet`` (annotated mode; None: the grid).
            discovered: ``discovered_parts.parquet`` (discovered mode).
            radius, cells: the annotated rule's keypoint radius and grid size.
        """
        part_table = read_table(parts) if mode == "annotated" and parts is not None else None
        learned = reg.DiscoveredParts.read(discovered) if mode == "discovered" else None
        if mode == "discovered" and discovered is None:
            raise ValueError("regions: discovered needs --discovered-parts (the table of intr discover)")
        layout = reg.RegionLayout.build(mode, parts=part_table, discovered=learned, radius=radius, cells=cells)
        return cls(layout, rows, root)

    @property
    def vocab(self) -> list[str]:
        return self.layout.vocab

    def labels(self, index: np.ndarray, size: int) -> np.ndarray:
        """(B, size, size) label maps of rows ``index`` at the network's input size (one pass over
        the rows: a batch costs about what one image does)."""
        rows = self.rows.iloc[np.asarray(index, dtype=np.int64)]
        return np.stack([m for _, m in reg.iter_label_maps(self.layout, rows, (size, size), self.root)])

    def cells(self, index: np.ndarray, size: int) -> torch.Tensor | None:
        """(B, size, size) long body-frame cells of rows ``index`` for the pair fill's places
        (``LookalikeFill``), -1 for an image without a frame; None where no image has one (annotated
        parts, the grid, patch units)."""
        parts = self.layout.discovered
        if parts is None:
            return None
        ids = self.rows["image_id"].to_numpy()[np.asarray(index, dtype=np.int64)].tolist()
        cells = parts.frame_cells(ids, size, LookalikeFill.PLACE_BINS)
        return None if cells is None else torch.as_tensor(cells).long()


# ----------------------------------------------------------------------------- extraction


class IndexedImages(torch.utils.data.Dataset):
    """An ``ImageSet`` whose items also carry their row: (image, class, row)."""

    def __init__(self, data: ImageSet) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        image, label = self.data[i]
        return image, label, i


def _query_classes(labels: np.ndarray, preds: np.ndarray, looks: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(B, R) query class ids and (B, R) roles (0 true, 1 pred, 2 sibling, -1 padding)."""
    rows, roles = [], []
    for y, p in zip(labels.tolist(), preds.tolist()):
        cls, role = [y], [0]
        if p != y:
            cls.append(p)
            role.append(1)
        for s in looks.get(y, []):
            if s not in cls:
                cls.append(s)
                role.append(2)
        rows.append(cls)
        roles.append(role)
    width = max(len(r) for r in rows)
    out = np.array([r + [r[0]] * (width - len(r)) for r in rows], dtype=np.int64)
    role_arr = np.array([r + [-1] * (width - len(r)) for r in roles], dtype=np.int64)
    return out, role_arr


@torch.no_grad()
def region_effects(model, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
                    masks: list[np.ndarray], siblings: list[list[int]], vocab: list[str],
                    occlusion: Occlusion, chunk: int, lookalike: LookalikeFill | None = None,
                    cells: torch.Tensor | None = None, ranked: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Margin and probability drops when each region is occluded, for a batch of images.

    Args:
        model: the classifier (``images -> logits``).
        images: (B, C, S, S) normalised images.
        labels: (B,) true classes A.
        logits: (B, num_classes) the model's logits on ``images``.
        masks: per image, its (regions, S, S) region masks (``analysis.regions.region_masks``).
        siblings: per image, its look-alike classes B.
        vocab: region names, indexed as the masks' first axis.
        occlusion: what an occluded region becomes (``intr.occlusion``), where ``lookalike`` is None.
        chunk: occluded images per forward pass.
        lookalike: the pair fill (``intr.occlusion.LookalikeFill``): each region is filled once per
            look-alike B, with B's colour of it, and scored on that B's margin alone.
        cells: (B, S, S) the images' body-frame cells for the pair fill's places (None: no frames).
        ranked: (regions,) bool, the regions that are ranked (``RegionLayout.ranked``); the others
            (background: not a trait) get no rows and cost no pass (None: every region).
    """
    owner, region_ids, comp = [], [], []
    for b, m in enumerate(masks):
        if not siblings[b]:
            continue
        present = m.reshape(m.shape[0], -1).any(1)
        present = np.flatnonzero(present if ranked is None else present & ranked)
        owner += [b] * len(present)
        region_ids += present.tolist()
        comp.append(torch.from_numpy(m[present]))
    if not owner:
        return {}
    region_masks = torch.cat(comp).to(images.device, images.dtype).unsqueeze(1)  # (M, 1, S, S)
    # One row per (region occurrence j, look-alike B).
    occurrence = np.array([j for j, b in enumerate(owner) for _ in siblings[b]])
    class_b = np.array([s for b in owner for s in siblings[b]])
    image = np.asarray(owner)[occurrence]
    dev = images.device
    image_t, occ_t, b_t = (torch.as_tensor(v, device=dev) for v in (image, occurrence, class_b))
    if lookalike is None:
        # One occluded image per occurrence serves every B; a fill that does not depend on the mask is
        # computed once per image (blur: the published figures' bytes).
        owner_t = torch.as_tensor(owner, device=images.device)
        fill = None if occlusion.fill_depends_on_mask else occlusion.fill(images)
        out_logits = []
        for s in range(0, len(owner), chunk):
            o, m = owner_t[s:s + chunk], region_masks[s:s + chunk]
            occluded = occlusion(images[o], m) if fill is None else images[o] * (1 - m) + fill[o] * m
            out_logits.append(model(occluded).float())
        occluded_logits = torch.cat(out_logits)[occ_t]
    else:
        region_t = torch.as_tensor(region_ids, device=dev)[occ_t]
        cells = None if cells is None else cells.to(dev)
        out_logits = []
        for s in range(0, len(image), chunk):
            sl = slice(s, s + chunk)
            placed = None if cells is None else cells[image_t[sl]]
            occluded = lookalike(images[image_t[sl]], region_masks[occ_t[sl]], b_t[sl], region_t[sl], placed)
            out_logits.append(model(occluded).float())
        occluded_logits = torch.cat(out_logits)  # (rows, C)
    base = logits.float()
    a_t = labels[image_t]
    rows = torch.arange(len(image), device=dev)
    margin = base[image_t, a_t] - base[image_t, b_t]
    margin_occluded = occluded_logits[rows, a_t] - occluded_logits[rows, b_t]
    prob_a = base.softmax(1)[image_t, a_t]
    prob_a_occluded = occluded_logits.softmax(1)[rows, a_t]
    area = region_masks.flatten(1).mean(1).cpu().numpy()[occurrence]
    return {"image": image, "class_b": class_b, "region": np.asarray(vocab, dtype=object)[np.asarray(region_ids)[occurrence]],
            "area": area, "margin": margin.cpu().numpy(), "margin_drop": (margin - margin_occluded).cpu().numpy(),
            "prob_a_drop": (prob_a - prob_a_occluded).cpu().numpy()}


EXTRACT = defaults("extract")  # the config schema's defaults
REGION_FILLS = ("lookalike", "occlusion")


@torch.no_grad()
def lookalike_colours(loader: DataLoader, regions: RegionSource, size: int, num_classes: int,
                      device: torch.device, progress: bool = True) -> LookalikeFill:
    """The pair fill of a split: every class's mean colour of every region (and of every place of the body
    where the regions have body frames), over the split's images.

    Args:
        loader: the split's images (``IndexedImages``: image, class, row).
        regions: the split's configured regions.
        size: the network input side (the label maps' size).
        num_classes: classes of the model.
        device: where the sums are kept.
        progress: progress bar.
    """
    sums = None
    for images, labels, index in tqdm(loader, desc="region colours", disable=not progress, leave=False):
        maps = torch.as_tensor(regions.labels(index.numpy(), size))
        cells = regions.cells(index.numpy(), size)
        if sums is None:
            sums = LookalikeSums(num_classes, len(regions.vocab), images.shape[1], device)
        sums.add(images.to(device), maps.to(device), labels.to(device), None if cells is None else cells.to(device))
    if sums is None:
        return LookalikeFill(torch.zeros(num_classes, len(regions.vocab), 3))
    return sums.fill()


def extract(model_path: str | Path, manifest: str | Path, root: str | Path, out_dir: str | Path,
            split: str = EXTRACT["split"], batch_size: int = EXTRACT["batch_size"],
            top_heads: int = EXTRACT["top_heads"], siblings_k: int = EXTRACT["siblings_k"],
            regions: str = EXTRACT["regions"], parts: str | Path | None = None,
            discovered_parts: str | Path | None = None,
            region_radius: float = EXTRACT["region_radius"], region_cells: int = EXTRACT["region_cells"],
            blur_sigma: float = EXTRACT["blur_sigma"], occlusion: str = EXTRACT["occlusion"],
            region_fill: str = EXTRACT["region_fill"], contrast_images: int = EXTRACT["contrast_images"],
            device: str = EXTRACT["device"], workers: int = 0, amp: bool = True, limit: int | None = None,
            only: Sequence[str] | None = None,
            progress: bool = True) -> dict[str, Path]:
    """Write the extraction tables of one trained model into ``out_dir``.

    Args:
        model_path: ``model.pt`` from ``intr train``.
        manifest: ``manifest.parquet``.
        root: data set root.
        out_dir: folder for the tables (usually the method's results folder).
        split: the split to extract.
        batch_size: images per forward pass.
        top_heads: true-class heads per image whose features go to trait_features.
        siblings_k: look-alikes per class when the data has no genus.
        regions: the regions of the region effects: ``discovered``, ``annotated`` or ``grid``.
        parts: ``parts.parquet`` (read only with ``regions: annotated``; None: grid cells).
        discovered_parts: ``discovered_parts.parquet`` (``regions: discovered``).
        region_radius, region_cells: the annotated rule's settings (``analysis.regions``).
        blur_sigma: the ``blur`` operator's sigma, as a fraction of the image side.
        occlusion: what an occluded region becomes: an operator of ``intr.occlusion.OPERATORS``.
        region_fill: what a region becomes in the region effects: ``lookalike`` (look-alike B's mean
            colour of it, at each pixel's place of the body where the regions have body frames,
            ``intr.occlusion.LookalikeFill``) or ``occlusion`` (the ``occlusion`` operator).
        contrast_images: region effects only for each class's seeded sample of this many images
            (``analysis.contrasts.contrast_sample``; 0: all), the images the contrasts average over.
        device: ``auto``, ``cpu`` or ``cuda``.
        workers: image-decoding processes.
        amp: bf16 autocast on CUDA (and on CPU with INTR_CPU_BF16=1: ``intr.precision``).
        limit: only the first ``limit`` images of the split (for benchmarks).
        only: which of ``TABLES`` to write (None: all). The workflow writes ``region_effects`` in a
            job of its own, beside the others' job: the two share no pass, so two cores run them side
            by side; only ``region_effects`` reads the regions (and their colour pre-pass).
        progress: progress bar.

    Returns:
        table name -> written path.
    """
    wanted = tuple(TABLES if only is None else only)
    unknown = sorted(set(wanted) - set(TABLES))
    if unknown or not wanted:
        raise ValueError(f"extract tables must be some of {', '.join(TABLES)}; got {', '.join(wanted) or 'none'}")
    dev = resolve_device(device)
    model, config = load_model(model_path, map_location="cpu", manifest=manifest)  # refuses other classes
    model.to(dev).eval()
    method, size = config["method"], int(config["image_size"])
    mean, std = config["normalization"]["mean"], config["normalization"]["std"]
    full = pd.read_parquet(manifest)
    rows = read_split(manifest, split)
    if limit:
        rows = rows.iloc[:limit].reset_index(drop=True)
    data = ImageSet(root, rows, size, mean, std, preload=False)
    loader = DataLoader(IndexedImages(data), batch_size=batch_size, shuffle=False, num_workers=workers)
    autocast = lambda: precision.autocast(dev, amp)  # noqa: E731
    num_classes = int(config["num_classes"])

    looks = lookalikes_from_genus(full)
    source = "genus"
    if looks is None or max(map(len, looks.values()), default=0) > siblings_k:
        # No genus, or genera larger than siblings_k: the classes the model confuses most
        # (within the genus where there is one).
        probs, labels = [], []
        with torch.no_grad():
            for images, y, _ in tqdm(loader, desc=f"{method} confusion", disable=not progress, leave=False):
                with autocast():
                    probs.append(model(images.to(dev)).float().softmax(1).cpu().numpy())
                labels.append(y.numpy())
        confused = lookalikes_from_confusion(np.concatenate(probs), np.concatenate(labels), num_classes,
                                             num_classes - 1)
        if looks is None:
            source = "confusion"
            looks = {c: order[:siblings_k] for c, order in confused.items()}
        else:
            source = "genus+confusion"
            looks = {c: sib if len(sib) <= siblings_k else [j for j in confused[c] if j in sib][:siblings_k]
                     for c, sib in looks.items()}

    effects = "region_effects" in wanted
    if region_fill not in REGION_FILLS:
        raise ValueError(f"extract.region_fill must be one of {REGION_FILLS}, got {region_fill!r}")
    # The images the pair contrasts average over (a seeded sample per class): the only ones filled.
    sampled = contrast_sample(rows["image_id"].to_numpy(np.int64), rows["class_id"].to_numpy(np.int64),
                              contrast_images)
    regions = RegionSource.load(regions, rows, Path(root), Path(parts) if parts else None,
                                Path(discovered_parts) if discovered_parts else None, region_radius,
                                region_cells) if effects else None
    feature_dim = int(model.patch_feature_dim)
    grid = tuple(int(g) for g in model.grid_size)
    cells = grid[0] * grid[1]
    heads = int(model.num_heads)
    top = min(top_heads, heads)
    if top_heads > heads:  # the config could not tell (a backbone whose heads its name does not say)
        print(f"intr extract: warning: extract.top_heads {top_heads} is more than the {heads} heads of "
              f"{model_path}; trait features use all {heads} (set extract.top_heads to at most {heads})",
              file=sys.stderr)
    meta = {"method": method, "backbone": config["model"]["backbone"]["name"], "grid_h": grid[0],
            "grid_w": grid[1], "patch_size": size // grid[0], "image_size": size, "num_heads": heads,
            "split": split, "num_classes": num_classes, "lookalike_source": source,
            "model": str(model_path)}
    schemas = {name: tables.schema(name, cells=cells, feature_dim=feature_dim) for name in wanted}
    extra = {"trait_features": {"feature_dim": feature_dim, "top_heads": top},
             "region_effects": {"regions": regions.vocab, "region_mode": regions.layout.mode, "blur_sigma": blur_sigma,
                                "occlusion": occlusion, "region_fill": region_fill,
                                "region_radius": region_radius, "region_cells": region_cells,
                                "contrast_images": contrast_images} if effects else {}}
    lookalike = (lookalike_colours(loader, regions, size, num_classes, dev, progress)
                 if effects and region_fill == "lookalike" else None)
    run = BatchSettings(model, rows, looks, regions, size, top, Occlusion(occlusion, blur_sigma), autocast,
                        lookalike, sampled)
    with TableWriters(Path(out_dir), schemas, {name: {**meta, **extra.get(name, {})} for name in wanted}) as writers:
        if writers.wants("lookalikes"):
            pairs = [(a, b) for a in sorted(looks) for b in looks[a]]
            writers.write("lookalikes", {"class_a": [a for a, _ in pairs], "class_b": [b for _, b in pairs],
                                         "source": [source] * len(pairs)})
        answered: set[int] = set()  # classes with a correctly classified image among the sampled ones
        if set(wanted) - {"lookalikes"}:
            if set(wanted) - {"lookalikes", "region_effects"} or sampled.all():
                batches = loader
            else:  # region effects alone: the sampled images are the only ones they read
                batches = DataLoader(torch.utils.data.Subset(IndexedImages(data), np.flatnonzero(sampled).tolist()),
                                     batch_size=batch_size, shuffle=False, num_workers=workers)
            desc = f"{method} {'+'.join(sorted(set(wanted) - {'lookalikes'}))}"
            for images, labels, index in tqdm(batches, desc=desc, disable=not progress):
                answered |= _extract_batch(run, writers, images.to(dev), labels.to(dev), index.numpy())
        # The contrasts of a class the model never gets right (in its sample) use all of its sampled
        # images (analysis.pipeline.images_by_class): their region effects come from a second pass.
        unanswered = np.flatnonzero(sampled & rows["class_id"].map(
            lambda c: bool(looks.get(int(c))) and int(c) not in answered).to_numpy(bool))
        if effects and len(unanswered):
            again = DataLoader(torch.utils.data.Subset(IndexedImages(data), unanswered.tolist()),
                               batch_size=batch_size, shuffle=False, num_workers=workers)
            for images, labels, index in tqdm(again, desc=f"{method} region effects, classes never right",
                                              disable=not progress, leave=False):
                images, labels = images.to(dev), labels.to(dev)
                with autocast():
                    logits = model(images).float()
                _write_region_effects(run, writers, images, labels, logits, index.numpy(), correct_only=False)
    paths = writers.paths
    return paths


class TableWriters:
    """One atomic Parquet writer per extraction table; ``write(name, columns)`` appends rows.

    Args:
        out_dir: folder of the tables.
        schemas: table name -> Arrow schema (``analysis.tables.schema``).
        metadata: table name -> key-value metadata of that file.
    """

    def __init__(self, out_dir: Path, schemas: dict[str, pa.Schema], metadata: dict[str, dict]) -> None:
        self.paths = {name: out_dir / f"{name}.parquet" for name in schemas}
        self._writers = {name: ParquetStreamWriter(self.paths[name], schema, metadata[name])
                         for name, schema in schemas.items()}

    def wants(self, name: str) -> bool:
        """Whether this run writes table ``name``."""
        return name in self._writers

    def write(self, name: str, columns: dict[str, Any]) -> None:
        writer = self._writers[name]
        writer.write(tables.table_from_columns(writer.schema, columns))

    def __enter__(self) -> "TableWriters":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for writer in self._writers.values():
            writer.__exit__(exc_type, exc, tb)


@dataclass
class BatchSettings:
    """What every batch of an extraction shares."""

    model: torch.nn.Module
    rows: pd.DataFrame
    lookalikes: dict[int, list[int]]
    regions: RegionSource | None  # None: no region effects in this run
    image_size: int
    top_heads: int
    occlusion: Occlusion
    autocast: Callable[[], Any]
    lookalike: LookalikeFill | None = None  # the region effects' pair fill (None: the occlusion operator)
    sampled: np.ndarray | None = None  # (rows,) bool: the images the contrasts average over (None: all)

    def is_sampled(self, index: np.ndarray) -> np.ndarray:
        """(len(index),) bool: which of the split's rows ``index`` are in the contrasts' sample."""
        return self.sampled[index] if self.sampled is not None else np.ones(len(index), dtype=bool)


def prediction_columns(image_ids: np.ndarray, labels: torch.Tensor, logits: torch.Tensor) -> dict[str, Any]:
    """predictions.parquet rows of a batch: label, prediction, top-5 (padded with -1 below 5 classes)."""
    probs = logits.softmax(1)
    k5 = min(5, logits.shape[1])
    top5 = probs.topk(k5, dim=1)
    ids5 = np.full((len(image_ids), 5), -1, dtype=np.int64)
    p5 = np.zeros((len(image_ids), 5), dtype=np.float32)
    ids5[:, :k5] = top5.indices.cpu().numpy()
    p5[:, :k5] = top5.values.cpu().numpy()
    y, pred = labels.cpu().numpy(), logits.argmax(1).cpu().numpy()
    return {"image_id": image_ids, "label": y, "pred": pred, "correct": y == pred,
            "prob_true": probs.gather(1, labels.view(-1, 1)).squeeze(1).cpu().numpy(),
            "top5_ids": ids5, "top5_probs": p5}


def attention_columns(image_ids: np.ndarray, query: np.ndarray, role: np.ndarray, maps: np.ndarray,
                      rank: np.ndarray) -> dict[str, Any]:
    """attention.parquet rows: one per (query row, head); ``maps`` (M, H, cells), ``rank`` (M, H)."""
    m, heads = rank.shape
    role_names = np.array([ROLE_TRUE, ROLE_PRED, ROLE_SIBLING])
    return {"image_id": np.repeat(image_ids, heads), "query_class": np.repeat(query, heads),
            "query_role": role_names[np.repeat(role, heads)].tolist(), "head": np.tile(np.arange(heads), m),
            "head_rank": rank.reshape(-1), "attn": maps.reshape(m * heads, -1).astype(np.float16)}


def head_rank_columns(image_ids: np.ndarray, query: np.ndarray, rank: np.ndarray,
                      prob_after_blur: np.ndarray) -> dict[str, Any]:
    """head_ranks.parquet rows: one per (query row, head)."""
    m, heads = rank.shape
    return {"image_id": np.repeat(image_ids, heads), "class_id": np.repeat(query, heads),
            "head": np.tile(np.arange(heads), m), "rank": rank.reshape(-1),
            "prob_after_blur": prob_after_blur.reshape(-1)}


def pair_head_rank_columns(image_ids: np.ndarray, class_a: np.ndarray, class_b: np.ndarray, rank: np.ndarray,
                           margin_after_blur: np.ndarray) -> dict[str, Any]:
    """pair_head_ranks.parquet rows: one per (image, look-alike B, head); ``rank`` and margins (P, H) per pair."""
    pairs, heads = rank.shape
    return {"image_id": np.repeat(image_ids, heads), "class_a": np.repeat(class_a, heads),
            "class_b": np.repeat(class_b, heads), "head": np.tile(np.arange(heads), pairs),
            "rank": rank.reshape(-1), "margin_after_blur": margin_after_blur.reshape(-1)}


@torch.no_grad()
def rank_lookalike_pairs(model, trunk: Trunk, labels: torch.Tensor, siblings: list[list[int]],
                         autocast) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Pair head ranking of every (image, look-alike B of its class A) of a batch.

    Args:
        trunk: the batch's ``model.trunk_of(images)``; labels: (B,) class A of each image.
        siblings: per image, its class's look-alikes (images without any are skipped).

    Returns:
        (image, class_b, rank, margin_after_blur): per pair its image's position in the batch,
        B, and (P, H) ranks and margins; None when no image has a look-alike.
    """
    has = [b for b, sib in enumerate(siblings) if sib]
    if not has:
        return None
    width = max(len(siblings[b]) for b in has)
    # Images with fewer look-alikes repeat their first one; the repeats are dropped below.
    padded = np.array([siblings[b] + [siblings[b][0]] * (width - len(siblings[b])) for b in has], dtype=np.int64)
    real = np.array([[j < len(siblings[b]) for j in range(width)] for b in has])
    index = torch.as_tensor(has, device=labels.device)
    with autocast():
        ranking = rank_pair_heads_by_blurring(model, None, labels[index], torch.as_tensor(padded, device=labels.device),
                                              trunk=trunk.select(index))
    rank = ranking.rank.cpu().numpy()[real]  # (P, H)
    margins = ranking.margin_after_blur.float().cpu().numpy()[real]
    image = np.repeat(np.asarray(has), width).reshape(len(has), width)[real]
    return image, padded[real], rank, margins


def trait_feature_columns(model, images: torch.Tensor, trunk: Trunk, image_ids: np.ndarray, labels: np.ndarray,
                          true_maps: torch.Tensor, true_rank: torch.Tensor, top: int, autocast) -> dict[str, Any]:
    """trait_features.parquet rows: the true class's ``top`` top-ranked heads' map-weighted patch features.

    Args:
        images: (B, 3, H, W); trunk: their ``model.trunk_of`` (it holds INTR's patch features).
        true_maps: (B, H, cells) the true class's maps; true_rank: (B, H) their ranks.
    """
    chosen = true_rank.argsort(dim=1)[:, :top]  # heads with rank 1..top
    with autocast():
        feats = model.patch_features(images, trunk=trunk).float()  # (B, cells, D)
    m = true_maps / true_maps.sum(-1, keepdim=True).clamp_min(1e-12)
    sel = torch.gather(m, 1, chosen.unsqueeze(-1).expand(-1, -1, m.shape[-1]))  # (B, top, cells)
    pooled = sel @ feats  # (B, top, D)
    b = len(image_ids)
    return {"image_id": np.repeat(image_ids, top), "class_id": np.repeat(labels, top),
            "head": chosen.cpu().numpy().reshape(-1), "rank": torch.gather(true_rank, 1, chosen).cpu().numpy().reshape(-1),
            "feature": pooled.cpu().numpy().reshape(b * top, -1).astype(np.float16)}


@torch.no_grad()
def _extract_batch(run: BatchSettings, writers: TableWriters, images: torch.Tensor, labels: torch.Tensor,
                   index: np.ndarray) -> set[int]:
    """Every table's rows for one batch of images (rows ``index`` of the split); returns the classes
    of its correctly classified images among the sampled ones (``BatchSettings.sampled``)."""
    model, autocast = run.model, run.autocast
    image_ids = run.rows["image_id"].to_numpy()[index].astype(np.int64)
    with autocast():
        trunk = model.trunk_of(images)  # one pass up to the last layer serves every table of the batch
        logits = model.logits_of(trunk).float()
    y, pred = labels.cpu().numpy(), logits.argmax(1).cpu().numpy()
    if writers.wants("predictions"):
        writers.write("predictions", prediction_columns(image_ids, labels, logits))
    if any(writers.wants(name) for name in MAP_TABLES):
        _write_map_tables(run, writers, images, trunk, y, pred, image_ids)
    if writers.wants("pair_head_ranks"):
        # Pair head ranks: each head blurred in A's and B's rows together, ranked by the A - B margin.
        siblings = [run.lookalikes.get(int(c), []) for c in y]
        pairs = rank_lookalike_pairs(model, trunk, labels, siblings, autocast)
        if pairs is not None:
            image, class_b, pair_rank, margins = pairs
            writers.write("pair_head_ranks", pair_head_rank_columns(image_ids[image], y[image], class_b, pair_rank,
                                                                    margins))
    if writers.wants("region_effects"):
        _write_region_effects(run, writers, images, labels, logits, index, correct_only=True)
    return set(y[(y == pred) & run.is_sampled(index)].tolist())


def _write_map_tables(run: BatchSettings, writers: TableWriters, images: torch.Tensor, trunk: Trunk, y: np.ndarray,
                      pred: np.ndarray, image_ids: np.ndarray) -> None:
    """attention, head_ranks and trait_features rows of a batch (maps and ranking from its ``trunk``)."""
    model, autocast = run.model, run.autocast

    # Maps of every query row, then the ranking of each real (not padding) row.
    classes, roles = _query_classes(y, pred, run.lookalikes)
    classes_t = torch.as_tensor(classes, device=images.device)
    with autocast():
        _, maps = model.forward_with_maps(None, classes_t, trunk=trunk)
    maps = maps.float().flatten(3)  # (B, R, H, cells)
    bi, ri = np.nonzero(roles >= 0)
    with autocast():
        ranking = rank_heads_by_blurring(model, None, classes_t[bi, ri],
                                         trunk=trunk.select(torch.as_tensor(bi, device=images.device)))
    rank = ranking.rank.cpu().numpy()  # (M, H)
    if writers.wants("attention"):
        writers.write("attention", attention_columns(image_ids[bi], classes[bi, ri], roles[bi, ri],
                                                     maps[bi, ri].cpu().numpy(), rank))
    if writers.wants("head_ranks"):
        writers.write("head_ranks", head_rank_columns(image_ids[bi], classes[bi, ri], rank,
                                                      ranking.prob_after_blur.float().cpu().numpy()))
    if writers.wants("trait_features"):
        true_rows = np.flatnonzero(ri == 0)  # row 0 of every image is its true class, in image order
        true_rank = torch.as_tensor(rank[true_rows], device=images.device)
        writers.write("trait_features", trait_feature_columns(model, images, trunk, image_ids, y, maps[:, 0],
                                                              true_rank, run.top_heads, autocast))


def _write_region_effects(run: BatchSettings, writers: TableWriters, images: torch.Tensor, labels: torch.Tensor,
                          logits: torch.Tensor, index: np.ndarray, correct_only: bool) -> None:
    """region_effects rows of a batch: every ranked region of its images, filled, in batched passes.

    Only the sampled images (``BatchSettings.sampled``), and among them the ones the model classifies
    correctly when ``correct_only``: the contrasts use no other image of a class that has one
    (``analysis.pipeline.images_by_class``), so the others would cost passes for nothing.
    """
    image_ids = run.rows["image_id"].to_numpy()[index].astype(np.int64)
    y, pred = labels.cpu().numpy(), logits.argmax(1).cpu().numpy()
    siblings = [run.lookalikes.get(int(c), []) if keep and (ok or not correct_only) else []
                for c, ok, keep in zip(y, y == pred, run.is_sampled(index))]
    if not any(siblings):
        return
    masks = [reg.region_masks(m, len(run.regions.vocab)) for m in run.regions.labels(index, run.image_size)]
    cells = run.regions.cells(index, run.image_size) if run.lookalike is not None else None
    with run.autocast():
        eff = region_effects(run.model, images, labels, logits, masks, siblings, run.regions.vocab, run.occlusion,
                             chunk=max(1, images.shape[0]) * 4, lookalike=run.lookalike, cells=cells,
                             ranked=run.regions.layout.ranked)
    if eff:
        owner = eff["image"].astype(np.int64)
        writers.write("region_effects", {
            "image_id": image_ids[owner], "class_a": y[owner], "class_b": eff["class_b"],
            "region": eff["region"].tolist(), "area": eff["area"], "margin": eff["margin"],
            "margin_drop": eff["margin_drop"], "prob_a_drop": eff["prob_a_drop"]})
