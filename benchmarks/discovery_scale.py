"""Part discovery (``analysis.part_discovery``) at CUB scale on generated patch features: fit on a sample, assign all.

The network half of ``intr discover`` (features and attention) is not run:
this measures the clustering that ``intr/discover.py`` calls, on features of
CUB's shape (5,994 training images, a 14 x 14 grid of 768-d ViT-B/16
patches).  The features are random but clustered, with a known truth:

* every image has a "bird" (an ellipse at a random place and size of the
  frame) cut into ``--parts`` parts by angle around its centre; every other
  patch is one of ``BACKGROUND_LOOKS`` background looks;
* a patch's feature is its part's (or look's) centre plus Gaussian noise;
* saliency is high on the bird and low elsewhere, plus noise.

Images are generated chunk by chunk (seeded by image index), as
``intr discover`` computes them, so the features of all images are never held
at once.  The fit sample is ``--fit-images`` of them (the config's
``discovery.fit_images``); assignment runs in chunks of ``ASSIGN_CHUNK``
images (``intr.discover``'s chunk).

    python benchmarks/discovery_scale.py                      # CUB size, k auto
    python benchmarks/discovery_scale.py --images 1200 --k 10 # smaller, fixed k
    python benchmarks/discovery_scale.py --units aligned      # body-frame parts on 224 px images

``--units aligned`` measures ``units: aligned`` instead: generated 224 px
images (a noisy grey ground, a bird of flat-coloured parts cut by angle around
its centre at a random place, size and facing) and an input gradient that is
high on the bird; assignment runs in ``intr.discover``'s chunks for that size
and the labels are sampled on its grid of at most 32 x 32 pixel centres.

Prints the wall and CPU time (all threads) of the fit (choosing k included)
and of the assignment, the process's peak RSS, and the NMI / ARI of the discovered parts against the
generated truth on bird patches (a check that the run found the parts).
Target (issue 12): under 5 minutes and 4 GiB on 2 cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # the target machine: 2 cores (before numpy loads BLAS)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis import part_discovery as pdisc

ASSIGN_CHUNK = 1024  # images per assignment chunk, as in intr.discover.discover_parts
BACKGROUND_LOOKS = 8
NOISE = 0.6  # per-dimension noise of a patch feature, next to unit-scale per-dimension centres


def make_looks(dim: int, parts: int, seed: int) -> np.ndarray:
    """(parts + BACKGROUND_LOOKS, dim) float32 cluster centres: the bird's parts first, then the background looks."""
    return np.random.default_rng(seed).standard_normal((parts + BACKGROUND_LOOKS, dim), dtype=np.float32)


def make_images(first: int, count: int, grid: tuple[int, int], looks: np.ndarray, parts: int,
                seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (n, G, D) float32, saliency (n, G) float64, truth (n, G) int64: part 0..parts-1, -1 background).

    Image i is drawn from a generator seeded by (seed, i): any chunking gives the same images.

    Args:
        first: index of the first image.
        count: images to make.
        grid: (g_h, g_w) patch grid.
        looks: from ``make_looks``.
        parts: number of true parts.
        seed: the data set's seed.
    """
    gh, gw = grid
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    y, x = rows / (gh - 1), cols / (gw - 1)
    features = np.empty((count, gh * gw, looks.shape[1]), dtype=np.float32)
    saliency = np.empty((count, gh * gw))
    truth = np.empty((count, gh * gw), dtype=np.int64)
    for n in range(count):
        rng = np.random.default_rng((seed, first + n))
        cy, cx = rng.uniform(0.3, 0.7, size=2)
        ry, rx = rng.uniform(0.15, 0.35, size=2)
        on = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        angle = np.arctan2(y - cy, x - cx)
        part = np.minimum(((angle + np.pi) / (2 * np.pi) * parts).astype(np.int64), parts - 1)
        look = np.where(on, part, parts + rng.integers(0, BACKGROUND_LOOKS, size=gh * gw))
        features[n] = looks[look] + NOISE * rng.standard_normal((gh * gw, looks.shape[1]), dtype=np.float32)
        saliency[n] = np.clip(np.where(on, 0.8, 0.1) + 0.1 * rng.standard_normal(gh * gw), 0, None)
        saliency[n] /= max(saliency[n].max(), 1e-12)
        truth[n] = np.where(on, part, -1)
    return features, saliency, truth


PALETTE = np.array([[0.9, 0.1, 0.1], [0.1, 0.1, 0.9], [0.9, 0.8, 0.1], [0.1, 0.7, 0.2], [0.6, 0.2, 0.7],
                    [0.9, 0.5, 0.1], [0.05, 0.05, 0.05], [0.95, 0.95, 0.95]])


def make_pixel_images(first: int, count: int, size: int, parts: int,
                      seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rgb (n, 3, S, S) float32 in 0-1, gradient (n, 3, S, S) float32, truth (n, S, S) int64, -1 background).

    Image i is drawn from a generator seeded by (seed, i). The bird is an ellipse cut into ``parts``
    parts by angle around its centre (mirrored when it faces left), each part a flat palette colour.
    """
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    rgb = np.empty((count, 3, size, size), dtype=np.float32)
    gradient = np.empty_like(rgb)
    truth = np.empty((count, size, size), dtype=np.int64)
    for n in range(count):
        rng = np.random.default_rng((seed, first + n))
        cy, cx = rng.uniform(0.35, 0.65, size=2)
        ry, rx = rng.uniform(0.1, 0.15), rng.uniform(0.2, 0.3)
        on = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        facing = 1 if rng.random() < 0.5 else -1
        angle = np.arctan2(yy - cy, facing * (xx - cx))
        part = np.minimum(((angle + np.pi) / (2 * np.pi) * parts).astype(np.int64), parts - 1)
        colours = PALETTE[rng.integers(0, len(PALETTE), size=parts)]
        ground = 0.5 + rng.uniform(-0.02, 0.02, size=(3, size, size))
        rgb[n] = np.where(on[None], colours[part].transpose(2, 0, 1), ground)
        weight = np.where(on, 0.5 + 0.5 * (part < parts // 2), 0.0)  # the head half matters more
        gradient[n] = (weight + 0.01 * rng.standard_normal((size, size)))[None]
        truth[n] = np.where(on, part, -1)
    return rgb, gradient, truth


def run_aligned(images: int, fit_images: int, size: int, parts: int, k: int | str, k_range: tuple[int, int],
                seed: int) -> dict:
    """``run`` for ``units: aligned`` on generated ``size`` px images (arguments as there)."""
    from intr.discover import PIXEL_GRID_LIMIT

    sample = np.sort(np.random.default_rng(seed).choice(images, size=min(fit_images, images), replace=False))
    started = time.perf_counter()
    chunks = [make_pixel_images(int(i), 1, size, parts, seed) for i in sample]
    fit_rgb, fit_gradient = np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
    del chunks
    made, made_cpu = time.perf_counter(), time.process_time()
    vocabulary, choice = pdisc.fit_aligned_vocabulary(fit_rgb, fit_gradient, k, k_range, seed=seed)
    fitted, fit_cpu = time.perf_counter(), time.process_time() - made_cpu
    del fit_rgb, fit_gradient
    step = max(1, pdisc.SEGMENT_CHUNK_PIXELS // (size * size))
    stride = -(-size // PIXEL_GRID_LIMIT)
    cells = (slice(None), slice(stride // 2, None, stride), slice(stride // 2, None, stride))
    labels, truth, generate_s, assign_cpu = [], [], 0.0, 0.0
    for start in range(0, images, step):
        t = time.perf_counter()
        rgb, gradient, chunk_truth = make_pixel_images(start, min(step, images - start), size, parts, seed)
        generate_s += time.perf_counter() - t
        cpu = time.process_time()
        labels.append(pdisc.assign_aligned_parts(vocabulary, rgb, gradient)[cells].reshape(len(rgb), -1))
        assign_cpu += time.process_time() - cpu
        truth.append(chunk_truth[cells].reshape(len(rgb), -1))
        del rgb, gradient
    assigned = time.perf_counter()
    return {"units": "aligned", "images": images, "fit_images": len(sample), "size": size, "k": vocabulary.k,
            "k_criterion": choice.criterion if choice else "fixed",
            **figures(started, made, fitted, assigned, generate_s, fit_cpu, assign_cpu, labels, truth)}


def figures(started: float, made: float, fitted: float, assigned: float, generate_s: float, fit_cpu: float,
            assign_cpu: float, labels: list[np.ndarray], truth: list[np.ndarray]) -> dict:
    """The timings (wall clock marks and CPU seconds of a run), peak RSS and NMI / ARI against the truth."""
    nmi, ari = pdisc.agreement(np.concatenate(labels), np.concatenate(truth))
    return {"generate_fit_sample_s": round(made - started, 1), "fit_s": round(fitted - made, 1),
            "assign_s": round(assigned - fitted - generate_s, 1), "generate_assign_s": round(generate_s, 1),
            "discovery_s": round(fitted - made + assigned - fitted - generate_s, 1),
            "discovery_cpu_s": round(fit_cpu + assign_cpu, 1), "fit_cpu_s": round(fit_cpu, 1),
            "assign_cpu_s": round(assign_cpu, 1),
            "peak_rss_gib": round(peak_rss_gib(), 2), "nmi_on_bird": round(nmi, 3), "ari_on_bird": round(ari, 3)}


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(images: int, fit_images: int, grid: tuple[int, int], dim: int, parts: int, k: int | str,
        k_range: tuple[int, int], seed: int) -> dict:
    """Fit on ``fit_images`` (a seeded sample), assign all ``images``; the figures as a dict.

    Args:
        images: images of the split to label (CUB: 5,994 training images).
        fit_images: images sampled for the fit.
        grid: patch grid.
        dim: feature dimension.
        parts: true parts in the generated birds.
        k: parts to discover, or ``auto``.
        k_range: range of ``auto``.
        seed: data and clustering seed.
    """
    looks = make_looks(dim, parts, seed)
    sample = np.sort(np.random.default_rng(seed).choice(images, size=min(fit_images, images), replace=False))
    started = time.perf_counter()
    chunks = [make_images(int(i), 1, grid, looks, parts, seed) for i in sample]
    fit_features = np.concatenate([c[0] for c in chunks])
    fit_saliency = np.concatenate([c[1] for c in chunks])
    del chunks
    made, made_cpu = time.perf_counter(), time.process_time()
    choice = None
    if k == "auto":
        choice = pdisc.choose_part_count(fit_features, fit_saliency, grid, k_range, seed=seed)
        k = choice.k
    vocabulary = pdisc.fit_part_vocabulary(fit_features, fit_saliency, grid, int(k), seed=seed)
    fitted, fit_cpu = time.perf_counter(), time.process_time() - made_cpu
    del fit_features, fit_saliency
    labels, truth, generate_s, assign_cpu = [], [], 0.0, 0.0
    for start in range(0, images, ASSIGN_CHUNK):
        t = time.perf_counter()
        features, saliency, chunk_truth = make_images(start, min(ASSIGN_CHUNK, images - start), grid, looks, parts, seed)
        generate_s += time.perf_counter() - t
        cpu = time.process_time()
        labels.append(pdisc.assign_parts(vocabulary, features, saliency))
        assign_cpu += time.process_time() - cpu
        truth.append(chunk_truth)
        del features, saliency
    assigned = time.perf_counter()
    return {"images": images, "fit_images": len(sample), "grid": list(grid), "dim": dim, "k": int(k),
            "k_criterion": choice.criterion if choice else "fixed",
            **figures(started, made, fitted, assigned, generate_s, fit_cpu, assign_cpu, labels, truth)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5994, help="images to label (CUB: 5,994 training images)")
    parser.add_argument("--fit-images", type=int, default=600, help="images sampled for the fit (discovery.fit_images)")
    parser.add_argument("--grid", type=int, default=14, help="patch grid side (ViT-B/16 at 224 px: 14)")
    parser.add_argument("--dim", type=int, default=768, help="feature dimension (ViT-B: 768)")
    parser.add_argument("--parts", type=int, default=12, help="true parts of the generated birds")
    parser.add_argument("--k", default="auto", help="parts to discover, or auto (discovery.k)")
    parser.add_argument("--k-range", type=int, nargs=2, default=list(pdisc.K_RANGE), help="range of auto (discovery.k_range)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--units", choices=["patches", "aligned"], default="patches",
                        help="what is clustered (discovery.units)")
    parser.add_argument("--size", type=int, default=224, help="--units aligned: image side in pixels")
    parser.add_argument("--json-out", help="append the figures as one JSON line to this file")
    args = parser.parse_args(argv)
    k = args.k if args.k == "auto" else int(args.k)
    if args.units == "aligned":
        result = run_aligned(args.images, args.fit_images, args.size, args.parts, k, tuple(args.k_range), args.seed)
    else:
        result = run(args.images, args.fit_images, (args.grid, args.grid), args.dim, args.parts, k,
                     tuple(args.k_range), args.seed)
    print(json.dumps(result))
    ok = result["discovery_s"] < 300 and result["peak_rss_gib"] < 4
    print(f"discovery {result['discovery_s']:.0f} s (target < 300), peak RSS {result['peak_rss_gib']:.2f} GiB "
          f"(target < 4): {'PASS' if ok else 'FAIL'}")
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
