"""``intr faithfulness``: insertion/deletion AUC of the model's maps and of CAM baselines.

The protocol is RISE's (Petsiuk et al., BMVC 2018), the one Prompt-CAM's
Table 1 reports:

* a heat map is brought to the input resolution (bilinear upsampling for a
  patch-grid map; the CAMs of the ``grad-cam`` package already come at input
  resolution) and the input's pixels are ranked by it, highest first (ties
  keep raster order);
* the blurred image is the input under a Gaussian blur of
  ``sigma = blur_sigma * image size`` (reflect padding, applied to the
  normalised tensor, which equals blurring the pixels since normalisation is
  per-channel affine);
* **deletion** starts from the image and replaces the top-ranked pixels by the
  blurred image's pixels, **insertion** starts from the blurred image and puts
  the top-ranked original pixels back, in ``steps`` equal steps (fractions
  0, 1/steps, ..., 1 of the pixels; all channels of a pixel together);
* the curve is the softmax probability of the **true** class under the model
  **being explained**: for the model's own map (mean over the true class's
  ``top_heads`` top-ranked heads, greedy blurring ranking) that is the model
  itself; for Grad-CAM, Layer-CAM, Eigen-CAM and attention rollout it is the
  linear probe on the same frozen backbone (``intr.baselines``), since that
  is the classifier the CAMs explain.  Each method is thus scored against
  its own classifier, as in the paper's comparison;
* AUC is the trapezoid integral of the curve over the fraction of pixels,
  in [0, 1].  Higher insertion and lower deletion mean a more faithful map.

Other occlusion operators (``extract.occlusion``, ``intr.occlusion``) add rows
``insertion_auc_<operator>`` / ``deletion_auc_<operator>`` beside the blur
protocol's, which stays the reported one (the papers' figures): deletion fills
each step's removed pixels with the operator (for ``background_fill`` from
that step's kept pixels), insertion starts from the image with every pixel
removed (the operator's fill of the whole image).

Every method explains the true class (not the predicted one), as the model's
map does; Eigen-CAM and rollout are class-agnostic by construction.

The model's maps and head ranks are not recomputed here: they are read from
the ``attention.parquet`` that ``intr extract`` wrote for the same model and
split (float16 maps; the mean of a few of them moves the curves by float16
rounding only).  The CAMs and rollout are other methods and need the network.

Outputs: ``baseline_maps.parquet`` (one row per image and method; the map on
the patch grid, non-negative, summing to 1; CAMs average-pooled from input
resolution) and ``metrics_faithfulness.parquet`` (``evaluation.parquet``
layout: ``insertion_auc`` and ``deletion_auc`` per method with a bootstrap
95 % interval over images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from analysis import io, tables
from analysis.config import defaults
from analysis.stats import metric_row
from analysis.tables import ParquetStreamWriter, write_table
from intr.baselines import (CAM_METHODS, attention_rollout, backbone_vit, cam_maps, fit_linear_probe, load_linear_probe,
                            pool_to_grid)
from intr.data.images import ImageSet, read_split
from intr.models import load_model, resolve_device
from intr.occlusion import Occlusion, gaussian_blur  # noqa: F401  (gaussian_blur: the RISE blur, imported from here too)

BASELINE_METHODS = (*CAM_METHODS, "rollout")


# --------------------------------------------------------------------------- the RISE protocol


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw) maps -> (B, H, W), bilinear (half-pixel centres, as an image resize)."""
    return F.interpolate(maps.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False).squeeze(1)


def pixel_counts(pixels: int, steps: int) -> torch.Tensor:
    """Pixels changed at each of the ``steps + 1`` points: round(k * pixels / steps)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.round(torch.arange(steps + 1, dtype=torch.float64) * pixels / steps).long()


def true_class_probability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the true class ``target`` (B,) under ``logits`` (B, C), in float32."""
    return logits.float().softmax(-1).gather(1, target.view(-1, 1)).squeeze(1)


@torch.no_grad()
def insertion_deletion_curves(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                              blurred: torch.Tensor, saliency: torch.Tensor, target: torch.Tensor,
                              steps: int = 32, chunk: int = 256, occlusion: Occlusion | None = None,
                              ends: tuple[torch.Tensor, torch.Tensor] | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Insertion and deletion curves, (B, steps + 1) each, of one heat map per image.

    Args:
        predict: ``images -> logits`` of the model being explained.
        images: (B, C, H, W) inputs (normalised as the model expects).
        blurred: (B, C, H, W) what deleted pixels become / insertion starts from.
        saliency: (B, H, W) heat maps at input resolution (higher = more important).
        target: (B,) the class whose probability is traced.
        steps: number of equal steps from 0 to all pixels.
        chunk: composite images per forward pass (several images' steps, both
            curves, go into one pass).
        occlusion: an operator whose fill depends on the removed pixels
            (``background_fill``): deleted pixels become its fill for that step's
            mask; ``blurred`` is then the image with every pixel removed.  None:
            deleted pixels become ``blurred``'s (every mask-independent operator).
        ends: optional (B,) probabilities of ``target`` on the image and on the image with every
            pixel removed (``blurred``), from the same ``predict``: the curves' ends, which no heat
            map changes, are then taken from them instead of being passed through the model again
            (``curve_ends``; several maps of one image share them).

    Point k of a curve has the ``round(k H W / steps)`` top-ranked pixels
    changed: inserted from the image into the blurred one (insertion) or
    replaced by the blurred pixels (deletion).  Point 0 of deletion and the
    last point of insertion are the image itself; the other ends are the
    blurred image.
    """
    B, _, H, W = images.shape
    if saliency.shape != (B, H, W):
        raise ValueError(f"saliency must be {(B, H, W)}, got {tuple(saliency.shape)}")
    device = images.device
    n_pix = H * W
    order = saliency.reshape(B, n_pix).float().argsort(dim=1, descending=True, stable=True)
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(n_pix, device=device).expand(B, -1))
    counts = pixel_counts(n_pix, steps).to(device)
    points = steps + 1
    insertion = torch.empty(B, points, device=device)
    deletion = torch.empty(B, points, device=device)
    if ends is None:
        first, inner = 0, points  # every point through the model
    else:
        p_image, p_removed = (e.to(device, torch.float32) for e in ends)
        insertion[:, 0], insertion[:, -1] = p_removed, p_image
        deletion[:, 0], deletion[:, -1] = p_image, p_removed
        first, inner = 1, points - 2  # the points between the ends
    todo = B * inner
    per_pass = max(1, chunk // 2)
    for start in range(0, todo, per_pass):
        idx = torch.arange(start, min(start + per_pass, todo), device=device)
        b, k = idx // inner, idx % inner + first
        changed = (position[b] < counts[k].unsqueeze(1)).view(-1, 1, H, W)
        inserted = torch.where(changed, images[b], blurred[b])
        if occlusion is None:
            deleted = torch.where(changed, blurred[b], images[b])
        else:
            deleted = occlusion(images[b], changed)
        p = true_class_probability(predict(torch.cat([inserted, deleted])), torch.cat([target[b], target[b]]))
        insertion[b, k] = p[:len(idx)]
        deletion[b, k] = p[len(idx):]
    return insertion, deletion


@torch.no_grad()
def curve_ends(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
               removed: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The ends of every insertion/deletion curve of these images under ``predict``, whatever the heat map:
    per protocol, the (B,) probabilities of ``target`` on the images and on ``removed[protocol]`` (every
    pixel removed), in one pass."""
    names = list(removed)
    p = true_class_probability(predict(torch.cat([images, *removed.values()])), target.repeat(len(names) + 1))
    p = p.view(len(names) + 1, len(images))
    return {name: (p[0], p[i + 1]) for i, name in enumerate(names)}


def curve_auc(curves: torch.Tensor, pixels: int | None = None) -> torch.Tensor:
    """Trapezoid area (B,) under (B, steps + 1) curves over the fraction of pixels in [0, 1].

    With ``pixels`` given the x positions are the exact fractions
    ``round(k pixels / steps) / pixels``; otherwise ``k / steps``.
    """
    steps = curves.shape[1] - 1
    if pixels is None:
        x = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    else:
        x = pixel_counts(pixels, steps).double() / pixels
    return torch.trapezoid(curves.double().cpu(), x, dim=1)


# --------------------------------------------------------------------------- maps


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw) -> non-negative maps summing to 1 (uniform where a map is all zero)."""
    m = maps.float().clamp_min(0).flatten(1)
    total = m.sum(1, keepdim=True)
    uniform = torch.full_like(m, 1.0 / m.shape[1])
    return torch.where(total > 0, m / total.clamp_min(1e-30), uniform).view_as(maps)


def top_heads_maps_from_attention(attention: str | Path, top_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's map of every image in an extracted attention table.

    The map is the mean of the true class's ``top_heads`` top-ranked heads
    (``head_rank`` 1..top_heads of the rows with ``query_role == "true"``;
    docs/tables.md), the stored float16 maps averaged in float32.

    Args:
        attention: ``attention.parquet`` from ``intr extract``.
        top_heads: heads per map, clamped to 1..num_heads.

    Returns:
        ``(image_ids (N,) ascending, maps (N, grid_h, grid_w) float32)``.
    """
    k = max(1, min(int(top_heads), int(io.metadata(attention)["num_heads"])))
    keys, maps = io.maps(attention, query_role="true", head_rank=list(range(1, k + 1)))
    order = np.argsort(keys["image_id"].to_numpy(), kind="stable")
    ids = keys["image_id"].to_numpy()[order]
    if len(ids) % k or (ids.reshape(-1, k) != ids.reshape(-1, k)[:, :1]).any():
        raise ValueError(f"{attention}: every image needs one true-class row for each rank 1..{k}")
    return ids[::k].astype(np.int64), maps[order].reshape(-1, k, *maps.shape[1:]).mean(1)


# --------------------------------------------------------------------------- the stage


def _sample_extracted_rows(split_rows: pd.DataFrame, extracted_ids: np.ndarray, images: int,
                           seed: int) -> pd.DataFrame:
    """A seeded sample of ``images`` split rows (0: all) among those the attention table holds, by image_id."""
    rows = split_rows[split_rows["image_id"].isin(extracted_ids)]
    if rows.empty:
        raise ValueError("the attention table holds no image of the split")
    if images and images < len(rows):
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=images, replace=False))
        rows = rows.iloc[keep]
    return rows.sort_values("image_id").reset_index(drop=True)


def _patch_size(model, image_size: int, grid: tuple[int, int]) -> int:
    vit = backbone_vit(model)
    if vit is not None:
        return int(vit.patch_embed.patch_size[0])
    return int(round(image_size / grid[1]))


def _check_attention_table(attention: str | Path, method: str, split: str, grid: tuple[int, int]) -> None:
    """Refuse an attention table of another method, split or patch grid than the model's."""
    meta = io.metadata(attention)
    found = (meta.get("method"), meta.get("split"), (int(meta["grid_h"]), int(meta["grid_w"])))
    if found != (method, split, grid):
        raise ValueError(f"{attention} holds (method, split, grid) {found}, "
                         f"but faithfulness runs {(method, split, grid)}")


EXTRACT = defaults("extract")  # the config schema's defaults
CURVES = ("insertion_auc", "deletion_auc")


def occlusion_protocols(occlusion: str, blur_sigma: float) -> dict[str, Occlusion]:
    """Metric-name suffix -> operator: always the published blur (no suffix), and ``occlusion`` beside it.

    Args:
        occlusion: the configured operator (``intr.occlusion.OPERATORS``).
        blur_sigma: the blur's sigma as a fraction of the image side.
    """
    protocols = {"": Occlusion("blur", blur_sigma)}
    if occlusion != "blur":
        protocols[f"_{occlusion}"] = Occlusion(occlusion, blur_sigma)
    return protocols


def run_faithfulness(model_path: str | Path, manifest: str | Path, root: str | Path, out_maps: str | Path,
                     out_metrics: str | Path, attention: str | Path, split: str = EXTRACT["split"],
                     top_heads: int = EXTRACT["top_heads"], images: int = EXTRACT["faithfulness_images"],
                     steps: int = EXTRACT["faithfulness_steps"], blur_sigma: float = EXTRACT["blur_sigma"],
                     occlusion: str = EXTRACT["occlusion"], batch_size: int = EXTRACT["batch_size"], device: str = EXTRACT["device"], seed: int = 0,
                     probe: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Write ``baseline_maps.parquet`` and ``metrics_faithfulness.parquet``; return the metric rows.

    Args:
        model_path: ``model.pt`` from ``intr train`` (Prompt-CAM or INTR).
        manifest: ``manifest.parquet``.
        root: the data set root.
        out_maps: ``baseline_maps.parquet`` to write.
        out_metrics: ``metrics_faithfulness.parquet`` to write.
        attention: ``attention.parquet`` that ``intr extract`` wrote for this model and split;
            the model's maps and head ranks are read from it.
        split: the evaluation split.
        top_heads: how many of the true class's top-ranked heads make the model's map.
        images: images sampled with a seeded RNG (0: all) from the split's images that the
            attention table holds, sorted by image_id.
        steps: insertion/deletion steps.
        blur_sigma: the blur's sigma as a fraction of the image side.
        occlusion: an operator of ``intr.occlusion.OPERATORS``; other than ``blur`` it adds
            ``insertion_auc_<occlusion>`` and ``deletion_auc_<occlusion>`` rows (the same curves
            with that operator removing the pixels) beside the blur protocol's.
        batch_size: images per batch (curve forward passes take up to 4x as many composites).
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: sampling seed.
        probe: ``linear_probe.pt`` that ``intr evaluate`` fitted for this model (the same fit); None:
            fitted here, on train+val.
        progress: progress bar.

    All methods explain the true class.  The model's curves use the model's
    probability, the baselines' curves the linear probe's (the classifier the
    CAMs and rollout are computed on); see the module docstring.
    """
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model, config = load_model(model_path, map_location="cpu", manifest=manifest)  # refuses other classes
    model.to(dev).eval()
    method, size = config["method"], int(config["image_size"])
    mean, std = config["normalization"]["mean"], config["normalization"]["std"]
    grid = tuple(int(g) for g in model.grid_size)
    _check_attention_table(attention, method, split, grid)
    extracted_ids, extracted_maps = top_heads_maps_from_attention(attention, top_heads)
    rows = _sample_extracted_rows(read_split(manifest, split), extracted_ids, int(images), seed)
    data = ImageSet(root, rows, size, mean, std)
    if probe is not None:
        probe = load_linear_probe(model, probe, model_path, dev)  # refuses a probe of another model.pt
    else:
        probe = fit_linear_probe(model, ImageSet(root, read_split(manifest, ["train", "val"]), size, mean, std),
                                 int(config["num_classes"]), dev)

    vit = backbone_vit(model)
    methods = [method, *CAM_METHODS] + (["rollout"] if vit is not None else [])
    metadata = {"method": method, "backbone": config["model"]["backbone"]["name"], "grid_h": grid[0],
                "grid_w": grid[1], "patch_size": _patch_size(model, size, grid), "image_size": size,
                "num_heads": int(model.num_heads), "split": split, "top_heads": int(top_heads),
                "explained_class": "true_class", "methods": methods}
    protocols = occlusion_protocols(occlusion, blur_sigma)
    aucs = {(m, c + suffix): [] for suffix in protocols for m in methods for c in CURVES}
    correct = {"model": [], "linear_probe": []}
    # (p(image), p(everything removed)) of each curve model, per protocol
    ends = {suffix: {"model": [], "linear_probe": []} for suffix in protocols}
    model_predict = lambda x: model(x)  # noqa: E731
    probe_predict = lambda x: probe(x)  # noqa: E731

    with ParquetStreamWriter(out_maps, tables.schema("baseline_maps", cells=grid[0] * grid[1]), metadata) as writer:
        for start in tqdm(range(0, len(data), batch_size), desc=f"faithfulness {method}",
                          disable=not progress, leave=False):
            idx = range(start, min(start + batch_size, len(data)))
            batch = torch.stack([data[i][0] for i in idx]).to(dev)
            target = data.labels[start:start + len(idx)].to(dev)
            ids = data.image_ids[start:start + len(idx)].numpy().astype(np.int32)
            removed_all = {suffix: occ.fill(batch) for suffix, occ in protocols.items()}
            with torch.no_grad():
                correct["model"].append((model(batch).argmax(1) == target).cpu())
                correct["linear_probe"].append((probe(batch).argmax(1) == target).cpu())

            extracted = extracted_maps[np.searchsorted(extracted_ids, ids)]
            grid_maps = {method: torch.from_numpy(extracted).to(dev)}
            saliency = {method: upsample(grid_maps[method], (size, size))}
            cams = cam_maps(probe, batch, target)
            for name in CAM_METHODS:
                saliency[name] = torch.from_numpy(cams[name]).to(dev)
                grid_maps[name] = pool_to_grid(saliency[name], grid)
            if vit is not None:
                grid_maps["rollout"] = attention_rollout(vit, batch)
                saliency["rollout"] = upsample(grid_maps["rollout"], (size, size))

            curve_end = {predict: curve_ends(predict, batch, removed_all, target)
                         for predict in (model_predict, probe_predict)}
            for name in methods:
                predict = model_predict if name == method else probe_predict
                for suffix, occ in protocols.items():
                    ins, dele = insertion_deletion_curves(
                        predict, batch, removed_all[suffix], saliency[name], target, steps, chunk=4 * batch_size,
                        occlusion=occ if occ.fill_depends_on_mask else None, ends=curve_end[predict][suffix])
                    aucs[(name, "insertion_auc" + suffix)].append(curve_auc(ins, size * size))
                    aucs[(name, "deletion_auc" + suffix)].append(curve_auc(dele, size * size))
                    if name in (method, CAM_METHODS[0]):
                        ends[suffix]["model" if name == method else "linear_probe"].append(ins[:, [-1, 0]].cpu())
                flat = normalise_maps(grid_maps[name]).flatten(1).cpu().numpy().astype(np.float16)
                writer.write(tables.table_from_columns(writer.schema, {
                    "image_id": ids, "method": [name] * len(ids),
                    "class_id": target.cpu().numpy().astype(np.int16), "attn": flat}))

    metrics = [metric_row(m, c + suffix, split, torch.cat(aucs[(m, c + suffix)]).numpy())
               for suffix in protocols for m in methods for c in CURVES]
    table = pd.DataFrame(metrics)
    accuracy = {k: float(torch.cat(v).float().mean()) for k, v in correct.items()}
    ends_mean = {suffix: {k: torch.cat(v).mean(0).tolist() for k, v in by_model.items()}
                 for suffix, by_model in ends.items()}
    write_table(table, out_metrics, metadata={
        "method": method, "model": str(model_path), "attention": str(attention), "split": split,
        "images": len(data),
        "steps": int(steps), "blur_sigma": float(blur_sigma), "occlusion": occlusion, "top_heads": int(top_heads),
        "explained_class": "true_class", "curve_model": {method: method, **{b: "linear_probe" for b in methods[1:]}},
        "top1_on_these_images": accuracy,
        "mean_prob_image": {k: v[0] for k, v in ends_mean[""].items()},
        "mean_prob_blurred": {k: v[1] for k, v in ends_mean[""].items()},
        **({f"mean_prob_removed_{occlusion}": {k: v[1] for k, v in ends_mean[f"_{occlusion}"].items()}}
           if occlusion != "blur" else {})})
    return table
