"""Trait discovery (``analysis.pipeline.analyze``) at CUB scale, end to end, on generated tables.

``make_tables`` writes a complete set of contract-shaped tables (docs/tables.md)
with a planted signal that the analysis should find, so the benchmark and the
tests (tests/test_analysis.py) use the same generator:

* classes come in genera of ``genus_size`` look-alikes; each class has one
  *signature part* (distinct inside its genus); look-alike pairs differ in
  their two signature parts (``lookalike_pairs.parquet``);
* a class's top-ranked heads (a fixed per-class head order) look at its
  signature part (a Gaussian bump on the part's keypoint plus noise); the
  other heads each look at one fixed part (their "head type");
* ``trait_features`` of the top heads are a per-part embedding plus noise;
* ``region_effects``: blurring A's signature part drops the A-B margin,
  blurring B's raises it, other parts add noise;
* ``class_attributes`` (CUB layout, values 0-100): classes differ from their
  genus mates only in the attributes of their signature part's group.

Layouts: ``masks`` (the synthetic data's 8 parts, 64x64 images, part masks on
disk) and ``keypoints`` (CUB's 15 parts as keypoints, no masks).

    python benchmarks/analysis_scale.py                 # CUB size: 5,794 images, 200 classes, 12 heads, 14x14
    python benchmarks/analysis_scale.py --images 600 --classes 40 --keep /tmp/bench_tables

Prints the wall time of ``analyze`` and the process's peak RSS. Target (issue
6): under 5 minutes and 4 GiB on 2 cores.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from analysis import tables  # noqa: E402
from analysis.tables import write_columns, write_table  # noqa: E402

CUB_PARTS = {  # name: (u, v) inside the bird's box
    "back": (0.55, 0.35), "beak": (0.97, 0.30), "belly": (0.50, 0.72), "breast": (0.72, 0.58),
    "crown": (0.82, 0.12), "forehead": (0.92, 0.18), "left eye": (0.86, 0.24), "left leg": (0.45, 0.96),
    "left wing": (0.42, 0.45), "nape": (0.70, 0.18), "right eye": (0.80, 0.26), "right leg": (0.55, 0.96),
    "right wing": (0.35, 0.55), "tail": (0.04, 0.62), "throat": (0.86, 0.42),
}
SYNTH_PARTS = {
    "body": (0.50, 0.55), "crown": (0.80, 0.12), "beak": (0.97, 0.30), "eye": (0.84, 0.26),
    "wing": (0.42, 0.45), "tail": (0.04, 0.60), "breast": (0.75, 0.62), "legs": (0.50, 0.96),
}
CUB_SIGNATURES = ["beak", "crown", "left wing", "tail", "breast", "throat", "nape", "belly", "back",
                  "forehead", "left eye", "left leg"]
SYNTH_SIGNATURES = ["beak", "crown", "wing", "tail", "breast", "eye", "legs"]
# attribute group (CUB's has_<group>_<aspect>) of each generated part
PART_GROUP = {"beak": "bill", "left wing": "wing", "right wing": "wing", "left eye": "eye", "right eye": "eye",
              "left leg": "leg", "right leg": "leg", "legs": "leg", "body": "back"}
COLOURS = ["red", "blue", "yellow", "black", "white", "brown"]


def _meta(method: str, grid: int, heads: int, split: str, feature_dim: int | None = None) -> dict:
    meta = {"method": method, "backbone": "generated", "grid_h": grid, "grid_w": grid, "patch_size": 16,
            "image_size": grid * 16, "num_heads": heads, "split": split}
    if feature_dim:
        meta["feature_dim"] = feature_dim
    return meta


def make_tables(out: str | Path, layout: str = "keypoints", classes: int = 200, images: int = 5794,
                heads: int = 12, grid: int = 14, feature_dim: int = 768, top_heads: int = 4, genus_size: int = 4,
                accuracy: float = 0.85, method: str = "prompt_cam", signal: float = 0.6, seed: int = 0,
                attributes: bool = True, pairs: bool = True, baselines: bool = True) -> dict[str, Path]:
    """Write a generated data set's tables under ``out``; returns the paths ``analyze`` needs.

    Args:
        out: folder; gets ``data/`` (the root: masks), ``results/`` (manifest, parts, pairs,
            attributes) and ``results/{method}/`` (the extraction tables).
        layout: ``keypoints`` (CUB parts) or ``masks`` (synthetic parts, masks on disk).
        classes, images: class count (a multiple of ``genus_size``) and image count (all in ``test``).
        heads, grid, feature_dim, top_heads: model shape; ``top_heads`` heads per class carry its trait.
        genus_size: look-alikes per genus (the true class + genus_size - 1 siblings queried).
        accuracy: fraction of correctly classified images (the rest predict a sibling).
        signal: weight of the planted bump in each map (the rest is noise).
        attributes, pairs, baselines: also write class_attributes, lookalike_pairs, baseline_maps.

    Returns:
        dict with ``method_dir``, ``manifest``, ``root``, ``signature`` (class -> part name).
    """
    from PIL import Image, ImageDraw

    from analysis.regions import RegionLayout, image_weights

    rng = np.random.default_rng(seed)
    out = Path(out)
    root, res = out / "data", out / "results"
    mdir = res / method
    mdir.mkdir(parents=True, exist_ok=True)
    part_pos = CUB_PARTS if layout == "keypoints" else SYNTH_PARTS
    sig_pool = CUB_SIGNATURES if layout == "keypoints" else SYNTH_SIGNATURES
    names = list(part_pos)
    P = len(names)
    if classes % genus_size or genus_size > len(sig_pool):
        raise ValueError("classes must be a multiple of genus_size, and genus_size <= signature parts")
    G = grid * grid

    # ---- classes, genera, signature parts
    genus = np.arange(classes) // genus_size
    signature = np.array([names.index(sig_pool[(g * 3 + j) % len(sig_pool)])
                          for g in range(classes // genus_size) for j in range(genus_size)])  # distinct in a genus
    class_names = [f"Species_{c:03d}" for c in range(classes)]

    # ---- images: manifest and parts
    label = np.sort(np.arange(images) % classes).astype(np.int16)
    image_id = np.arange(1, images + 1, dtype=np.int32)
    if layout == "keypoints":
        width = rng.integers(300, 500, images)
        height = rng.integers(260, 420, images)
    else:
        width = np.full(images, 64)
        height = np.full(images, 64)
    bw = (width * rng.uniform(0.55, 0.8, images)).astype(np.float32)
    bh = (height * rng.uniform(0.45, 0.6, images)).astype(np.float32)
    bx = ((width - bw) * rng.uniform(0.1, 0.9, images)).astype(np.float32)
    by = ((height - bh) * rng.uniform(0.1, 0.9, images)).astype(np.float32)
    uv = np.array([part_pos[n] for n in names])  # (P, 2)
    jitter = rng.normal(0, 0.02, (images, P, 2))
    px = bx[:, None] + (uv[None, :, 0] + jitter[..., 0]).clip(0, 1) * bw[:, None]
    py = by[:, None] + (uv[None, :, 1] + jitter[..., 1]).clip(0, 1) * bh[:, None]
    px = np.minimum(px, width[:, None] - 1)
    py = np.minimum(py, height[:, None] - 1)
    visible = rng.random((images, P)) < (0.95 if layout == "keypoints" else 1.0)
    manifest = pd.DataFrame({
        "image_id": image_id, "path": [f"images/{i}.png" for i in image_id], "class_id": label,
        "class_name": [class_names[c] for c in label], "split": "test",
        "width": width.astype(np.int32), "height": height.astype(np.int32),
        "bbox_x": bx, "bbox_y": by, "bbox_w": bw, "bbox_h": bh,
        "genus": [f"Genus_{g:02d}" for g in genus[label]],
    })
    if layout == "masks":
        manifest["mask_path"] = [f"masks/{i}.png" for i in image_id]
        (root / "masks").mkdir(parents=True, exist_ok=True)
        radius = {"body": None, "crown": 0.09, "beak": 0.07, "eye": 0.05, "wing": 0.16, "tail": 0.12,
                  "breast": 0.12, "legs": 0.08}
        for k in range(images):
            im = Image.new("L", (int(width[k]), int(height[k])), 0)
            draw = ImageDraw.Draw(im)
            draw.ellipse([bx[k] + 0.1 * bw[k], by[k] + 0.3 * bh[k], bx[k] + 0.8 * bw[k], by[k] + 0.85 * bh[k]],
                         fill=names.index("body") + 1)
            for p, n in enumerate(names):
                if radius[n] is None:
                    continue
                r = radius[n] * max(bw[k], bh[k])
                draw.ellipse([px[k, p] - r, py[k, p] - r, px[k, p] + r, py[k, p] + r], fill=p + 1)
            im.save(root / "masks" / f"{image_id[k]}.png")
    parts = pd.DataFrame({
        "image_id": np.repeat(image_id, P), "part_id": np.tile(np.arange(1, P + 1), images).astype(np.int16),
        "part_name": np.tile(names, images), "x": px.reshape(-1).astype(np.float32),
        "y": py.reshape(-1).astype(np.float32), "visible": visible.reshape(-1),
    })
    paths = {"manifest": res / "manifest.parquet", "method_dir": mdir, "root": root}
    write_table(manifest, paths["manifest"])
    write_table(parts, res / "parts.parquet", schema=tables.schema("parts"))

    # ---- look-alike pairs and class attributes
    if pairs:
        rows = [(a, b, class_names[a], class_names[b], f"Genus_{genus[a]:02d}",
                 [names[signature[a]], names[signature[b]]], 2)
                for a in range(classes) for b in range(a + 1, classes) if genus[a] == genus[b]]
        pairs_df = pd.DataFrame(rows, columns=["class_a", "class_b", "species_a", "species_b", "genus",
                                               "differing_parts", "n_differing"])
        write_table(pairs_df, res / "lookalike_pairs.parquet", schema=tables.schema("lookalike_pairs"))
    if attributes:
        groups = sorted({PART_GROUP.get(n, n) for n in names})
        attr = [(g, c) for g in groups for c in COLOURS]
        base = rng.integers(0, len(COLOURS), (classes // genus_size, len(groups)))
        values = np.zeros((classes, len(attr)), dtype=np.float32)
        for c in range(classes):
            for gi, g in enumerate(groups):
                colour = base[genus[c], gi]
                if PART_GROUP.get(names[signature[c]], names[signature[c]]) == g:
                    colour = (colour + 1 + c % genus_size) % len(COLOURS)
                values[c, gi * len(COLOURS) + colour] = 90.0
        n_attr = len(attr)
        write_table(pd.DataFrame({
            "class_id": np.repeat(np.arange(classes), n_attr).astype(np.int16),
            "attribute_id": np.tile(np.arange(1, n_attr + 1), classes).astype(np.int16),
            "attribute_name": np.tile([f"has_{g}_color::{c}" for g, c in attr], classes),
            "part": np.tile([g for g, _ in attr], classes), "value": values.reshape(-1)}),
            res / "class_attributes.parquet")

    # ---- predictions
    correct = rng.random(images) < accuracy
    sib_offset = rng.integers(1, genus_size, images)
    genus_first = (label // genus_size) * genus_size
    wrong = (genus_first + (label - genus_first + sib_offset) % genus_size).astype(np.int16)
    pred = np.where(correct, label, wrong).astype(np.int16)
    top5 = np.stack([pred] + [(pred + j) % classes for j in range(1, 5)], 1).astype(np.int16)
    top5[~correct, 1] = label[~correct]
    prob_true = np.where(correct, rng.uniform(0.5, 1, images), rng.uniform(0.05, 0.4, images)).astype(np.float32)
    probs = np.sort(rng.dirichlet(np.ones(5), images).astype(np.float32), 1)[:, ::-1]
    write_columns("predictions", {
        "image_id": image_id, "label": label, "pred": pred,
        "correct": correct, "prob_true": prob_true,
        "top5_ids": top5, "top5_probs": np.ascontiguousarray(probs)},
        mdir / "predictions.parquet", metadata=_meta(method, grid, heads, "test"))

    # ---- attention: true + siblings (one of them the prediction), every head
    head_order = np.stack([rng.permutation(heads) for _ in range(classes)])  # class -> heads by rank
    rank_of = np.empty_like(head_order)
    np.put_along_axis(rank_of, head_order, np.arange(1, heads + 1)[None].repeat(classes, 0), 1)
    q_img = np.repeat(np.arange(images), genus_size)
    q_cls = (genus_first[q_img] + (label[q_img] - genus_first[q_img] + np.tile(np.arange(genus_size), images))
             % genus_size).astype(np.int16)
    q_role = np.where(q_cls == label[q_img], "true", np.where(q_cls == pred[q_img], "pred", "sibling"))
    r_img = np.repeat(q_img, heads)
    r_cls = np.repeat(q_cls, heads)
    r_role = np.repeat(q_role, heads)
    r_head = np.tile(np.arange(heads), len(q_img)).astype(np.int8)
    r_rank = rank_of[r_cls, r_head].astype(np.int8)
    fixed_part = np.arange(heads) % P
    target = np.where(r_rank <= top_heads, signature[r_cls], fixed_part[r_head])
    stray = rng.random(len(target)) < 0.15
    target[stray] = rng.integers(0, P, stray.sum())
    gx = px[r_img, target] / width[r_img] * grid - 0.5  # keypoint in cell units
    gy = py[r_img, target] / height[r_img] * grid - 0.5
    cells = np.arange(grid, dtype=np.float32)
    maps = np.empty((len(r_img), G), dtype=np.float16)
    for s in range(0, len(r_img), 50_000):
        sl = slice(s, s + 50_000)
        bump = np.exp(-((cells[None, :, None] - gy[sl, None, None]) ** 2
                        + (cells[None, None, :] - gx[sl, None, None]) ** 2) / (2 * 0.8 ** 2)).reshape(-1, G)
        bump /= bump.sum(1, keepdims=True)
        noise = rng.random(bump.shape, dtype=np.float32) ** 3
        noise /= noise.sum(1, keepdims=True)
        maps[sl] = (signal * bump + (1 - signal) * noise).astype(np.float16)
    meta = _meta(method, grid, heads, "test")
    write_columns("attention", {
        "image_id": image_id[r_img], "query_class": r_cls, "query_role": r_role,
        "head": r_head, "head_rank": r_rank, "attn": maps},
        mdir / "attention.parquet", metadata=meta)
    true = r_role == "true"
    write_columns("head_ranks", {
        "image_id": image_id[r_img], "class_id": r_cls, "head": r_head,
        "rank": r_rank, "prob_after_blur": (rng.random(len(r_img)).astype(np.float32))},
        mdir / "head_ranks.parquet", metadata=meta)

    # ---- trait features of the true class's top heads
    tf = true & (r_rank <= top_heads)
    embed = rng.normal(0, 1, (P, feature_dim)).astype(np.float32)
    feats = (embed[target[tf]] + rng.normal(0, 0.7, (tf.sum(), feature_dim))).astype(np.float16)
    write_columns("trait_features", {
        "image_id": image_id[r_img[tf]], "class_id": r_cls[tf], "head": r_head[tf],
        "rank": r_rank[tf], "feature": feats},
        mdir / "trait_features.parquet", metadata=_meta(method, grid, heads, "test", feature_dim))

    # ---- region effects: every image x each look-alike x each region
    layout = RegionLayout.build("annotated", parts=parts)
    vocab = layout.vocab
    W = image_weights(layout, manifest, (grid, grid), root=root)
    area = W.mean(-1)  # (N, R)
    R = len(vocab)
    sib = ~(q_role == "true")
    e_img = np.repeat(q_img[sib], R)
    e_b = np.repeat(q_cls[sib], R)
    e_r = np.tile(np.arange(R), sib.sum())
    e_a = label[e_img]
    drop = rng.normal(0, 0.3, len(e_img)).astype(np.float32)
    sig_idx = np.array([vocab.index(n) for n in names])[signature]
    drop[e_r == sig_idx[e_a]] += 2.0
    drop[e_r == sig_idx[e_b]] -= 1.0
    drop *= area[e_img, e_r] > 0
    write_columns("region_effects", {
        "image_id": image_id[e_img], "class_a": (e_a.astype(np.int16)),
        "class_b": (e_b.astype(np.int16)), "region": (np.array(vocab)[e_r]),
        "area": (area[e_img, e_r].astype(np.float32)),
        "margin": (rng.normal(3, 1, len(e_img)).astype(np.float32)), "margin_drop": drop,
        "prob_a_drop": drop * 0.1}, mdir / "region_effects.parquet", metadata=meta)

    # ---- baseline maps: a good one (on the signature part) and a diffuse one
    if baselines:
        rows = np.flatnonzero(true & (r_rank == 1))
        bump = maps[rows].astype(np.float32)
        diffuse = rng.random((len(rows), G)).astype(np.float32)
        both = np.concatenate([bump, diffuse / diffuse.sum(1, keepdims=True)])
        write_columns("baseline_maps", {
            "image_id": (np.tile(image_id[r_img[rows]], 2)),
            "method": (["gradcam"] * len(rows) + ["rollout"] * len(rows)),
            "class_id": (np.tile(r_cls[rows], 2)), "attn": both.astype(np.float16)},
            mdir / "baseline_maps.parquet", metadata=meta)
    paths["signature"] = {c: names[signature[c]] for c in range(classes)}
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5794)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--grid", type=int, default=14)
    parser.add_argument("--feature-dim", type=int, default=768)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--keep", type=Path, default=None, help="write the tables here and keep them")
    args = parser.parse_args(argv)
    from analysis.pipeline import AnalysisInputs, analyze

    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        t0 = time.perf_counter()
        paths = make_tables(base, "keypoints", classes=args.classes, images=args.images, heads=args.heads,
                            grid=args.grid, feature_dim=args.feature_dim)
        gen = time.perf_counter() - t0
        rss_gen = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        t0 = time.perf_counter()
        inputs = AnalysisInputs.conventional(paths["method_dir"], paths["manifest"], paths["root"])
        metrics = analyze(inputs, base / "analysis",
                          {"permutations": args.permutations, "bootstrap": args.bootstrap}, progress=False)
        wall = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(metrics.to_string(index=False, float_format="%.3f"))
    print(f"generated tables in {gen:.1f} s (peak RSS {rss_gen:.2f} GiB so far)")
    print(f"analyze: {args.images} images, {args.classes} classes, {args.heads} heads, {args.grid}x{args.grid}: "
          f"wall {wall:.1f} s, peak RSS {rss:.2f} GiB (process, includes the generator)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
