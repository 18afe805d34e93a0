"""Extraction throughput (images/s including the Parquet writing) and its memory as the data grows.

    python benchmarks/extract_throughput.py                       # the embedded default's trained model, CPU
    python benchmarks/extract_throughput.py --images 600 --memory # + peak RSS at 1x and 4x the images
    python benchmarks/extract_throughput.py --full --device cuda  # ViT-B/16, 224 px, 200 classes (H200 target)

``default``: ``results/synthetic/{method}/model.pt`` from ``make run`` on its
test split.  ``--full``: a Prompt-CAM on a random-weight ViT-B/16 (224 px,
200 classes) saved as a model.pt, on a rendered synthetic set of 50 genera x
4 species at 224 px (true class + 3 siblings per image, as on CUB with a
genus taxonomy).  The time covers everything ``intr extract`` does for an
image: decoding, predictions, the maps of all query rows, head ranking of
every row, region effects, trait features, and writing the six tables.  The
first batch (warm-up, CUDA kernels) is excluded by timing two runs of
different size and taking the difference.

``--memory`` runs ``intr extract`` in fresh processes on N and 4N images and
reports each one's peak resident memory: streaming keeps it flat.

Issue target (H200, ViT-B/16, 224 px, 200 classes, true class + siblings):
>= 3,000 images/s; the official visualisation path managed 147 images/s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET_FULL = 3000.0


def build_full(tmp: Path, images_per_species: int, model_name: str = "vit_base_patch16_224",
               image_size: int = 224) -> tuple[Path, Path, Path]:
    """A random-weight ViT-B/16 Prompt-CAM model.pt and a 224-px synthetic data set of 200 classes.

    Args:
        tmp: folder for the model, the data and the tables.
        images_per_species: rendered images per class.
        model_name: timm ViT (``--model``; a smaller one for a smoke run).
        image_size: image side (``--img-size``; the ViT is built for it).
    """
    import torch

    from intr.data.prepare import prepare_dataset
    from intr.data.synthetic import SyntheticConfig, synthesize
    from intr.models.backbones import normalization
    from intr.models import build_model
    from intr.train import trainable_state

    data = tmp / "data"
    synthesize(SyntheticConfig(genera=50, species_per_genus=4, images_per_species=images_per_species,
                               image_size=image_size, train_fraction=0.0), data, progress=False, workers=4)
    prepare_dataset("synthetic", data, tmp / "tables", progress=False)
    options = {"backbone": {"name": model_name, "kwargs": {} if image_size == 224 else {"img_size": image_size}}}
    torch.manual_seed(0)
    model = build_model("prompt_cam", options, 200, image_size)
    mean, std = normalization(model.backbone)
    config = {"method": "prompt_cam", "model": options, "num_classes": 200, "image_size": image_size,
              "train": {"seed": 0}, "normalization": {"mean": list(mean), "std": list(std)}}
    path = tmp / "model.pt"
    torch.manual_seed(0)
    torch.save({"config": json.dumps(config), "state": trainable_state(model), "epoch": 0}, path)
    return path, tmp / "tables" / "manifest.parquet", data


def timed_extract(model, manifest, root, out, limit, batch, device, threads) -> float:
    import torch

    from intr.extract import extract

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    extract(model, manifest, root, out, batch_size=batch, device=device, limit=limit, progress=False)
    if torch.cuda.is_available() and device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_rss_mb(model, manifest, root, out, limit, batch, device, threads) -> float:
    """Peak resident memory of ``intr extract`` on ``limit`` images, in a fresh process."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "intr.cli", "extract", "--model", str(model),
           "--manifest", str(manifest), "--root", str(root), "--out", str(out), "--limit", str(limit),
           "--config-json", json.dumps({"extract": {"batch_size": batch, "device": device}}), "--quiet"]
    if threads:
        cmd += ["--threads", str(threads)]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="ViT-B/16, 224 px, 200 classes, random weights")
    parser.add_argument("--method", default="prompt_cam", help="default preset: which trained model")
    parser.add_argument("--results", type=Path, default=REPO / "results" / "synthetic")
    parser.add_argument("--images", type=int, help="images in the timed run (default 600; full: 4000)")
    parser.add_argument("--batch", type=int, help="batch size (default 64; full: 256)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--memory", action="store_true", help="also peak RSS at 1x and 4x --images/4")
    parser.add_argument("--model", default="vit_base_patch16_224", help="--full: the timm ViT (random weights)")
    parser.add_argument("--img-size", type=int, default=224, help="--full: image side in pixels")
    parser.add_argument("--json-out", type=Path, help="append one JSON line with the results")
    args = parser.parse_args()
    images = args.images or (4000 if args.full else 600)
    batch = args.batch or (256 if args.full else 64)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.full:
            model, manifest, root = build_full(tmp, max(1, -(-images // 200)), args.model, args.img_size)
        else:
            model = args.results / args.method / "model.pt"
            manifest, root = args.results / "manifest.parquet", args.results / "data"
            if not model.exists():
                sys.exit(f"{model} not found: run `make run` first (or pass --full)")
        warm = max(batch, images // 8)
        t_small = timed_extract(model, manifest, root, tmp / "warm", warm, batch, args.device, args.threads)
        t_big = timed_extract(model, manifest, root, tmp / "big", images, batch, args.device, args.threads)
        rate = (images - warm) / max(t_big - t_small, 1e-9)
        sizes = {p.name: p.stat().st_size for p in (tmp / "big").glob("*.parquet")}
        print(f"preset {'full' if args.full else 'default/' + args.method}: {images} images, batch {batch}, "
              f"device {args.device}")
        print(f"  wall {t_big:.1f} s for {images} images ({images / t_big:.1f} img/s overall); "
              f"marginal {rate:.1f} img/s (excluding the first {warm} images' warm-up)")
        print("  table sizes: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(sizes.items())))
        if args.full:
            print(f"  target >= {TARGET_FULL:.0f} img/s: {'PASS' if rate >= TARGET_FULL else 'FAIL'}")
        if args.json_out:
            result = {"benchmark": "extract_throughput", "preset": "full" if args.full else f"default/{args.method}",
                      "model": args.model if args.full else str(model), "img_size": args.img_size if args.full else None,
                      "images": images, "batch": batch, "device": args.device, "marginal_img_s": rate,
                      "overall_img_s": images / t_big, "table_bytes": sizes,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.json_out, "a") as f:
                f.write(json.dumps(result) + "\n")
        if args.memory:
            quarter = max(batch, images // 4)
            one = peak_rss_mb(model, manifest, root, tmp / "m1", quarter, batch, args.device, args.threads)
            four = peak_rss_mb(model, manifest, root, tmp / "m4", 4 * quarter, batch, args.device, args.threads)
            print(f"  peak RSS: {quarter} images {one:.0f} MB, {4 * quarter} images {four:.0f} MB "
                  f"(ratio {four / one:.2f})")


if __name__ == "__main__":
    main()
