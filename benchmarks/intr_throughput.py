"""Training throughput of INTR: this implementation against the official computation.

One training step is forward + cross-entropy + backward + gradient clipping
(max norm 0.1) + AdamW step, the backbone trainable with its own learning
rate (the CUB recipe's lr 5e-5, backbone 1e-5, weight decay 1e-6).  Two paths
are timed in the same run, on the same weights, images and labels:

* ``intr``: ``intr.models.intr.INTR`` (fused ``scaled_dot_product_attention``
  in every encoder and decoder attention), under bf16 autocast with a
  channels-last backbone on CUDA (fp32, contiguous on CPU), optionally
  ``torch.compile``-d.
* ``reference``: what the official INTR code (DETR's transformer with
  ``nn.MultiheadAttention``, which writes the attention out whenever it
  returns weights) computes, written out here as a walk over the same
  ``model.transformer`` layers: ``softmax(q k^T / sqrt(d) + padding mask) @ v``
  explicitly in fp32 in every encoder and decoder attention, every decoder
  layer's cross-attention computed twice (once for the output and the
  per-head weights, once more for the head-averaged weights), the per-layer
  normed decoder outputs and both weight stacks kept, no autocast.

Before timing, both paths are run in fp32 (TF32 off) in eval mode on the same
weights and their logits (and the gradients of all trainable weights) are
compared; the script exits non-zero if they differ.

    python benchmarks/intr_throughput.py                        # small preset on CPU, full on CUDA
    python benchmarks/intr_throughput.py --small --threads 1    # CPU-sized model
    python benchmarks/intr_throughput.py --full --device cuda --compile --json-out results/bench/intr.jsonl

The issue's target: >= 537 img/s on an H200 for the paper's recipe (ResNet-50,
512 px, 200 classes, batch 12), 3x the official code's 179 img/s (fp32).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from intr.models import resolve_device
from intr.models.intr import INTR, build_intr, sine_position
from timing import Trainer, add_timing_arguments, choose_preset, relative_max_diff, run_interleaved

OFFICIAL_IMG_S = 179.0  # the official INTR code on an H200, fp32, ResNet-50 512 px, 200 classes, batch 12
TARGET_IMG_S = 3 * OFFICIAL_IMG_S  # 537
LR, BACKBONE_LR, WEIGHT_DECAY, CLIP_GRAD = 5e-5, 1e-5, 1e-6, 0.1  # config/cub.yaml's intr.train

PRESETS = {
    # The paper's recipe: DETR-R50 (timm resnet50, frozen batch norm), d=256, 8 heads, 6+6 layers, 512 px.
    "full": dict(backbone={"name": "resnet50", "pretrained": False, "kwargs": {}},
                 transformer=dict(d_model=256, heads=8, encoder_layers=6, decoder_layers=6, ffn=2048, dropout=0.1),
                 img_size=512, classes=200, batch=12, steps=50, warmup=10),
    # CPU-sized: the default config's 6-block, 96-wide ViT (8 px patches, 64 px images) and 2+2 layers.
    "small": dict(backbone={"name": "vit_tiny_patch16_224", "pretrained": False,
                            "kwargs": {"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 6,
                                       "num_heads": 6}},
                  transformer=dict(d_model=128, heads=8, encoder_layers=2, decoder_layers=2, ffn=512, dropout=0.1),
                  img_size=64, classes=12, batch=32, steps=30, warmup=3),
}


# --------------------------------------------------------------------------- the reference path


def _explicit_attention(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        key_bias: torch.Tensor | None, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.MultiheadAttention(need_weights=True)``'s computation on ``attn``'s weights.

    Returns the output and the (dropped-out) attention weights, head-averaged
    (B, Lq, Lk) or per head (B, heads, Lq, Lk), as torch returns them.
    """
    heads, head_dim = attn.heads, attn.head_dim
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    split = lambda t: t.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # noqa: E731
    q = split(F.linear(query, w_q, b_q))
    k = split(F.linear(key, w_k, b_k))
    v = split(F.linear(value, w_v, b_v))
    logits = (q * head_dim ** -0.5) @ k.transpose(-2, -1)  # (B, heads, Lq, Lk)
    if key_bias is not None:  # the official's key padding mask (all pixels valid) as an additive bias
        logits = logits + key_bias
    weights = F.dropout(logits.softmax(dim=-1), attn.dropout, attn.training)
    out = attn.out_proj((weights @ v).transpose(1, 2).flatten(-2))
    return out, weights.mean(dim=1) if average else weights


class ReferenceINTR(nn.Module):
    """The official INTR forward on ``model``'s weights, walking ``model.transformer``'s layers.

    Same backbone, input projection, positional encoding and post-norm layers
    as :class:`INTR`; every attention written out in fp32; each decoder
    layer's cross-attention run twice (per-head weights with the output, then
    the averaged weights); the decoder's per-layer normed outputs and the
    stacked weights of all layers are kept (the official code returns them).
    """

    def __init__(self, model: INTR) -> None:
        super().__init__()
        self.model = model
        self.attention_maps: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        encoder, decoder = m.transformer.encoder, m.transformer.decoder
        features = m.input_proj(m.backbone(images))
        b, d, h, w = features.shape
        src = features.flatten(2).transpose(1, 2)
        pos = sine_position(b, h, w, d, src.device, src.dtype)
        key_bias = src.new_zeros(b, 1, 1, h * w)
        for layer in encoder.layers:
            qk = src + pos
            out, _ = _explicit_attention(layer.self_attn, qk, qk, src, key_bias, average=True)
            src = layer.norm1(src + layer.dropout(out))
            src = layer.norm2(src + layer.dropout(layer.linear2(layer.dropout(F.relu(layer.linear1(src))))))
        memory = src
        query_pos = m.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        tgt = torch.zeros_like(query_pos)
        intermediate, per_head, averaged = [], [], []
        for layer in decoder.layers:
            qk = tgt + query_pos
            out, _ = _explicit_attention(layer.self_attn, qk, qk, tgt, None, average=True)
            tgt = layer.norm1(tgt + layer.dropout(out))
            query, key = tgt + query_pos, memory  # INTR: no positional encoding on decoder keys
            out, head_weights = _explicit_attention(layer.multihead_attn, query, key, memory, key_bias, average=False)
            _, avg_weights = _explicit_attention(layer.multihead_attn, query, key, memory, key_bias, average=True)
            tgt = layer.norm2(tgt + layer.dropout(out))
            tgt = layer.norm3(tgt + layer.dropout(layer.linear2(layer.dropout(F.relu(layer.linear1(tgt))))))
            intermediate.append(decoder.norm(tgt))
            per_head.append(head_weights)
            averaged.append(avg_weights)
        hs = torch.stack(intermediate)
        self.attention_maps = (torch.stack(per_head), torch.stack(averaged))  # held until the next step
        return m.presence_head(hs[-1]).squeeze(-1)


# --------------------------------------------------------------------------- set-up


def resolve_preset(args: argparse.Namespace, device: torch.device) -> str:
    """Fill unset options from the preset (small on CPU, full on CUDA, unless --small/--full)."""
    name = choose_preset(args, device, PRESETS, ("img_size", "classes", "batch", "steps", "warmup"))
    preset = PRESETS[name]
    backbone = copy.deepcopy(preset["backbone"])
    if "img_size" in backbone["kwargs"]:  # a ViT's position grid follows --img-size
        backbone["kwargs"]["img_size"] = args.img_size
    args.backbone, args.transformer = backbone, dict(preset["transformer"])
    return name


def build_model(args: argparse.Namespace, device: torch.device) -> INTR:
    options = {"backbone": args.backbone, "transformer": args.transformer, "freeze_backbone": False}
    return build_intr(options, args.classes, args.img_size).to(device)


def param_groups(model: INTR) -> list[dict]:
    """As ``intr.train``: the backbone's trainable weights get their own learning rate."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(p)
    return [{"params": rest, "lr": LR}, {"params": backbone, "lr": BACKBONE_LR}]


class _StrictFP32:
    """TF32 off for matmuls and cuDNN convolutions while the fp32 check runs."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


# --------------------------------------------------------------------------- checks and timing


def check_equivalence(model: INTR, fast_model: INTR, images: torch.Tensor, labels: torch.Tensor,
                      amp_dtype: torch.dtype | None, channels_last: bool, device: torch.device) -> dict:
    """fp32 eval-mode logits and gradients of both paths on the same weights; the timed setting's logits too."""
    reference = ReferenceINTR(model)
    grads, logits = {}, {}
    model.eval()
    with _StrictFP32():
        for name, forward in (("intr", model), ("reference", reference)):
            model.zero_grad(set_to_none=True)
            out = forward(images)
            F.cross_entropy(out, labels).backward()
            logits[name] = out.detach()
            grads[name] = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    model.train()
    reference.attention_maps = None
    abs_l, rel_l = relative_max_diff(logits["intr"], logits["reference"])
    # Over all trainable weights together: the presence bias's gradient is ~0 (softmax gradients sum to 0).
    rel_g = relative_max_diff(torch.cat([g.flatten() for g in grads["intr"]]),
                               torch.cat([g.flatten() for g in grads["reference"]]))[1]
    result = {"logits_max_abs_diff": abs_l, "logits_max_rel_diff": rel_l, "grads_max_rel_diff": rel_g,
              "logits_match": rel_l <= 1e-4, "grads_match": rel_g <= 1e-3,
              "same_argmax": bool((logits["intr"].argmax(1) == logits["reference"].argmax(1)).all())}
    if amp_dtype is not None or channels_last:
        fast_model.eval()
        timed_images = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                             enabled=amp_dtype is not None):
            low = fast_model(timed_images)
        fast_model.train()
        result["timed_setting_logits_max_rel_diff"] = relative_max_diff(low, logits["reference"])[1]
    return result


def adamw(model: INTR, fused: bool) -> torch.optim.AdamW:
    """config/cub.yaml's optimiser: AdamW with its own backbone learning rate."""
    return torch.optim.AdamW(param_groups(model), lr=LR, weight_decay=WEIGHT_DECAY,
                             **({"fused": True} if fused else {}))


def clip(model: INTR) -> tuple[list[torch.Tensor], float]:
    return [p for p in model.parameters() if p.requires_grad], CLIP_GRAD


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--small", action="store_true", help="CPU-sized preset (the default without CUDA)")
    preset.add_argument("--full", action="store_true", help="the paper's recipe: ResNet-50, 512 px, 200 classes, "
                                                            "batch 12 (the default with CUDA)")
    parser.add_argument("--img-size", type=int, help="image side in pixels (512 / small: 64)")
    parser.add_argument("--classes", type=int, help="number of classes = decoder queries (200 / small: 12)")
    parser.add_argument("--batch", type=int, help="batch size of both paths (12 / small: 32)")
    parser.add_argument("--memory-format", default="auto", choices=["auto", "channels_last", "contiguous"],
                        help="the fast path's backbone weights and images (auto: channels_last on CUDA)")
    parser.add_argument("--fused-adamw", action="store_true", help="torch.optim.AdamW(fused=True) for the fast "
                                                                   "path (CUDA; the training code uses the plain one)")
    add_timing_arguments(parser, check_batch=4)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    preset_name = resolve_preset(args, device)
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    if args.memory_format == "auto":
        args.memory_format = "channels_last" if device.type == "cuda" else "contiguous"
    amp_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    channels_last = args.memory_format == "channels_last"
    fused = args.fused_adamw and device.type == "cuda"
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args, device)
    generator = torch.Generator().manual_seed(args.seed)
    ref_batch = args.ref_batch or args.batch
    images = torch.randn(max(args.batch, ref_batch), 3, args.img_size, args.img_size, generator=generator).to(device)
    labels = torch.randint(0, args.classes, (images.shape[0],), generator=generator).to(device)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    grid, cfg = model.grid_size, model.cfg
    bb = args.backbone
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"preset {preset_name}: {bb['name']} {bb['kwargs'] or ''} img {args.img_size} px, grid {grid[0]}x{grid[1]}, "
          f"d {cfg.d_model}, {cfg.heads} heads, {cfg.encoder_layers}+{cfg.decoder_layers} layers, ffn {cfg.ffn}, "
          f"dropout {cfg.dropout}, {args.classes} classes; {params / 1e6:.2f} M weights, "
          f"{trainable / 1e6:.2f} M trainable")
    print(f"device {device} ({gpu}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"tf32 matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn tf32 {torch.backends.cudnn.allow_tf32}; "
          f"AdamW lr {LR:g} (backbone {BACKBONE_LR:g}), weight decay {WEIGHT_DECAY:g}, clip {CLIP_GRAD:g}")

    fast_model = copy.deepcopy(model)
    fast_images = images[:args.batch]
    if channels_last:
        fast_model.backbone.to(memory_format=torch.channels_last)
        fast_images = fast_images.contiguous(memory_format=torch.channels_last)

    # Same logits: both paths in fp32, eval mode, on the same weights.
    n = min(args.check_batch, images.shape[0])
    check = check_equivalence(model, fast_model, images[:n], labels[:n], amp_dtype, channels_last, device)
    verdict = "OK" if check["logits_match"] and check["grads_match"] else "MISMATCH"
    print(f"fp32 eval check on {n} images: logits max |diff| {check['logits_max_abs_diff']:.3g} "
          f"(relative {check['logits_max_rel_diff']:.3g}, tol 1e-4), "
          f"gradients relative {check['grads_max_rel_diff']:.3g} "
          f"(tol 1e-3), same argmax {check['same_argmax']}: {verdict}")
    if "timed_setting_logits_max_rel_diff" in check:
        print(f"  {args.dtype} {args.memory_format} fast path vs fp32 reference: logits relative max diff "
              f"{check['timed_setting_logits_max_rel_diff']:.3g} (information only)")
    if verdict != "OK":
        sys.exit("the fast path's logits/gradients differ from the reference's (see the check above)")

    trainers, meta = [], []
    if not args.no_reference:
        ref_model = copy.deepcopy(model)
        trainers.append(Trainer("reference", ReferenceINTR(ref_model), adamw(ref_model, fused=False),
                                images[:ref_batch], labels[:ref_batch], None, device, clip=clip(ref_model)))
        meta.append(dict(path="reference", dtype="fp32", memory_format="contiguous", batch=ref_batch,
                         compile=False, fused_adamw=False))
    fast: Callable = torch.compile(fast_model, mode=args.compile_mode) if args.compile else fast_model
    label = "intr" + ("+compile" if args.compile else "") + ("+fused_adamw" if fused else "")
    trainers.append(Trainer(label, fast, adamw(fast_model, fused), fast_images, labels[:args.batch], amp_dtype,
                            device, compiled=args.compile, clip=clip(fast_model)))
    meta.append(dict(path=label, dtype=args.dtype, memory_format=args.memory_format, batch=args.batch,
                     compile=args.compile, fused_adamw=fused))
    rows = run_interleaved(trainers, meta, args.warmup, args.steps, args.rounds)

    base = rows[0]["img_s"]
    print()
    header = (f"{'path':<26} {'device':<6} {'dtype':<5} {'layout':<8} {'batch':>5} {'img/s':>10} {'ms/step':>9} "
              f"{'speedup':>8}")
    if device.type == "cuda":
        header += f" {'peak GiB':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        layout = "NHWC" if row["memory_format"] == "channels_last" else "NCHW"
        line = (f"{row['path']:<26} {device.type:<6} {row['dtype']:<5} {layout:<8} {row['batch']:>5} "
                f"{row['img_s']:>10.1f} {row['s_per_step'] * 1e3:>9.2f} {row['img_s'] / base:>7.2f}x")
        if device.type == "cuda":
            line += f" {row['peak_mem_gib']:>9.2f}"
        print(line)
    fast_img_s = rows[-1]["img_s"]
    if preset_name == "full" and device.type == "cuda":
        print(f"\ntarget (H200, ResNet-50 512 px, 200 classes, batch 12): >= {TARGET_IMG_S:.0f} img/s: "
              f"{fast_img_s:.0f} img/s {'PASS' if fast_img_s >= TARGET_IMG_S else 'FAIL'}; "
              f"official code {OFFICIAL_IMG_S:.0f} img/s (fp32, batch 12) -> {fast_img_s / OFFICIAL_IMG_S:.1f}x")
    else:
        print(f"\n(the {TARGET_IMG_S:.0f} img/s target is for the full preset on an H200)")
    sys.stdout.flush()

    result = {"benchmark": "intr_throughput", "preset": preset_name, "backbone": args.backbone,
              "transformer": args.transformer, "img_size": args.img_size, "classes": args.classes,
              "device": device.type, "device_name": gpu, "torch": torch.__version__, "check": check,
              "paths": rows, "speedup": fast_img_s / base if not args.no_reference else None,
              "speedup_vs_official": fast_img_s / OFFICIAL_IMG_S
              if preset_name == "full" and device.type == "cuda" else None,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
