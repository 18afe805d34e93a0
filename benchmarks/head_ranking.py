"""Head ranking by greedy blurring: the batched implementation against the paper's loop.

Times ``intr.ranking.rank_heads_by_blurring`` (the trunk once per image,
every candidate blur set of a round through the rest of the last block in
one batch) against ``intr.ranking.rank_heads_naive`` (the paper's loop: the
whole model rerun for every candidate head, image by image) in the same run,
on the same Prompt-CAM model and images:

* ``single``: one image (the batched call repeated, median);
* ``batch``: N images in one batched call; the naive loop runs on the first
  M of them (it is slow) and is reported per image.

The naive loop runs in strict fp32 (TF32 off), as the official code does.
The batched calls are timed in ``--dtype`` (default fp32, TF32 off; tf32 and
bf16 autocast are offered).  Ranks are checked in fp32: the batched ranks must
equal the naive loop's (same removal order) on every image where both ran,
except where the first diverging round is a near-tie (the two choices' target
logits within ``--tie-tol``), which is reported as such.  When the timed dtype
is not fp32, its ranks' agreement with the fp32 ranks is reported too, for
information: with random weights the heads' effects are tiny and bf16 noise
reorders them.

    python benchmarks/head_ranking.py                           # small preset on CPU, full on CUDA
    python benchmarks/head_ranking.py --small --batch 32 --naive-images 4
    python benchmarks/head_ranking.py --full --device cuda --batch 256 --json-out results/bench/ranking.jsonl
    python benchmarks/head_ranking.py --full --device cuda --dtype bf16    # bf16 autocast timing

The issue's targets (ViT-B/16, 224 px, 200 classes, H200): identical ranks,
>= 30x faster for a single image, >= 500x per image in batches; the official
loop takes 0.31 s/image on an H200.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from intr.models import resolve_device
from intr.models.backbones import BackboneSpec, create_backbone
from intr.models.prompt_cam import PromptCAM
from intr.ranking import HeadRanking, rank_heads_by_blurring, rank_heads_naive
from timing import choose_vit_preset, synchronize

OFFICIAL_S_PER_IMAGE = 0.31  # the official loop on an H200 (ViT-B/16, 224 px, 200 classes)
TARGET_SINGLE = 30.0
TARGET_BATCH = 500.0

PRESETS = {
    "full": dict(model="vit_base_patch16_224", img_size=224, classes=200, batch=256, naive_images=16, repeats=20,
                 kwargs={}),
    "small": dict(model="vit_tiny_patch16_224", img_size=64, classes=12, batch=32, naive_images=8, repeats=10,
                  kwargs=dict(patch_size=8, embed_dim=96, depth=6, num_heads=6)),
}


def resolve_preset(args: argparse.Namespace, device: torch.device) -> str:
    """Fill unset options from the preset (small on CPU, full on CUDA, unless --small/--full)."""
    return choose_vit_preset(args, device, PRESETS, ("img_size", "classes", "batch", "naive_images", "repeats"))


def build_model(args: argparse.Namespace, device: torch.device) -> PromptCAM:
    if args.model_pt:
        from intr.models import load_model

        model, config = load_model(args.model_pt, map_location="cpu")
        if not isinstance(model, PromptCAM):
            sys.exit(f"{args.model_pt}: not a Prompt-CAM model ({config.get('method')})")
        args.model, args.classes = config["model"]["backbone"]["name"], model.num_classes
        args.img_size = int(model.backbone.patch_embed.img_size[0])
        return model.to(device).eval()
    kwargs = dict(args.model_kwargs, img_size=args.img_size)
    backbone = create_backbone(BackboneSpec(name=args.model, pretrained=False, kwargs=kwargs), num_classes=0)
    return PromptCAM(backbone, args.classes).to(device).eval()


@contextlib.contextmanager
def precision(mode: str, device: torch.device) -> Iterator[None]:
    """fp32 (TF32 off), tf32 (TF32 matmuls and convolutions) or bf16 (autocast)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def timed(fn, device: torch.device) -> tuple[float, object]:
    synchronize(device)
    started = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - started, out


def first_divergence(model: PromptCAM, image: torch.Tensor, target: torch.Tensor,
                     batched: torch.Tensor, naive: torch.Tensor) -> tuple[float, str]:
    """Where two removal orders first differ: the target-logit gap between the two choices there.

    Rerun in fp32 the way the naive loop does; a gap within fp32 noise is a
    near-tie (either choice is right), anything larger is a wrong ranking.
    """
    r = int((batched != naive).nonzero()[0])
    blurred = torch.zeros(1, 1, model.num_heads, dtype=torch.bool, device=image.device)
    blurred[0, 0, naive[:r]] = True
    found = []
    for head in (int(batched[r]), int(naive[r])):
        trial = blurred.clone()
        trial[0, 0, head] = True
        logits, _ = model.forward_with_maps(image, target.view(1, 1), blur=trial)
        found.append((head, logits[0, target].item(), torch.softmax(logits.double(), 1)[0, target].item()))
    (hb, lb, pb), (hn, ln, pn) = found
    gap = abs(lb - ln)
    return gap, (f"round {r + 1}: batched blurs head {hb} (p={pb:.9f}), naive head {hn} (p={pn:.9f}); "
                 f"target-logit gap {gap:.3g}")


def spearman(rank_a: torch.Tensor, rank_b: torch.Tensor) -> torch.Tensor:
    """Spearman's rho per row of two (B, H) rank permutations."""
    H = rank_a.shape[1]
    d2 = (rank_a - rank_b).double().pow(2).sum(dim=1)
    return 1 - 6 * d2 / (H * (H * H - 1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--small", action="store_true", help="CPU-sized preset (the default without CUDA)")
    preset.add_argument("--full", action="store_true", help="ViT-B/16, 224 px, 200 classes (the default with CUDA)")
    parser.add_argument("--model", help="timm ViT name, built with pretrained=False")
    parser.add_argument("--model-pt", type=Path, help="a trained Prompt-CAM model.pt instead of random weights")
    parser.add_argument("--img-size", type=int, help="image side in pixels (224 / small: 64)")
    parser.add_argument("--classes", type=int, help="number of classes (200 / small: 12)")
    parser.add_argument("--batch", type=int, help="N, images of the batched call (256 / small: 32)")
    parser.add_argument("--naive-images", type=int, help="M, the first images the naive loop ranks (16 / small: 8)")
    parser.add_argument("--repeats", type=int, help="timed repeats of the batched calls, median (20 / small: 10)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "tf32", "bf16"],
                        help="precision of the timed batched calls (fp32 with TF32 off: the ranks checked)")
    parser.add_argument("--tie-tol", type=float, default=1e-5,
                        help="a rank difference whose first diverging round's two choices give target logits "
                             "within this of each other (fp32) is a near-tie, not a failure (default 1e-5)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, help="append one JSON line with the results")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    preset_name = resolve_preset(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args, device)
    N, M = args.batch, min(args.naive_images, args.batch)
    heads = model.num_heads
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"preset {preset_name}: {args.model} {args.model_kwargs if not args.model_pt else args.model_pt} "
          f"img {args.img_size} px, {heads} heads, {len(model.backbone.blocks)} blocks, {args.classes} classes")
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"batched in {args.dtype}, naive loop in fp32")

    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(N, 3, args.img_size, args.img_size, generator=generator).to(device)
    target = torch.randint(0, args.classes, (N,), generator=generator).to(device)

    # (a) one image, batched: warm up, then the median of repeats.
    with precision(args.dtype, device):
        rank_heads_by_blurring(model, images[:1], target[:1])
        single = [timed(lambda: rank_heads_by_blurring(model, images[:1], target[:1]), device)[0]
                  for _ in range(args.repeats)]
        # (b) N images in one call.
        rank_heads_by_blurring(model, images, target)
        runs = [timed(lambda: rank_heads_by_blurring(model, images, target), device) for _ in range(args.repeats)]
    batched_single_s = statistics.median(single)
    batched_batch_s = statistics.median(t for t, _ in runs) / N
    timed_ranking: HeadRanking = runs[-1][1]

    # The paper's loop, fp32, image by image on the first M images (after one warm-up forward).
    with precision("fp32", device), torch.no_grad():
        model(images[:1])
        naive_times, naive_parts = [], []
        for b in range(M):
            t, r = timed(lambda: rank_heads_naive(model, images[b:b + 1], target[b:b + 1]), device)
            naive_times.append(t)
            naive_parts.append(r)
        naive = HeadRanking(*(torch.cat([getattr(r, f) for r in naive_parts]) for f in
                              ("order", "rank", "prob_after_blur", "prob")))
        reference = timed_ranking if args.dtype == "fp32" else rank_heads_by_blurring(model, images, target)
    naive_single_s = statistics.median(naive_times)
    naive_batch_s = sum(naive_times) / M

    # Identical ranks (removal order) in fp32 where both ran.
    same = (reference.order[:M] == naive.order).all(dim=1)
    agree = int(same.sum())
    prob_diff = (reference.prob_after_blur[:M] - naive.prob_after_blur).abs().max().item()
    details, ties = [], 0
    with precision("fp32", device), torch.no_grad():
        for b in (~same).nonzero().flatten().tolist():
            gap, text = first_divergence(model, images[b:b + 1], target[b:b + 1], reference.order[b],
                                         naive.order[b])
            tie = gap <= args.tie_tol
            ties += tie
            details.append(f"image {b}: {text}" + (f" <= {args.tie_tol:g}: a near-tie" if tie else ": WRONG"))
    print(f"\nranks, batched fp32 vs naive fp32 on {M} images: identical order on {agree}/{M}"
          + (f" ({ties} more differ only after a near-tie)" if ties else "")
          + f"; max |prob_after_blur diff| {prob_diff:.3g}")
    for line in details:
        print("  " + line)
    low_precision = None
    if args.dtype != "fp32":
        exact = (timed_ranking.order == reference.order).all(dim=1).float().mean().item()
        top1 = (timed_ranking.order[:, -1] == reference.order[:, -1]).float().mean().item()
        rho = spearman(timed_ranking.rank, reference.rank).mean().item()
        low_precision = {"exact_order": exact, "top1_head": top1, "spearman": rho}
        print(f"  {args.dtype} batched vs fp32 batched on {N} images: identical order {exact:.1%}, "
              f"same rank-1 head {top1:.1%}, mean Spearman {rho:.3f} (information only)")

    rows = [
        dict(mode="single", images=1, naive_images=1, batched_s=batched_single_s, naive_s=naive_single_s),
        dict(mode="batch", images=N, naive_images=M, batched_s=batched_batch_s, naive_s=naive_batch_s),
    ]
    print()
    header = f"{'mode':<7} {'images':>12} {'s/image batched':>16} {'s/image naive':>14} {'speedup':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        row["speedup"] = row["naive_s"] / row["batched_s"]
        count = f"{row['images']}" + (f" (naive {row['naive_images']})" if row["naive_images"] != row["images"] else "")
        print(f"{row['mode']:<7} {count:>12} {row['batched_s']:>16.3e} {row['naive_s']:>14.3e} "
              f"{row['speedup']:>8.1f}x")
    for row, goal in zip(rows, (TARGET_SINGLE, TARGET_BATCH)):
        row["target"] = goal
        row["speedup_vs_official"] = OFFICIAL_S_PER_IMAGE / row["batched_s"]
    if preset_name == "full" and device.type == "cuda":
        print()
        for row in rows:
            print(f"{row['mode']}: {row['speedup']:.0f}x the naive loop of this run, "
                  f"{row['speedup_vs_official']:.0f}x the official {OFFICIAL_S_PER_IMAGE} s/image; target >= "
                  f"{row['target']:.0f}x: {'PASS' if min(row['speedup'], row['speedup_vs_official']) >= row['target'] else 'FAIL'}")
    else:
        print(f"\n(the targets, >= {TARGET_SINGLE:.0f}x single and >= {TARGET_BATCH:.0f}x batched, are for the "
              f"full preset on an H200)")
    sys.stdout.flush()

    result = {"benchmark": "head_ranking", "preset": preset_name, "model": args.model,
              "model_kwargs": args.model_kwargs, "img_size": args.img_size, "classes": args.classes, "heads": heads,
              "device": device.type, "device_name": name, "torch": torch.__version__, "dtype": args.dtype,
              "rows": rows, "ranks_identical": agree, "ranks_near_tie": ties, "ranks_compared": M, "max_prob_diff": prob_diff,
              "divergences": details, "low_precision_agreement": low_precision,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")
    if agree + ties != M:
        sys.exit(f"ranks differ between the batched and the naive ranking on {M - agree - ties}/{M} images "
                 f"(beyond near-ties)")
    return result


if __name__ == "__main__":
    main()
