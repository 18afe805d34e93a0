"""Measurement for pixel-level part discovery (issue 12): dump what discovery sees, then score variants.

``dump``: for a sample of train and test images, the backbone patch features,
the class-attention saliency of the top predicted classes, the input-gradient
saliency of the top predicted class, the network input in 0-1 RGB and the
ground-truth part masks (evaluation only) into one .npz.  ``compare``:
both discovery units fitted on the dump's train images and scored on its test
images: proxy metrics against the masks and an occlusion trait recovery (each
directed look-alike pair's region whose removal, filled with the image's mean
colour, drops the A - B margin most over A's correctly classified images;
recovered when its majority true part is a planted differing part).  Run from
the repository root:

    python benchmarks/discovery_pixels.py dump --results RESULTS/synthetic --method prompt_cam --out /tmp/pc.npz
    python benchmarks/discovery_pixels.py compare --results RESULTS/synthetic --method prompt_cam --out /tmp/pc.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from analysis import part_discovery as pdisc
from intr.data.images import ImageSet, read_split
from intr.discover import fit_sample
from intr.models import load_model


def dump(results: Path, method: str, out: Path, n: int = 600, seed: int = 0) -> None:
    model, config = load_model(results / method / "model.pt", manifest=results / "manifest.parquet")
    model.eval()
    size, norm = config["image_size"], config["normalization"]
    std = torch.tensor(norm["std"]).view(1, 3, 1, 1)
    mean = torch.tensor(norm["mean"]).view(1, 3, 1, 1)
    store = {}
    for split in ("train", "test"):
        rows = fit_sample(read_split(results / "manifest.parquet", split), n, seed)
        data = ImageSet(results / "data", rows, size, norm["mean"], norm["std"], preload=False)
        feats, sal, grads, rgb, masks = [], [], [], [], []
        for s in range(0, len(data), 64):
            images = torch.stack([data[i][0] for i in range(s, min(len(data), s + 64))])
            with torch.no_grad():
                classes = model(images).topk(3, dim=1).indices
                _, maps = model.forward_with_maps(images, classes)
                sal.append(pdisc.attention_saliency(maps.flatten(3).float().numpy()))
                feats.append(model.patch_features(images).float().numpy())
            x = images.clone().requires_grad_(True)
            logit = model(x).gather(1, classes[:, :1]).sum()
            (g,) = torch.autograd.grad(logit, x)
            grads.append(g.numpy().astype(np.float32))
            rgb.append((images * std + mean).clamp(0, 1).numpy().astype(np.float32))
        for p in rows["mask_path"]:
            m = Image.open(results / "data" / p).resize((size, size), Image.NEAREST)
            masks.append(np.array(m, dtype=np.int8))
        store[split] = dict(features=np.concatenate(feats), saliency=np.concatenate(sal),
                            grad=np.concatenate(grads), rgb=np.concatenate(rgb), masks=np.stack(masks),
                            image_id=rows["image_id"].to_numpy())
    np.savez_compressed(out, grid=np.array(model.grid_size),
                        **{f"{sp}_{k}": v for sp, d in store.items() for k, v in d.items()})


def proxy_scores(labels: np.ndarray, masks: np.ndarray) -> dict:
    """Proxy metrics of pixel labels (N, H, W; 0 background) against true masks (0 background, 1..8 parts).

    bird_nmi/ari: agreement on bird pixels; fg_precision/recall: labelled-foreground vs bird pixels;
    majority_parts: how many of the 8 parts are the majority true label (bird or not) of some cluster;
    bird_share: per cluster, the share of its pixels that is bird.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    lab, tru = labels.reshape(-1), masks.reshape(-1)
    bird = tru > 0
    fg = lab > 0
    k = int(lab.max())
    share, majority = [], set()
    for c in range(1, k + 1):
        sel = lab == c
        if not sel.any():
            continue
        share.append(float(bird[sel].mean()))
        majority.add(int(np.bincount(tru[sel], minlength=9).argmax()))
    return {"bird_nmi": normalized_mutual_info_score(tru[bird], lab[bird]),
            "bird_ari": adjusted_rand_score(tru[bird], lab[bird]),
            "fg_precision": float(bird[fg].mean()) if fg.any() else 0.0,
            "fg_recall": float(fg[bird].mean()),
            "majority_parts": len(majority - {0}),
            "bird_share": np.round(sorted(share), 2).tolist()}


def occlusion_recovery(labels: np.ndarray, rgb: np.ndarray, masks: np.ndarray, classes: np.ndarray,
                       model, normalization: dict, pairs, part_names: dict[int, str]) -> float:
    """Share of directed look-alike pairs whose most margin-dropping region's majority true part is planted.

    Args:
        labels: (N, H, W) discovered pixel labels, 0 background.
        rgb: (N, 3, H, W) images in 0-1.
        masks: (N, H, W) true part ids (0 background).
        classes: (N,) true class of each image.
        model: the trained model.
        normalization: its ``mean`` and ``std``.
        pairs: ``lookalike_pairs.parquet`` rows.
        part_names: true part id -> name.
    """
    k = int(labels.max())
    mean = torch.tensor(normalization["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(normalization["std"]).view(1, 3, 1, 1)
    x = torch.tensor(rgb)
    with torch.no_grad():
        base = model((x - mean) / std).numpy()
        removed = np.zeros((k + 1,) + base.shape)
        for r in range(1, k + 1):
            m = torch.tensor(labels == r).float()[:, None]
            removed[r] = model((x * (1 - m) + x.mean((2, 3), keepdim=True) * m - mean) / std).numpy()
    recovered = []
    for a, b, planted in zip(pairs["class_a"], pairs["class_b"], pairs["differing_parts"]):
        for ca, cb in ((int(a), int(b)), (int(b), int(a))):
            idx = np.flatnonzero((classes == ca) & (base.argmax(1) == ca))
            if not len(idx):
                continue
            overlap = np.zeros((k + 1, masks.max() + 1))
            np.add.at(overlap, (labels[classes == ca].ravel(), masks[classes == ca].ravel()), 1)
            majority = overlap[:, 1:].argmax(1) + 1
            drop = (base[idx, ca] - base[idx, cb])[None] - (removed[1:, idx, ca] - removed[1:, idx, cb])
            present = np.stack([(labels[idx] == r).any((1, 2)) for r in range(1, k + 1)])
            top = int(np.where(present, drop, 0).mean(1).argmax()) + 1
            recovered.append(part_names[int(majority[top])] in set(planted))
    return float(np.mean(recovered))


def compare(dump_path: Path, results: Path, method: str, ks: tuple = (10, "auto"), n: int = 360) -> list[dict]:
    """Proxy scores and occlusion recovery of ``units: patches`` and ``units: aligned`` on the dump's test images,
    and of the true parts as regions (the most a discovery could give with this model and score)."""
    import pandas as pd

    d = np.load(dump_path)
    grid = tuple(int(v) for v in d["grid"])
    tr = {k: d[f"train_{k}"] for k in ("features", "saliency", "grad", "rgb")}
    te = {k: d[f"test_{k}"][:n] for k in ("features", "saliency", "grad", "rgb", "masks", "image_id")}
    model, config = load_model(results / method / "model.pt", manifest=results / "manifest.parquet")
    manifest = pd.read_parquet(results / "manifest.parquet").set_index("image_id")
    classes = manifest.loc[te["image_id"], "class_id"].to_numpy()
    pairs = pd.read_parquet(results / "lookalike_pairs.parquet")
    parts = pd.read_parquet(results / "parts.parquet")[["part_id", "part_name"]].drop_duplicates()
    names = dict(zip(parts["part_id"].astype(int), parts["part_name"]))
    size = te["masks"].shape[-1]
    rows = []
    for k in ks:
        if k == "auto":
            k_patch = pdisc.choose_part_count(tr["features"], tr["saliency"], grid).k
        else:
            k_patch = k
        vocab = pdisc.fit_part_vocabulary(tr["features"], tr["saliency"], grid, k_patch)
        patch = pdisc.assign_parts(vocab, te["features"], te["saliency"]).reshape(-1, *grid)
        pixels = patch.repeat(size // grid[0], 1).repeat(size // grid[1], 2).astype(np.int64)
        aligned, _ = pdisc.fit_aligned_vocabulary(tr["rgb"], tr["grad"], k)
        for units, labels, kk in (("patches", pixels, k_patch),
                                  ("aligned", pdisc.assign_aligned_parts(aligned, te["rgb"], te["grad"]), aligned.k)):
            labels = labels.astype(np.int64)
            rows.append({"units": units, "k": kk, **proxy_scores(labels, te["masks"]),
                         "occlusion_recovery": occlusion_recovery(labels, te["rgb"], te["masks"], classes, model,
                                                                  config["normalization"], pairs, names)})
    truth = te["masks"].astype(np.int64)  # the reference: the true parts themselves as the regions
    rows.append({"units": "true_parts", "k": int(truth.max()), **proxy_scores(truth, te["masks"]),
                 "occlusion_recovery": occlusion_recovery(truth, te["rgb"], te["masks"], classes, model,
                                                          config["normalization"], pairs, names)})
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["dump", "compare"])
    ap.add_argument("--results", type=Path)
    ap.add_argument("--method")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--images", type=int, default=600)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.command == "dump":
        dump(a.results, a.method, a.out, a.images)
    else:
        for row in compare(a.out, a.results, a.method):
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "bird_share"},
                  "clusters >50% bird:", sum(x > 0.5 for x in row["bird_share"]))
