"""``intr discover``: a part vocabulary learned from the images and a trained model, without any part label.

The network half of part discovery: for each image, the backbone's patch
features (``patch_features``) and the class attention of the model's
``top_classes`` predicted classes (``forward_with_maps``), reduced to one
saliency per patch.  The clustering (``analysis.part_discovery``) is fitted on
a seeded sample of ``fit_images`` training images and assigns every image of
``split``.  Reads the manifest and the images only: never parts.parquet,
masks, boxes or planted traits (species labels are not read either: the
predicted classes stand in for them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis import part_discovery as pdisc
from intr.data.images import ImageSet, read_split
from intr.models import load_model, resolve_device

DISCOVERY_METHOD = "attention_voted_kmeans"


@torch.no_grad()
def patch_descriptors(model, data: ImageSet, top_classes: int, batch_size: int,
                      device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, G, D) float32, saliency (N, G) float64) of every image of ``data``.

    Args:
        model: an ``InterpretableModel``.
        data: the images.
        top_classes: predicted classes whose attention maps make the saliency.
        batch_size: images per forward pass.
        device: where the model runs.
    """
    features, saliency = [], []
    top = min(top_classes, model.num_classes)
    for start in range(0, len(data), batch_size):
        images = torch.stack([data[i][0] for i in range(start, min(len(data), start + batch_size))]).to(device)
        classes = model(images).topk(top, dim=1).indices
        _, maps = model.forward_with_maps(images, classes)
        saliency.append(pdisc.attention_saliency(maps.flatten(3).float().cpu().numpy()))
        features.append(model.patch_features(images).float().cpu().numpy())
    return np.concatenate(features), np.concatenate(saliency)


def pixel_inputs(model, data: ImageSet, batch_size: int, device: torch.device,
                 mean, std) -> tuple[np.ndarray, np.ndarray]:
    """(rgb (N, 3, H, W) in 0-1, gradient (N, 3, H, W)) of every image (``units: aligned``).

    The gradient is of the top predicted class's logit w.r.t. the normalised input.

    Args:
        model: an ``InterpretableModel``.
        data: the images.
        batch_size: images per pass.
        device: where the model runs.
        mean: per-channel mean of the normalisation (0-1 scale).
        std: per-channel std of the normalisation.
    """
    rgb, gradient = [], []
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    for start in range(0, len(data), batch_size):
        images = torch.stack([data[i][0] for i in range(start, min(len(data), start + batch_size))]).to(device)
        x = images.clone().requires_grad_(True)
        logits = model(x)
        (grad,) = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), x)
        gradient.append(grad.float().cpu().numpy())
        rgb.append((images * s + m).clamp(0, 1).float().cpu().numpy())
    return np.concatenate(rgb), np.concatenate(gradient)


def fit_sample(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A seeded sample of ``n`` rows (all when n is 0 or at least the row count), in image_id order."""
    if n <= 0 or n >= len(rows):
        return rows
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
    return rows.iloc[pick].reset_index(drop=True)


def discover_parts(model_path: str | Path, manifest: str | Path, root: str | Path, out: str | Path,
                   split: str = "test", fit_split: str = "train", fit_images: int = 600, k: int | str = "auto",
                   k_range: tuple[int, int] | list[int] = pdisc.K_RANGE, top_classes: int = 3,
                   foreground_clusters: int = 12, batch_size: int = 64,
                   device: str = "auto", seed: int = 0, units: str = "aligned", colour_tolerance: float = 0.1,
                   foreground_share: float = 0.2) -> Path:
    """Fit the part vocabulary on training images and write every ``split`` image's part labels.

    Args:
        model_path: ``model.pt`` from ``intr train``.
        manifest: ``manifest.parquet`` (image_id, path, split; class names to check the model).
        root: the data set root.
        out: ``discovered_parts.parquet`` to write.
        split: split whose images get label maps.
        fit_split: split the vocabulary is fitted on.
        fit_images: images of ``fit_split`` sampled for the fit (0: all).
        k: number of parts (background comes on top), or ``auto``: chosen on the fit
            sample by ``analysis.part_discovery.choose_part_count`` (no labels).
        k_range: [min, max] k tried by ``auto``.
        top_classes: predicted classes whose attention votes the foreground.
        foreground_clusters: clusters of the foreground stage.
        batch_size: images per forward pass.
        device: auto, cpu or cuda.
        seed: seed of the sample and of k-means.
        units: ``patches`` (patch clusters, label maps on the patch grid) or ``aligned`` (places in
            each bird's body frame at pixel resolution, label maps at up to 32 x 32 cells).
        colour_tolerance: ``aligned``: colour step that ends a segment.
        foreground_share: ``aligned``: fraction of each image's pixels the foreground is drawn from.
    """
    if units == "aligned":
        return discover_aligned_parts(model_path, manifest, root, out, split, fit_split, fit_images, k, k_range,
                                      colour_tolerance, foreground_share, batch_size, device, seed)
    dev = resolve_device(device)
    model, config = load_model(model_path, manifest=manifest)  # refuses other classes
    model.to(dev)
    size, norm = config["image_size"], config["normalization"]
    fit_rows = fit_sample(read_split(manifest, fit_split), fit_images, seed)
    fit_features, fit_saliency = patch_descriptors(
        model, ImageSet(root, fit_rows, size, norm["mean"], norm["std"], preload=False), top_classes, batch_size, dev)
    choice = None
    if k == "auto":
        choice = pdisc.choose_part_count(fit_features, fit_saliency, model.grid_size, tuple(k_range),
                                         foreground_clusters=foreground_clusters, seed=seed)
        k = choice.k
    vocabulary = pdisc.fit_part_vocabulary(fit_features, fit_saliency, model.grid_size, int(k),
                                           foreground_clusters=foreground_clusters, seed=seed)
    rows = read_split(manifest, split)
    labels = []
    for start in range(0, len(rows), 1024):  # assign in chunks so memory does not grow with the split
        chunk = rows.iloc[start:start + 1024].reset_index(drop=True)
        features, saliency = patch_descriptors(
            model, ImageSet(root, chunk, size, norm["mean"], norm["std"], preload=False), top_classes, batch_size, dev)
        labels.append(pdisc.assign_parts(vocabulary, features, saliency))
    gh, gw = model.grid_size
    metadata = {"grid_h": gh, "grid_w": gw, "k": int(k), "method": config["method"], "discovery": DISCOVERY_METHOD,
                "split": split, "fit_images": len(fit_rows),
                **(choice.metadata() if choice is not None else {"k_criterion": "fixed"})}
    return pdisc.write_discovered_parts(out, rows["image_id"].to_numpy(), np.concatenate(labels), None, metadata)


PIXEL_GRID_LIMIT = 32  # label-map cells per side for ``units: aligned``: finer than a patch, cheap to score


def discover_aligned_parts(model_path, manifest, root, out, split: str, fit_split: str, fit_images: int,
                           k: int | str, k_range, tolerance: float, share: float, batch_size: int, device: str,
                           seed: int) -> Path:
    """``discover_parts`` with ``units: aligned`` (arguments as there); label maps sampled at pixel centres."""
    dev = resolve_device(device)
    model, config = load_model(model_path, manifest=manifest)
    model.to(dev)
    size, norm = config["image_size"], config["normalization"]
    images = lambda rows: ImageSet(root, rows, size, norm["mean"], norm["std"], preload=False)  # noqa: E731
    fit_rows = fit_sample(read_split(manifest, fit_split), fit_images, seed)
    vocabulary, choice = pdisc.fit_aligned_vocabulary(
        *pixel_inputs(model, images(fit_rows), batch_size, dev, norm["mean"], norm["std"]), k, tuple(k_range),
        tolerance, share, seed)
    stride = -(-size // PIXEL_GRID_LIMIT)
    rows = read_split(manifest, split)
    labels, frames = [], []
    step = max(1, pdisc.SEGMENT_CHUNK_PIXELS // (size * size))  # memory stays flat at any image size
    for start in range(0, len(rows), step):
        chunk = rows.iloc[start:start + step].reset_index(drop=True)
        pixels, frame = pdisc.assign_aligned_parts_and_frames(
            vocabulary, *pixel_inputs(model, images(chunk), batch_size, dev, norm["mean"], norm["std"]))
        labels.append(pixels[:, stride // 2::stride, stride // 2::stride].reshape(len(chunk), -1))
        frames.append(frame)
    gh = gw = len(range(stride // 2, size, stride))
    metadata = {"grid_h": gh, "grid_w": gw, "k": vocabulary.k, "method": config["method"],
                "discovery": "body_frame_parts", "split": split, "fit_images": len(fit_rows),
                **(choice.metadata() if choice is not None else {"k_criterion": "fixed"})}
    return pdisc.write_discovered_parts(out, rows["image_id"].to_numpy(), np.concatenate(labels),
                                       pdisc.BodyFrames.concatenate(frames), metadata)
