"""``intr evaluate``: accuracy of a trained model and of a linear probe on its backbone.

Writes ``metrics_model.parquet`` (rows in the ``evaluation.parquet`` layout):

* ``{method}`` ``top1`` / ``top5`` on the evaluation split, from the model's
  plain logits;
* ``linear_probe`` ``top1``: logistic regression on the frozen backbone's
  features (class token and mean patch token), trained on train+val; the
  fitted probe can be written (``probe_out``, ``linear_probe.pt``) for
  ``intr faithfulness``, whose CAMs explain the same probe.

Everything about the attention maps (the planted-part test included) is
scored in ``analysis/`` from the tables ``intr extract`` writes, so this stage
runs no maps and no head ranking.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from analysis.config import defaults
from analysis.stats import metric_row
from analysis.tables import read_table, write_table
from intr.baselines import (BackboneFeatures, LinearProbe, extract_features, fit_probe_regression,
                            probe_from_regression, save_linear_probe)
from intr.data.images import ImageSet, read_split
from intr.models import load_model, resolve_device


def probe_features(model: torch.nn.Module, data: ImageSet, device: torch.device,
                   batch_size: int = 256) -> np.ndarray:
    """The model's frozen-backbone features (``model.probe_features``) of every image."""
    model.eval()
    return extract_features(BackboneFeatures(model), lambda i: data[i][0], len(data), device, batch_size)


def linear_probe_correct(model, train: ImageSet, test: ImageSet, device: torch.device,
                         num_classes: int | None = None) -> tuple[np.ndarray, LinearProbe | None]:
    """Per test image: does a logistic regression on frozen features get it right? And the probe as a
    torch module (``intr.baselines.LinearProbe``; None without ``num_classes``)."""
    scaler, reg = fit_probe_regression(probe_features(model, train, device), train.labels.numpy())
    correct = reg.predict(scaler.transform(probe_features(model, test, device))) == test.labels.numpy()
    probe = probe_from_regression(BackboneFeatures(model), scaler, reg, num_classes, device) if num_classes else None
    return correct, probe


@torch.no_grad()
def model_logits(model: torch.nn.Module, data: ImageSet, device: torch.device, batch_size: int,
                 progress: bool) -> torch.Tensor:
    """The model's logits (N, classes), float32 on the CPU, for every image of ``data`` in order.

    Args:
        model: a trained Prompt-CAM or INTR.
        data: the images.
        device: where the forward passes run.
        batch_size: images per forward pass.
        progress: progress bar.
    """
    model.eval()
    logits = []
    for start in tqdm(range(0, len(data), batch_size), desc="evaluate", disable=not progress, leave=False):
        images = torch.stack([data[i][0] for i in range(start, min(start + batch_size, len(data)))])
        logits.append(model(images.to(device)).float().cpu())
    return torch.cat(logits)


EXTRACT = defaults("extract")  # the config schema's defaults


def evaluate_model(model_path: str | Path, manifest: str | Path, root: str | Path, out: str | Path,
                   split: str = EXTRACT["split"], batch_size: int = EXTRACT["batch_size"],
                   device: str = EXTRACT["device"], probe_out: str | Path | None = None,
                   progress: bool = True) -> pd.DataFrame:
    """Write ``metrics_model.parquet`` for one trained model; return its rows.

    Args:
        model_path: ``model.pt`` from ``intr train``.
        manifest: ``manifest.parquet``.
        root: the data set root.
        out: the metrics table to write.
        split: evaluation split.
        batch_size: images per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        probe_out: where to write the fitted linear probe (``linear_probe.pt``, read by ``intr
            faithfulness`` instead of fitting it again); None: not written.
        progress: progress bar.
    """
    dev = resolve_device(device)
    model, config = load_model(model_path, map_location="cpu", manifest=manifest)  # refuses other classes
    model.to(dev)
    method, size = config["method"], int(config["image_size"])
    mean, std = config["normalization"]["mean"], config["normalization"]["std"]
    data = ImageSet(root, read_split(manifest, split), size, mean, std)
    logits = model_logits(model, data, dev, batch_size, progress)
    labels = data.labels.numpy()
    correct = logits.argmax(1).numpy() == labels
    top5 = (logits.topk(min(5, logits.shape[1]), dim=1).indices.numpy() == labels[:, None]).any(1)
    metrics = [metric_row(method, "top1", split, correct), metric_row(method, "top5", split, top5)]

    train_data = ImageSet(root, read_split(manifest, ["train", "val"]), size, mean, std)
    probe_correct, probe = linear_probe_correct(model, train_data, data, dev, int(config["num_classes"]))
    metrics.append(metric_row("linear_probe", "top1", split, probe_correct))
    if probe_out is not None:
        save_linear_probe(probe, probe_out, model_path)
    table = pd.DataFrame(metrics)
    write_table(table, out, metadata={"method": method, "model": str(model_path), "split": split})
    return table


def gather_evaluation(inputs: list[str | Path], out: str | Path) -> pd.DataFrame:
    """``evaluation.parquet``: every stage's metric table of one method, in one table."""
    frames = [read_table(p) for p in inputs]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["method", "metric", "split", "value", "ci_lo", "ci_hi", "n"])
    write_table(table, out, metadata={"sources": [str(p) for p in inputs]})
    return table
