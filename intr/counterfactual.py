"""``intr counterfactual``: does the model use the part that tells two look-alikes apart?

Synthetic data only.  Every correctly classified image of species A (evaluation
split, at most ``images_per_pair`` per look-alike pair) is re-rendered by the
generator itself (:func:`intr.data.synthetic.render_counterfactual`) with the
same nuisance and some parts' states replaced, for each look-alike B:

* ``planted``: one part in which A and B differ, set to B's state ("A with B's beak");
* ``all_planted``: every differing part at once, which is B's own render of that nuisance;
* ``control``: one part A and B share, set to a state of that part from another genus
  (:func:`intr.data.synthetic.control_state`).

Writes ``counterfactuals.parquet``: one row per (image, B, changed part, kind) with
the logit margin A - B before and after, and the predicted class after; and, where
asked, ``counterfactual_examples.parquet``: the renders themselves (PNG) of the first
image of each directed pair (original, each planted swap, all planted parts where
there are several), which the report shows beside the ranked regions (the report
cannot render: it never imports torch or the generator).  The scores live in
:mod:`analysis.counterfactual`.
"""

from __future__ import annotations

import io
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

from analysis.config import defaults
from analysis.tables import schema, write_table
from intr.data.images import load_image, read_split
from intr.data.synthetic import (
    PARTS,
    Nuisance,
    PartState,
    Species,
    SyntheticConfig,
    build_taxonomy,
    control_state,
    image_nuisance,
    render_counterfactual,
)
from intr.models import load_model, resolve_device

COUNTERFACTUAL = defaults("counterfactual")  # the config schema's defaults
EXTRACT = defaults("extract")


def synthetic_config(root: str | Path, fallback: Mapping[str, Any] | None = None) -> SyntheticConfig:
    """The generator config that rendered ``root``: its ``synthetic_config.yaml``, else ``fallback``.

    Args:
        root: the data set root written by ``intr synthesize``.
        fallback: the workflow config's ``synthetic`` section, for a root without the file.
    """
    path = Path(root) / "synthetic_config.yaml"
    if path.exists():
        options = yaml.safe_load(path.read_text())
    elif fallback is not None:
        options = dict(fallback)
    else:
        raise ValueError(f"{path} is missing: counterfactuals need the synthetic data's generator config")
    return SyntheticConfig.from_dict(options)


def image_index(path: str) -> int:
    """The 0-based index within its class of a synthetic image (``{species}_{NNNN}.png``)."""
    match = re.search(r"_(\d+)\.png$", path)
    if match is None:
        raise ValueError(f"{path} is not a synthetic image name ({{species}}_NNNN.png)")
    return int(match.group(1)) - 1


@dataclass(frozen=True)
class Swap:
    """One counterfactual row before it is scored: which image, which pair, what changed."""

    image_id: int
    class_a: int
    class_b: int
    part: str
    kind: str
    state: str
    render: int  # index of its render among the unique renders


class Scorer:
    """The model's logits for uint8 renders, batched, normalised as in training."""

    def __init__(self, model_path: Path, manifest: Path, device: str, batch_size: int) -> None:
        self.device = resolve_device(device)
        model, config = load_model(model_path, map_location="cpu", manifest=manifest)
        self.model = model.to(self.device).eval()
        self.method = config["method"]
        self.size = int(config["image_size"])
        self.mean = torch.tensor(config["normalization"]["mean"]).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(config["normalization"]["std"]).view(1, 3, 1, 1) * 255
        self.batch_size = batch_size

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        if image.shape[0] != self.size:  # the loader's resize (load_image)
            image = np.asarray(Image.fromarray(image).resize((self.size, self.size), Image.BILINEAR))
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)

    @torch.no_grad()
    def logits(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Logits (N, classes) float32 of uint8 (H, W, 3) images."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self._tensor(im) for im in images[start:start + self.batch_size]]).float()
            batch = (batch - self.mean) / self.std
            out.append(self.model(batch.to(self.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _planned_swaps(a: Species, b: Species, taxonomy: Sequence[Species]) -> list[tuple[str, str, dict[str, PartState]]]:
    """(part, kind, new states) of every counterfactual of A against look-alike B."""
    differing = a.differing_parts(b)
    swaps = [(part, "planted", {part: b.states[part]}) for part in differing]
    swaps.append((";".join(differing), "all_planted", {part: b.states[part] for part in differing}))
    for part in PARTS:
        state = None if part in differing else control_state(taxonomy, a, part)
        if state is not None:
            swaps.append((part, "control", {part: state}))
    return swaps


def _state_label(states: Mapping[str, PartState]) -> str:
    return ";".join(states[p].label for p in PARTS if p in states)


def _correct_images(scorer: Scorer, rows: pd.DataFrame, species: Species, class_index: int, class_id: int,
                    config: SyntheticConfig, root: Path, cap: int) -> list[tuple[int, Nuisance, np.ndarray]]:
    """Up to ``cap`` correctly classified images of one class: (image_id, nuisance, logits), in image order.

    Each original is re-rendered and must equal the stored image (else the root was not rendered by
    ``config``), so the counterfactuals differ from what the model was evaluated on only by the swap.
    """
    kept: list[tuple[int, Nuisance, np.ndarray]] = []
    for start in range(0, len(rows), cap):
        chunk = rows.iloc[start:start + cap]
        nuisances = [image_nuisance(config, class_index, image_index(p)) for p in chunk["path"]]
        renders = [render_counterfactual(species, nz, config.image_size, {})[0] for nz in nuisances]
        for path, image in zip(chunk["path"], renders):
            under_images = root / "images" / path  # the manifest's paths as ImageSet reads them
            file = under_images if under_images.exists() else root / path
            stored = load_image(file, config.image_size).permute(1, 2, 0).numpy()
            if not np.array_equal(stored, image):
                raise ValueError(f"{path}: the re-rendered image differs from the stored one; the data set root "
                                 f"was not rendered by its synthetic config")
        logits = scorer.logits(renders)
        for image_id, nz, row in zip(chunk["image_id"], nuisances, logits):
            if int(row.argmax()) == class_id and len(kept) < cap:
                kept.append((int(image_id), nz, row))
        if len(kept) >= cap:
            break
    return kept


def _classes(rows: pd.DataFrame, taxonomy: Sequence[Species]) -> dict[int, int]:
    """Manifest class_id -> index of its species in the generator's taxonomy (matched by name)."""
    index = {sp.name: k for k, sp in enumerate(taxonomy)}
    names = rows.drop_duplicates("class_id").set_index("class_id")["class_name"]
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise ValueError(f"class {unknown[0]!r} is not a species of the synthetic config; counterfactuals "
                         f"need the generator's own data set")
    return {int(c): index[name] for c, name in names.items()}


def png_bytes(image: np.ndarray) -> bytes:
    """PNG file bytes of an (H, W, 3) uint8 image (lossless: the report shows the render as scored)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def example_renders(swaps: Sequence[Swap], jobs: Sequence[tuple[Species, Nuisance, dict[str, PartState]]],
                    table: pd.DataFrame, image_size: int) -> pd.DataFrame:
    """``counterfactual_examples`` rows: the first image of each directed pair, rendered again.

    Per pair: the original (``kind`` ``original``, margin before, prediction A), each planted
    swap, and the all-planted render where the pair differs in more than one part (with one
    part it is the planted swap again); margin and prediction are those after the change.

    Args:
        swaps: the stage's swaps, in ``table`` order.
        jobs: (species A, nuisance, new states) of each unique render.
        table: the counterfactual rows (margins and predictions).
        image_size: the generator's image side.
    """
    first: dict[tuple[int, int], int] = {}
    for swap in swaps:
        first.setdefault((swap.class_a, swap.class_b), swap.image_id)
    planted_parts = Counter((s.image_id, s.class_a, s.class_b) for s in swaps if s.kind == "planted")
    rows: list[dict] = []
    shown: set[tuple[int, int]] = set()
    for k, swap in enumerate(swaps):
        pair = (swap.class_a, swap.class_b)
        several = planted_parts[(swap.image_id, *pair)] > 1
        if first[pair] != swap.image_id or not (swap.kind == "planted" or (swap.kind == "all_planted" and several)):
            continue
        species, nuisance, states = jobs[swap.render]
        if pair not in shown:
            shown.add(pair)
            original = render_counterfactual(species, nuisance, image_size, {})[0]
            rows.append({"image_id": swap.image_id, "class_a": swap.class_a, "class_b": swap.class_b,
                         "part": "", "kind": "original", "margin": table.at[k, "margin_before"],
                         "pred": swap.class_a, "png": png_bytes(original)})
        render = render_counterfactual(species, nuisance, image_size, states)[0]
        rows.append({"image_id": swap.image_id, "class_a": swap.class_a, "class_b": swap.class_b,
                     "part": swap.part, "kind": swap.kind, "margin": table.at[k, "margin_after"],
                     "pred": table.at[k, "pred_after"], "png": png_bytes(render)})
    return pd.DataFrame(rows, columns=[c.name for c in schema("counterfactual_examples")])


def run_counterfactuals(model_path: str | Path, manifest: str | Path, root: str | Path, out: str | Path,
                        images_per_pair: int = COUNTERFACTUAL["images_per_pair"],
                        split: str = EXTRACT["split"], batch_size: int = EXTRACT["batch_size"],
                        device: str = EXTRACT["device"],
                        synthetic: Mapping[str, Any] | None = None,
                        examples_out: str | Path | None = None) -> pd.DataFrame:
    """Write ``counterfactuals.parquet`` for one trained model on synthetic data; return it.

    Args:
        model_path: ``model.pt`` from ``intr train``.
        manifest: ``manifest.parquet`` of the synthetic data set.
        root: the data set root (its ``synthetic_config.yaml`` says how it was rendered).
        out: the table to write.
        images_per_pair: correctly classified images of A per look-alike pair (A, B).
        split: the split whose images are changed.
        batch_size: images per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        synthetic: the workflow config's ``synthetic`` section, used only where the root has no
            ``synthetic_config.yaml``.
        examples_out: ``counterfactual_examples.parquet`` to write (``example_renders``); None: none.
    """
    started = time.perf_counter()
    root = Path(root)
    config = synthetic_config(root, synthetic)
    taxonomy = build_taxonomy(config)
    rows = read_split(manifest, split)
    classes = _classes(rows, taxonomy)
    by_taxon = {k: c for c, k in classes.items()}
    scorer = Scorer(Path(model_path), Path(manifest), device, batch_size)

    swaps: list[Swap] = []
    renders: dict[tuple, int] = {}  # a control render serves every B of the image
    jobs: list[tuple[Species, Nuisance, dict[str, PartState]]] = []
    before: dict[int, np.ndarray] = {}
    for class_a, k in sorted(classes.items()):
        a = taxonomy[k]
        looks = [by_taxon[j] for j, b in enumerate(taxonomy)
                 if j != k and j in by_taxon and b.genus.name == a.genus.name]
        if not looks:
            continue
        for image_id, nuisance, logits in _correct_images(scorer, rows[rows["class_id"] == class_a], a, k, class_a,
                                                          config, root, images_per_pair):
            before[image_id] = logits
            for class_b in looks:
                for part, kind, states in _planned_swaps(a, taxonomy[classes[class_b]], taxonomy):
                    key = (image_id, tuple(sorted(states.items())))
                    if key not in renders:
                        renders[key] = len(jobs)
                        jobs.append((a, nuisance, states))
                    swaps.append(Swap(image_id, class_a, class_b, part, kind, _state_label(states), renders[key]))

    after = np.concatenate([scorer.logits([render_counterfactual(sp, nz, config.image_size, st)[0]
                                           for sp, nz, st in jobs[start:start + batch_size]])
                            for start in range(0, len(jobs), batch_size)]) if jobs else np.zeros((0, 0))
    table = pd.DataFrame({
        "image_id": [s.image_id for s in swaps],
        "class_a": [s.class_a for s in swaps],
        "class_b": [s.class_b for s in swaps],
        "part": [s.part for s in swaps],
        "kind": [s.kind for s in swaps],
        "state": [s.state for s in swaps],
        "margin_before": [before[s.image_id][s.class_a] - before[s.image_id][s.class_b] for s in swaps],
        "margin_after": [after[s.render][s.class_a] - after[s.render][s.class_b] for s in swaps],
        "pred_after": [int(after[s.render].argmax()) for s in swaps],
    })
    write_table(table, out, schema=schema("counterfactuals"), metadata={"method": scorer.method, "model": str(model_path), "split": split,
                                      "images_per_pair": images_per_pair, "renders": len(jobs),
                                      "seconds": round(time.perf_counter() - started, 2)})
    if examples_out is not None:
        write_table(example_renders(swaps, jobs, table, config.image_size), examples_out,
                    schema=schema("counterfactual_examples"), metadata={"method": scorer.method, "split": split})
    return table
