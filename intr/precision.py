"""The numeric precision every forward pass of ``intr`` runs in: one rule, one place.

``amp: true`` (the config's ``train.amp`` and extraction's ``amp``) means bf16
autocast on CUDA and float32 elsewhere.  Setting the environment variable
``INTR_CPU_BF16=1`` turns the same bf16 autocast on for CPU runs, so that the
tests (and anyone without a GPU) exercise the exact mixed-precision code
paths a GPU runs and dtype mistakes show on a CPU first.  It is read at every
call, so a test can set it with ``monkeypatch.setenv`` and child processes
(the CLI, Snakemake) inherit it.

Head ranking compares candidate logits that can differ by less than bf16's
resolution, so the models compute the last block's candidate rows in float32
under :func:`float32_last_block` even when the trunk runs in bf16.
"""

from __future__ import annotations

import os

import torch

CPU_BF16_ENV = "INTR_CPU_BF16"


def amp_enabled(device: torch.device, amp: bool) -> bool:
    """Whether ``amp`` turns bf16 autocast on for ``device``.

    Args:
        device: where the forward passes run.
        amp: the configured switch (bf16 autocast wanted where it is used).
    """
    if not amp:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get(CPU_BF16_ENV, "") == "1"


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """The autocast context of a forward pass: bf16 where :func:`amp_enabled`, else a no-op.

    Args:
        device: where the forward pass runs.
        amp: the configured switch.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_enabled(device, amp))


def float32_last_block(device: torch.device) -> torch.autocast:
    """Autocast off: what runs inside computes in its inputs' dtype (cast them with ``.float()``).

    Args:
        device: the device of the tensors computed inside.
    """
    return torch.autocast(device.type, enabled=False)
