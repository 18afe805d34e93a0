"""Measurement for pixel-level part discovery (issue 12): dump what discovery sees, then score variants.

``dump``: for a sample of train and test images, the backbone patch features,
the class-attention saliency of the top predicted classes, the input-gradient
saliency of the top predicted class, the network input in 0-1 RGB and the
ground-truth part masks (evaluation only) into one .npz.  ``compare``:
proxy metrics of both discovery units against the masks.  Run from the repository root:

    python benchmarks/discovery_pixels.py dump --results RESULTS/synthetic --method prompt_cam --out /tmp/pc.npz
    python benchmarks/discovery_pixels.py compare --out /tmp/pc.npz
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


def compare(dump_path: Path, ks: tuple[int, ...] = (10, 16), n: int = 300) -> list[dict]:
    """Proxy scores of ``units: patches`` and ``units: segments`` fitted on the dump's train images, on its test images."""
    d = np.load(dump_path)
    grid = tuple(int(v) for v in d["grid"])
    tr = {k: d[f"train_{k}"][:n] for k in ("features", "saliency", "grad", "rgb")}
    te = {k: d[f"test_{k}"][:n] for k in ("features", "saliency", "grad", "rgb", "masks")}
    size = te["masks"].shape[-1]
    rows = []
    for k in ks:
        vocab = pdisc.fit_part_vocabulary(tr["features"], tr["saliency"], grid, k)
        patch = pdisc.assign_parts(vocab, te["features"], te["saliency"]).reshape(-1, *grid)
        pixels = patch.repeat(size // grid[0], 1).repeat(size // grid[1], 2)
        rows.append({"units": "patches", "k": k, **proxy_scores(pixels, te["masks"])})
        seg = pdisc.fit_segment_vocabulary(tr["features"], tr["rgb"], tr["grad"], grid, k)
        pixels = pdisc.assign_segment_parts(seg, te["features"], te["rgb"], te["grad"])
        rows.append({"units": "segments", "k": k, **proxy_scores(pixels, te["masks"])})
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
        for row in compare(a.out):
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "bird_share"},
                  "clusters >50% bird:", sum(x > 0.5 for x in row["bird_share"]))
