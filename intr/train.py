"""``intr train``: one training loop for Prompt-CAM and INTR.

Guarantees, the same for every method:

* a checkpoint after every epoch, written atomically; rerunning the same
  command after the process died (even ``kill -9``) resumes from the last
  one, and on CPU with a fixed seed ends with the same metrics as a run that
  was never interrupted (data order and augmentation are seeded per epoch and
  sample; the torch RNG state travels in the checkpoint);
* a NaN or infinite loss stops training with a clear error and leaves the
  last good checkpoint in place;
* checkpoints load with ``weights_only=True``;
* multi-GPU (or multi-process CPU) through torchrun/DDP in one process group:
  each global batch is split across ranks, so the averaged gradient equals the
  single-process gradient of the same batch;
* bf16 autocast on CUDA; ``train_log.parquet`` with one row per epoch; a
  progress bar per epoch.

``model.pt`` holds the trainable weights of the epoch with the best
validation accuracy plus the model config needed to rebuild the rest (the
frozen backbone comes from its own weights file).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from analysis.config import defaults
from intr import precision
from intr.data.images import ImageSet, read_split
from intr.models import CheckpointError, build_model, read_checkpoint, resolve_device
from intr.models.checkpoint import class_record, save_checkpoint
from intr.models.backbones import normalization
from analysis.tables import write_table


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


TRAIN = defaults("prompt_cam")["train"]  # the config schema's defaults ($defs/train, both methods)


@dataclass
class TrainOptions:
    """Optimiser, schedule and loop settings (the config's ``train`` section).

    Args:
        epochs: number of epochs.
        batch_size: global batch size (split across DDP ranks).
        optimizer: ``sgd`` (the Prompt-CAM paper: momentum 0.9) or ``adamw``.
        lr: peak learning rate.
        backbone_lr: learning rate of trainable backbone weights (INTR), else ``lr``.
        weight_decay: weight decay.
        momentum: SGD momentum.
        warmup_epochs: linear warm-up before the cosine decay.
        schedule: ``cosine`` (per step), ``cosine_per_epoch`` (Prompt-CAM's timm schedule) or
            ``step`` (INTR's: lr x 0.1 every ``lr_drop_epochs``).
        min_lr: the cosine schedules' final learning rate.
        lr_drop_epochs: epochs between the step schedule's drops.
        crop_area: [min, max] area fraction of the augmentation's random square-ish crop.
        clip_grad: gradient norm clip (0: off).
        label_smoothing: cross-entropy label smoothing.
        seed: seed of initialisation, data order and augmentation.
        workers: data-loading processes.
        amp: bf16 autocast on CUDA.
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    epochs: int = TRAIN["epochs"]
    batch_size: int = TRAIN["batch_size"]
    optimizer: str = TRAIN["optimizer"]
    lr: float = TRAIN["lr"]
    backbone_lr: float | None = TRAIN["backbone_lr"]
    weight_decay: float = TRAIN["weight_decay"]
    momentum: float = TRAIN["momentum"]
    warmup_epochs: int = TRAIN["warmup_epochs"]
    schedule: str = TRAIN["schedule"]
    min_lr: float = TRAIN["min_lr"]
    lr_drop_epochs: int = TRAIN["lr_drop_epochs"]
    crop_area: list[float] = field(default_factory=lambda: list(TRAIN["crop_area"]))
    clip_grad: float = TRAIN["clip_grad"]
    label_smoothing: float = TRAIN["label_smoothing"]
    seed: int = TRAIN["seed"]
    workers: int = TRAIN["workers"]
    amp: bool = TRAIN["amp"]
    device: str = TRAIN["device"]

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> "TrainOptions":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown train option(s): {', '.join(unknown)}")
        return cls(**options)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights that training changes (frozen backbone weights are left out)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers() if not n.startswith("backbone.")}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names | buffers}


# --------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


# --------------------------------------------------------------------------- schedule and optimiser


def lr_at(step: int, total: int, warmup: int, base: float, min_lr: float = 0.0) -> float:
    """This project's schedule: linear warm-up over ``warmup`` steps, then cosine to ``min_lr`` at ``total``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_per_epoch_cosine(epoch: int, epochs: int, warmup: int, base: float, min_lr: float) -> float:
    """Prompt-CAM's schedule (timm's CosineLRScheduler, warm-up from 0, stepped once per epoch).

    The official trainer steps the scheduler after epoch e with e itself, so epoch e trains
    at the schedule's value for e - 1 (epochs 0 and 1 both at the warm-up start), and the
    cosine runs over all epochs counted from 0, warm-up included.
    """
    t = max(epoch - 1, 0)
    if t < warmup:
        return base * t / warmup
    return min_lr + 0.5 * (base - min_lr) * (1.0 + math.cos(math.pi * t / epochs))


def lr_for_step(opts: "TrainOptions", step: int, steps_per_epoch: int, base: float) -> float:
    """Learning rate of a parameter group whose peak is ``base`` at global ``step``.

    Args:
        opts: schedule, epochs, warm-up, min_lr, lr_drop_epochs.
        step: optimizer steps taken so far.
        steps_per_epoch: optimizer steps per epoch.
        base: the group's peak learning rate.
    """
    epoch = step // steps_per_epoch
    if opts.schedule == "cosine":
        return lr_at(step, steps_per_epoch * opts.epochs, steps_per_epoch * opts.warmup_epochs, base, opts.min_lr)
    if opts.schedule == "cosine_per_epoch":
        return lr_per_epoch_cosine(epoch, opts.epochs, opts.warmup_epochs, base, opts.min_lr)
    if opts.schedule == "step":  # INTR: torch's StepLR(step_size=lr_drop), gamma 0.1, stepped per epoch
        return base * 0.1 ** (epoch // opts.lr_drop_epochs)
    raise ValueError(f"unknown schedule {opts.schedule!r}; expected cosine, cosine_per_epoch or step")


def _optimizer(model: nn.Module, opts: TrainOptions) -> torch.optim.Optimizer:
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(p)
    groups = [{"params": rest, "base_lr": opts.lr}]
    if backbone:
        groups.append({"params": backbone, "base_lr": opts.backbone_lr or opts.lr})
    for g in groups:
        g["lr"] = g["base_lr"]
    if opts.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=opts.lr, weight_decay=opts.weight_decay)
    raise ValueError(f"unknown optimizer {opts.optimizer!r}; expected sgd or adamw")


# --------------------------------------------------------------------------- checkpoints


def previous_checkpoint(ckpt_path: Path) -> Path:
    """``last.prev.pt``: the epoch checkpoint before ``last.pt``, the fallback when ``last.pt`` is damaged."""
    return ckpt_path.with_name(f"{ckpt_path.stem}.prev{ckpt_path.suffix}")


def read_resume_checkpoint(ckpt_path: Path, main: bool = True) -> tuple[dict[str, Any] | None, Path | None]:
    """The newest readable epoch checkpoint and its file: ``last.pt``, else ``last.prev.pt``.

    Falling back warns and moves the damaged ``last.pt`` to ``last-damaged.pt``, so the
    next save does not rotate it into ``last.prev.pt``.

    Args:
        ckpt_path: ``checkpoints/last.pt``.
        main: this process renames files (the main DDP rank).

    Raises:
        CheckpointError: no checkpoint is readable; the message says which files to delete.
    """
    candidates = [p for p in (ckpt_path, previous_checkpoint(ckpt_path)) if p.exists()]
    errors: list[CheckpointError] = []
    for path in candidates:
        try:
            saved = read_checkpoint(path)
        except CheckpointError as err:
            errors.append(err)
            continue
        if errors and main:
            damaged = ckpt_path.with_name(f"{ckpt_path.stem}-damaged{ckpt_path.suffix}")
            os.replace(ckpt_path, damaged)
            warnings.warn(f"{errors[0]}; resuming from the previous checkpoint {path} (epoch {saved.get('epoch')}); "
                          f"the damaged file is kept as {damaged.name}", stacklevel=3)
        return saved, path
    if errors:
        raise CheckpointError(f"cannot resume training: {'; '.join(map(str, errors))}. To start over, delete "
                              f"{' and '.join(map(str, candidates))}")
    return None, None


def _config_digest(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _resume_mismatch(saved: Mapping[str, Any], digest: str, fingerprint: str) -> str | None:
    """Why an epoch checkpoint belongs to another run (None: it is this run's).

    Args:
        saved: the checkpoint's contents.
        digest: this run's config digest.
        fingerprint: this run's class fingerprint (checkpoints from before class names were stored have none).
    """
    if saved.get("digest") != digest:
        return "with another config"
    if saved.get("class_fingerprint", fingerprint) != fingerprint:
        return "for other classes"
    return None


# --------------------------------------------------------------------------- data order


class GlobalBatchSampler(Sampler):
    """This rank's share of each global batch, in an order fixed by (seed, epoch).

    One process takes whole batches; N ranks take every N-th image of the
    same batches, so the averaged DDP gradient equals the single-process
    one.  The last incomplete batch is dropped.

    Args:
        size: number of training images.
        batch_size: global batch size.
        seed: seed of the order.
        rank: this process's rank.
        world: number of processes.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        for b in range(len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world].tolist()


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model: nn.Module, data: ImageSet, device: torch.device, batch_size: int = 128,
            amp: bool = True, workers: int = 0) -> torch.Tensor:
    """Logits (N, C) of every image of ``data`` (in order)."""
    model.eval()
    outputs = []
    for images, _ in DataLoader(data, batch_size=batch_size, num_workers=workers):
        images = images.to(device)
        with precision.autocast(device, amp):
            outputs.append(model(images).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)


# --------------------------------------------------------------------------- the loop


def train(method: str, model_options: Mapping[str, Any], train_options: Mapping[str, Any],
          manifest: str | Path, root: str | Path, out_dir: str | Path, image_size: int,
          progress: bool = True, stop_after_epochs: int | None = None) -> dict[str, Any]:
    """Train ``method`` on the manifest's train split, validating on its val split.

    Args:
        method: ``prompt_cam`` or ``intr``.
        model_options: the method's ``model`` config (backbone spec, sizes).
        train_options: see :class:`TrainOptions`.
        manifest: ``manifest.parquet`` from ``intr prepare``.
        root: the data set root.
        out_dir: gets ``model.pt``, ``train_log.parquet`` and ``checkpoints/last.pt``.
        image_size: network input side.
        progress: progress bars.
        stop_after_epochs: stop (as if killed) after this many epochs of this call
            (used by tests of resuming).

    Returns:
        summary: best epoch, its validation accuracy, epochs run.
    """
    opts = TrainOptions.from_dict(dict(train_options))
    device = resolve_device(opts.device)
    ddp = _init_distributed(device)
    out_dir = Path(out_dir)
    torch.manual_seed(opts.seed)

    train_rows, val_rows = read_split(manifest, "train"), read_split(manifest, "val")
    num_classes = int(pd.read_parquet(manifest, columns=["class_id"])["class_id"].max()) + 1
    classes = class_record(manifest)  # stored in every checkpoint: evaluate and extract refuse other classes
    config = {"method": method, "model": dict(model_options), "num_classes": num_classes,
              "image_size": image_size, "train": vars(opts) | {"workers": 0, "device": "auto"}}
    digest = _config_digest(config)
    model = build_model(method, model_options, num_classes, image_size).to(device)
    mean, std = normalization(model.backbone if hasattr(model, "backbone") else model)
    config["normalization"] = {"mean": list(mean), "std": list(std)}
    train_set = ImageSet(root, train_rows, image_size, mean, std, train=True, seed=opts.seed,
                         crop_area=tuple(opts.crop_area))
    val_set = ImageSet(root, val_rows, image_size, mean, std)

    optimizer = _optimizer(model, opts)
    steps_per_epoch = len(train_set) // opts.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {opts.batch_size} is larger than the {len(train_set)} training images")

    ckpt_path = out_dir / "checkpoints" / "last.pt"
    start_epoch, log, best = 0, [], {"epoch": 0, "val_acc": -1.0, "state": trainable_state(model)}
    saved, source = read_resume_checkpoint(ckpt_path, ddp.main)
    changed = _resume_mismatch(saved, digest, classes["class_fingerprint"]) if saved is not None else None
    if changed:
        # A changed config or class list starts over; the old run's checkpoints are kept under other names.
        kept = ckpt_path.with_name(f"last-superseded-{saved.get('digest')}.pt")
        if ddp.main:
            if source == ckpt_path and previous_checkpoint(ckpt_path).exists():
                os.replace(previous_checkpoint(ckpt_path), previous_checkpoint(kept))
            os.replace(source, kept)
            print(f"{source} was written {changed}; starting over (kept as {kept.name})", flush=True)
        saved = None
    if saved is not None:
        model.load_state_dict(saved["state"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        start_epoch, log = int(saved["epoch"]), json.loads(saved["log"])
        best = {"epoch": int(saved["best_epoch"]), "val_acc": float(saved["best_val_acc"]),
                "state": saved["best_state"]}
        if ddp.main:
            print(f"resuming {method} from {source} after epoch {start_epoch}", flush=True)

    wrapped = model
    if ddp.world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = GlobalBatchSampler(len(train_set), opts.batch_size, opts.seed, ddp.rank, ddp.world)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=opts.workers,
                        pin_memory=device.type == "cuda")
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, opts.epochs):
        if stop_after_epochs is not None and epoch - start_epoch >= stop_after_epochs:
            break
        started = time.time()
        wrapped.train()
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch)
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, seen
        bar = tqdm(loader, desc=f"{method} epoch {epoch + 1}/{opts.epochs}",
                   disable=not (progress and ddp.main), leave=False)
        for b, (images, labels) in enumerate(bar):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            for g in optimizer.param_groups:
                g["lr"] = lr_for_step(opts, step, steps_per_epoch, g["base_lr"])
            with precision.autocast(device, opts.amp):
                logits = wrapped(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=opts.label_smoothing)
            if not torch.isfinite(loss):
                last = f"{ckpt_path} (epoch {start_epoch if not log else log[-1]['epoch']})" \
                    if ckpt_path.exists() else "none yet"
                raise TrainingDiverged(
                    f"{method}: loss became {loss.item()} at epoch {epoch + 1}, step {b + 1}; "
                    f"training stopped. Last good checkpoint: {last}. Lower the learning rate (lr={opts.lr}).")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if opts.clip_grad:
                nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], opts.clip_grad)
            optimizer.step()
            step += 1
            totals += torch.tensor([loss.item() * len(labels), (logits.argmax(-1) == labels).sum().item(),
                                    len(labels)], dtype=torch.float64)
            bar.set_postfix(loss=f"{totals[0] / totals[2]:.3f}")
        if ddp.world > 1:
            dist.all_reduce(totals)
        val_acc = accuracy(model, val_set, device, opts.amp, opts.workers)
        row = {"epoch": epoch + 1, "train_loss": float(totals[0] / totals[2]),
               "train_acc": float(totals[1] / totals[2]), "val_acc": val_acc,
               "lr": float(optimizer.param_groups[0]["lr"]), "seconds": time.time() - started}
        log.append(row)
        if val_acc > best["val_acc"]:
            best = {"epoch": epoch + 1, "val_acc": val_acc, "state": trainable_state(model)}
        if ddp.main:
            print(f"{method} epoch {epoch + 1}: loss {row['train_loss']:.4f} train acc {row['train_acc']:.3f} "
                  f"val acc {val_acc:.3f} ({row['seconds']:.1f} s)", flush=True)
            save_checkpoint({"digest": digest, "epoch": epoch + 1, "state": trainable_state(model),
                          "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                          "log": json.dumps(log), "best_epoch": best["epoch"],
                          "best_val_acc": best["val_acc"], "best_state": best["state"], **classes},
                         ckpt_path, keep_previous=previous_checkpoint(ckpt_path))
        if ddp.world > 1:
            dist.barrier()

    finished = len(log) == opts.epochs
    if ddp.main and finished:
        save_checkpoint({"config": json.dumps(config), "state": best["state"], "epoch": best["epoch"], **classes},
                     out_dir / "model.pt")
        write_table(pd.DataFrame(log), out_dir / "train_log.parquet",
                    metadata={"method": method, "best_epoch": best["epoch"], "config": config})
    if ddp.world > 1:
        dist.barrier()
    return {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "epochs": len(log),
            "finished": finished, "log": log}


def accuracy(model: nn.Module, data: ImageSet, device: torch.device, amp: bool, workers: int = 0) -> float:
    """Top-1 accuracy of ``model`` on every image of ``data``."""
    logits = predict(model, data, device, amp=amp, workers=workers)
    return float((logits.argmax(-1) == data.labels).float().mean()) if len(data) else float("nan")
