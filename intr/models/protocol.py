"""What the rest of ``intr`` asks of a method's model: the interface Prompt-CAM and INTR share.

Training calls the model for logits; extraction, head ranking, faithfulness
and the CAM baselines read its last-layer maps, its blur context, its grid and
its backbone's features.  Nothing outside ``intr.models`` uses more than this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class BlurContext:
    """What head ranking needs for one target query row, computed once.

    ``normal[b, h]`` is head h's attention output of the target row,
    ``blurred[b, h]`` the output when its pre-softmax logits are all zero
    (uniform attention); ``finish`` turns per-head outputs (B, K, H, hd) of K
    candidate blur sets into the target logit (B, K); ``logits`` are the
    unblurred logits of all classes (B, C).  With several target rows per
    image ((B, R) targets) every field has B * R rows, image-major, and
    ``finish(head_out, row)`` takes an optional (B',) index of the context row
    each of its B' entries belongs to (default: entry i is row i).

    Precision: the trunk runs in the caller's precision (bf16 under autocast),
    but every field, and ``finish`` at every call, is computed in the model's
    parameter dtype (float32) with autocast off: the candidates' target logits
    differ by less than bf16's resolution, and rounding them would flip the
    order of near-tied heads (``intr.precision.float32_last_block``).
    """

    normal: torch.Tensor
    blurred: torch.Tensor
    finish: Callable[..., torch.Tensor]
    logits: torch.Tensor
    target: torch.Tensor


@dataclass
class Trunk:
    """A batch's pass up to its model's last attention layer (``model.trunk_of(images)``), computed once.

    ``logits_of``, ``forward_with_maps``, ``blur_context`` and ``patch_features`` take it as ``trunk=``
    in place of the images, so extraction's logits, maps, head rankings and trait features of a
    batch share one pass instead of running the network once each (every ranked row used to run
    its own). The model computes it in the caller's precision (bf16 under autocast), as each of
    those does from the images.

    Attributes:
        tensors: the model's state before its last layer, the images on the first axis of each.
        features: the backbone's patch features (``patch_features``) where the pass computes them
            (INTR); None where it does not (Prompt-CAM's prompts change the backbone's tokens).
    """

    tensors: tuple[torch.Tensor, ...]
    features: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> "Trunk":
        """The trunk of the images ``index`` (repeats allowed): that of ``images[index]``."""
        return Trunk(tuple(t[index] for t in self.tensors), None if self.features is None else self.features[index])


@runtime_checkable
class InterpretableModel(Protocol):
    """A classifier whose last attention layer has one query row per class.

    Attributes:
        backbone: the timm backbone module (the CAM baselines and the linear
            probe read it; its ``pretrained_cfg`` gives the input normalisation).
        num_classes: number of classes (one query row each).
        num_heads: heads of the last attention layer (one map each).
        grid_size: (grid_h, grid_w) of every map, known from construction.
        patch_feature_dim: width D of ``patch_features``.
    """

    backbone: nn.Module
    num_classes: int

    @property
    def num_heads(self) -> int: ...

    @property
    def grid_size(self) -> tuple[int, int]: ...

    @property
    def patch_feature_dim(self) -> int: ...

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C) of images (B, 3, H, W)."""
        ...

    def trunk_of(self, images: torch.Tensor) -> Trunk:
        """The images' pass up to the last attention layer, for the ``trunk=`` of the methods below."""
        ...

    def logits_of(self, trunk: Trunk) -> torch.Tensor:
        """Class logits (B, C) from a ``trunk_of``: those of ``__call__`` in eval mode."""
        ...

    def forward_with_maps(self, images: torch.Tensor | None, classes: torch.Tensor,
                          blur: torch.Tensor | None = None,
                          trunk: Trunk | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, C) and maps (B, R, heads, grid_h, grid_w) of the query rows ``classes`` (B, R).

        ``blur`` (B, R, heads) bool zeroes those heads' pre-softmax logits for that row. ``trunk``:
        the images' ``trunk_of``, in place of running it (``images`` is then not read).
        """
        ...

    def blur_context(self, images: torch.Tensor | None, target: torch.Tensor,
                     trunk: Trunk | None = None) -> BlurContext:
        """What greedy head ranking (``intr.ranking``) needs for the ``target`` (B,) or (B, R) query rows
        (``trunk`` as for ``forward_with_maps``)."""
        ...

    def probe_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen backbone features (B, F) for a linear probe."""
        ...

    def patch_features(self, images: torch.Tensor, trunk: Trunk | None = None) -> torch.Tensor:
        """Backbone features (B, grid_h * grid_w, patch_feature_dim): what each map cell looks at
        (read from ``trunk`` where its pass computed them)."""
        ...
