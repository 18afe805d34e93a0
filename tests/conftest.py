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
