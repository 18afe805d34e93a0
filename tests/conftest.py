"""Fixtures shared by all tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread is fastest, and cannot spin against other work on the machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (where the Snakefile lives)."""
    return REPO_ROOT


def snakemake(*args: str | Path, cwd: Path = REPO_ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run Snakemake (from this interpreter's environment) on the repository's Snakefile.

    Args:
        *args: command-line arguments after ``snakemake --snakefile Snakefile``;
            targets must come before options that take several values
            (``--configfile``).
        cwd: working directory, where results/, logs/ and .snakemake/ go.
        timeout: seconds before the run is killed.

    Returns:
        The finished process; stdout and stderr are merged into ``stdout``.
    """
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO_ROOT / "Snakefile"),
               *map(str, args)]
    return subprocess.run(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


@pytest.fixture
def run_snakemake() -> Callable[..., subprocess.CompletedProcess]:
    """The :func:`snakemake` runner, as a fixture."""
    return snakemake


TINY_VIT = {"name": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4}}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(manifest path, data set root): 2 genera x 2 synthetic species, 12 images each, 32 px."""
    from intr.data.prepare import prepare_dataset
    from intr.data.synthetic import SyntheticConfig, synthesize

    root = tmp_path_factory.mktemp("tiny_dataset")
    synthesize(SyntheticConfig(genera=2, species_per_genus=2, images_per_species=12, image_size=32),
               root / "data", progress=False)
    prepare_dataset("synthetic", root / "data", root / "tables", val_fraction=0.25, progress=False)
    return root / "tables" / "manifest.parquet", root / "data"


@pytest.fixture(scope="session")
def tiny_models(tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    """method -> model.pt of a Prompt-CAM and an INTR trained 2 epochs on ``tiny_dataset``."""
    import torch

    from intr.train import train

    manifest, root = tiny_dataset
    out = tmp_path_factory.mktemp("tiny_models")
    models = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sections = {
        "prompt_cam": {"backbone": TINY_VIT},
        "intr": {"backbone": TINY_VIT, "freeze_backbone": True,
                 "transformer": {"d_model": 32, "heads": 4, "encoder_layers": 1, "decoder_layers": 1,
                                 "ffn": 64, "dropout": 0.0}},
    }
    for method, model in sections.items():
        train(method, model, {"epochs": 2, "batch_size": 8, "lr": 0.05, "warmup_epochs": 1, "seed": 1},
              manifest, root, out / method, image_size=32, progress=False)
        models[method] = out / method / "model.pt"
    torch.set_num_threads(threads)
    return models


@pytest.fixture(scope="session")
def six_class_manifest(tiny_dataset, tmp_path_factory) -> Path:
    """``tiny_dataset``'s manifest relabelled to 6 classes (same images and root).

    Class 1 is renamed ``renamed_species``; the odd image_ids of classes 2 and 3
    become classes 4 and 5 (``extra_species_4``, ``extra_species_5``), so the
    first name that differs from the 4-class manifest's is class_id 1's.
    """
    import pandas as pd

    manifest, _ = tiny_dataset
    table = pd.read_parquet(manifest)
    table.loc[table["class_id"] == 1, "class_name"] = "renamed_species"
    for old, new in ((2, 4), (3, 5)):
        moved = (table["class_id"] == old) & (table["image_id"] % 2 == 1)
        table.loc[moved, "class_id"] = new
        table.loc[moved, "class_name"] = f"extra_species_{new}"
    path = tmp_path_factory.mktemp("six_classes") / "manifest.parquet"
    table.to_parquet(path, index=False)
    return path
