"""``intr pretrain``: rebuild the small backbone whose weights the default ships.

A narrow timm ViT is trained from scratch, fully supervised, on the synthetic
*pretraining* species (disjoint from the target species), long enough that
its frozen features separate look-alikes.  The recipe (architecture, data,
optimiser) lives in ``intr/configs/pretrain_synthetic_vit.yaml``; the shipped
weights and their sha256 are recorded there too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from intr.data.images import ImageSet, read_split
from intr.models.backbones import BackboneSpec, create_backbone, normalization
from analysis.tables import write_table
from intr.train import accuracy, lr_at

DEFAULT_RECIPE = Path(__file__).resolve().parent / "configs" / "pretrain_synthetic_vit.yaml"


def load_recipe(path: str | Path | None = None) -> dict[str, Any]:
    """The pretraining recipe (YAML)."""
    path = Path(path) if path else DEFAULT_RECIPE
    if not path.exists():
        raise FileNotFoundError(f"pretraining recipe not found: {path}")
    return yaml.safe_load(path.read_text())


def pretrain(manifest: Path, root: Path, out: Path, recipe: Mapping[str, Any] | None = None,
             log_path: Path | None = None, progress: bool = True) -> dict[str, float]:
    """Train the recipe's backbone on the pretraining species and save its weights.

    Args:
        manifest: ``manifest.parquet`` of the prepared pretraining set.
        root: that data set's root (images are read from it).
        out: where the backbone weights (a timm state dict, no classifier) go.
        recipe: the recipe mapping (default: the shipped recipe file).
        log_path: optional ``pretrain_log.parquet``.
        progress: show progress bars.

    Returns:
        final train and held-out accuracy on the pretraining species, minutes.
    """
    recipe = dict(recipe or load_recipe())
    spec = BackboneSpec.from_dict({**recipe["backbone"], "checkpoint": None, "pretrained": False})
    opts = recipe["train"]
    torch.manual_seed(opts["seed"])
    train_rows = read_split(manifest, ["train", "val"])
    test_rows = read_split(manifest, "test")
    num_classes = int(pd.read_parquet(manifest, columns=["class_id"])["class_id"].max()) + 1
    model = create_backbone(spec, num_classes=num_classes)
    mean, std = normalization(model)
    size = int(recipe["data"]["image_size"])
    train_set = ImageSet(root, train_rows, size, mean, std, train=True, seed=opts["seed"])
    test_set = ImageSet(root, test_rows, size, mean, std)

    optimizer = torch.optim.AdamW(model.parameters(), lr=opts["lr"], weight_decay=opts["weight_decay"])
    batch = int(opts["batch_size"])
    steps_per_epoch = len(train_set) // batch
    total = steps_per_epoch * int(opts["epochs"])
    warmup = steps_per_epoch * int(opts.get("warmup_epochs", 1))
    log, step, started = [], 0, time.time()
    limit = opts.get("time_limit_minutes")
    for epoch in range(int(opts["epochs"])):
        model.train()
        train_set.set_epoch(epoch)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(opts["seed"] * 1000 + epoch))
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"pretrain epoch {epoch + 1}", disable=not progress, leave=False)
        for b in bar:
            idx = order[b * batch:(b + 1) * batch].tolist()
            images = torch.stack([train_set[i][0] for i in idx])
            labels = train_set.labels[idx]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, opts["lr"])
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=opts.get("label_smoothing", 0.0))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts.get("clip_grad", 1.0))
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(-1) == labels).sum().item()
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        held_out = accuracy(model, test_set, torch.device("cpu"), amp=False)
        minutes = (time.time() - started) / 60
        log.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                    "test_acc": held_out, "lr": optimizer.param_groups[0]["lr"], "minutes": minutes})
        print(f"pretrain epoch {epoch + 1}: loss {loss_sum / seen:.3f} train acc {correct / seen:.3f} "
              f"held-out acc {held_out:.3f} ({minutes:.1f} min)", flush=True)
        if limit and minutes > limit:
            print(f"pretrain: time limit of {limit} min reached after epoch {epoch + 1}")
            break
    model.reset_classifier(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(out)
    if log_path:
        write_table(pd.DataFrame(log), log_path, metadata={"recipe": recipe})
    return {"train_acc": log[-1]["train_acc"], "test_acc": log[-1]["test_acc"], "minutes": log[-1]["minutes"]}
