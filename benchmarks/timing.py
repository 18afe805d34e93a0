"""What the benchmark scripts share: preset choice, timing, the training-step timer."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def choose_preset(args: argparse.Namespace, device: torch.device, presets: dict, keys: Sequence[str]) -> str:
    """The preset's name (small on CPU, full on CUDA, unless --small/--full); fills unset ``keys`` from it."""
    name = "small" if args.small else "full" if args.full else ("full" if device.type == "cuda" else "small")
    for key in keys:
        if getattr(args, key) is None:
            setattr(args, key, presets[name][key])
    return name


def choose_vit_preset(args: argparse.Namespace, device: torch.device, presets: dict, keys: Sequence[str]) -> str:
    """``choose_preset`` for a timm ViT preset (``model``, ``kwargs``): also sets ``args.model_kwargs``.

    The preset's architecture overrides belong to its model name only: a
    ``--model`` of another name gets none.
    """
    model_given = args.model is not None
    name = choose_preset(args, device, presets, ("model", *keys))
    preset = presets[name]
    args.model_kwargs = dict(preset["kwargs"]) if not model_given or args.model == preset["model"] else {}
    return name


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Largest absolute difference, and that over the largest magnitude of ``b``."""
    diff = (a.float() - b.float()).abs().max().item()
    return diff, diff / max(b.float().abs().max().item(), 1e-12)


def add_timing_arguments(parser: argparse.ArgumentParser, check_batch: int) -> None:
    """The options every training-throughput benchmark takes."""
    parser.add_argument("--ref-batch", type=int, help="batch size of the reference path (default: --batch)")
    parser.add_argument("--steps", type=int, help="timed steps per path (50 / small: 30)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (10 / small: 3)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per path, interleaved; "
                                                              "--steps is split over them, the median is reported")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="the fast path's autocast (auto: bf16 on CUDA, fp32 on CPU); the reference is fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode, e.g. max-autotune-no-cudagraphs, reduce-overhead (CUDA graphs)")
    parser.add_argument("--no-reference", action="store_true", help="time the fast path only")
    parser.add_argument("--check-batch", type=int, default=check_batch, help="images for the logits/gradients check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, help="append one JSON line with the results")


class Trainer:
    """One path's training step (forward, cross-entropy, backward, optional clip, optimizer step) on fixed data.

    Args:
        name: the path's label in the table.
        forward: images -> logits.
        optimizer: the path's optimizer (over its own copy of the weights).
        images: a fixed batch.
        labels: its labels.
        amp_dtype: autocast dtype, or None for fp32.
        device: where it runs.
        compiled: ``forward`` is torch.compile'd (marks CUDA-graph steps).
        clip: optional (parameters, max norm) for gradient clipping.
    """

    def __init__(self, name: str, forward: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                 images: torch.Tensor, labels: torch.Tensor, amp_dtype: torch.dtype | None,
                 device: torch.device, compiled: bool = False,
                 clip: tuple[list[torch.Tensor], float] | None = None) -> None:
        self.name, self.forward, self.optimizer, self.images, self.labels = name, forward, optimizer, images, labels
        self.amp_dtype, self.device, self.compiled, self.clip = amp_dtype, device, compiled, clip
        self.rounds: list[float] = []  # img/s of each timed round
        self.peak_mem_gib = 0.0
        self.warmup_s = 0.0

    def step(self) -> torch.Tensor:
        if self.compiled:  # a new iteration for CUDA-graph trees (--compile-mode reduce-overhead)
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            logits = self.forward(self.images)
        loss = F.cross_entropy(logits.float(), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            nn.utils.clip_grad_norm_(*self.clip)
        self.optimizer.step()
        return loss

    def warmup(self, steps: int) -> None:
        """Untimed steps (the first ones also compile, autotune and allocate)."""
        started = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        self.warmup_s += time.perf_counter() - started

    def timed_round(self, steps: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        synchronize(self.device)
        started = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        synchronize(self.device)
        elapsed = time.perf_counter() - started
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.name}: loss became {loss.item()} while timing")
        self.rounds.append(self.images.shape[0] * steps / elapsed)
        if self.device.type == "cuda":
            self.peak_mem_gib = max(self.peak_mem_gib, torch.cuda.max_memory_allocated(self.device) / 2**30)

    def summary(self) -> dict:
        img_s = statistics.median(self.rounds)
        return {"img_s": img_s, "s_per_step": self.images.shape[0] / img_s, "rounds_img_s": self.rounds,
                "warmup_s": self.warmup_s,
                **({"peak_mem_gib": self.peak_mem_gib} if self.device.type == "cuda" else {})}


def run_interleaved(trainers: Sequence["Trainer"], meta: Sequence[dict], warmup: int, steps: int,
                    rounds: int) -> list[dict]:
    """Warm every path up, then time them in interleaved rounds; one row (meta + summary) per path.

    Interleaving with the median per path means a load change on a shared
    machine hits every path alike.
    """
    for trainer in trainers:
        trainer.warmup(warmup)
    steps_per_round = max(1, -(-steps // rounds))
    for _ in range(rounds):
        for trainer in trainers:
            trainer.timed_round(steps_per_round)
    return [dict(m, steps=steps_per_round * rounds, **t.summary()) for m, t in zip(meta, trainers)]
