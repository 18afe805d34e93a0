"""Prompt-CAM (Chowdhury et al., CVPR 2025) on any timm VisionTransformer.

A frozen ViT gets one learnable prompt per class at every block (VPT-deep:
fresh prompts are inserted after the prefix tokens before each block and
their outputs dropped after it, except after the last block).  Each class
prompt's last-block output goes through the backbone's final norm and one
shared ``Linear(D, 1)``: a logit per class.  The last block's attention of a
class prompt over the patches, per head, is that class's trait map.

How this departs from the official code: the last block computes only the
class-prompt rows (nothing reads the patch rows after it), with fused
attention; the explicit softmax is computed only for the prompt rows whose
maps are asked for.  The timm backbone is used unpatched.

Training as the paper did (config/cub.yaml): ``prompt_dropout`` drops prompt
features as the official VPT module does (one mask per block over the
(classes, D) prompt matrix, shared by the batch), and ``backbone_train_mode``
keeps the frozen backbone in train mode while training, so its stochastic
depth (timm's ``drop_path_rate``, linear over the blocks) is active as in the
official code; the backbone's weights stay frozen either way.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from intr.models.backbones import BackboneSpec, create_backbone
from intr.models.protocol import BlurContext, Trunk
from intr.precision import float32_last_block


class PromptCAM(nn.Module):
    """Class prompts on a frozen timm ViT.

    Args:
        backbone: a timm ``VisionTransformer`` (frozen here).
        num_classes: number of classes, one prompt per class per block.
        prompt_dropout: dropout rate on the prompts while training (the paper: 0.1).
        backbone_train_mode: run the frozen backbone in train mode while training, so its
            drop-path is active (the official code); False keeps it in eval mode.
    """

    def __init__(self, backbone: VisionTransformer, num_classes: int, prompt_dropout: float = 0.0,
                 backbone_train_mode: bool = False) -> None:
        super().__init__()
        if not isinstance(backbone, VisionTransformer):
            raise TypeError(f"Prompt-CAM needs a timm VisionTransformer, got {type(backbone).__name__}")
        self.backbone = backbone.requires_grad_(False).eval()
        self.num_classes = num_classes
        self.num_prefix = backbone.num_prefix_tokens
        dim, depth = backbone.embed_dim, len(backbone.blocks)
        patch = backbone.patch_embed.patch_size
        # VPT's initialisation: uniform with the fan-in of a patch projection.
        bound = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + dim))
        self.class_prompts = nn.Parameter(torch.empty(depth, num_classes, dim).uniform_(-bound, bound))
        self.presence_head = nn.Linear(dim, 1)
        self.prompt_dropout = nn.Dropout(prompt_dropout)
        self.backbone_train_mode = backbone_train_mode

    # The frozen backbone stays in eval mode unless the paper's recipe asks for its drop-path.
    def train(self, mode: bool = True) -> "PromptCAM":
        super().train(mode)
        self.backbone.train(mode and self.backbone_train_mode)
        return self

    @property
    def num_heads(self) -> int:
        return self.backbone.blocks[-1].attn.num_heads

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.grid_size)

    @property
    def patch_feature_dim(self) -> int:
        return self.backbone.embed_dim

    def _with_prompts(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        prompts = self.prompt_dropout(self.class_prompts[depth]).to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :self.num_prefix], prompts, x[:, self.num_prefix:]], dim=1)

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens entering the last block: (B, prefix + classes + patches, D)."""
        bb = self.backbone
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(images))))
        c = self.num_classes
        for depth, block in enumerate(bb.blocks[:-1]):
            x = block(self._with_prompts(x, depth))
            x = torch.cat([x[:, :self.num_prefix], x[:, self.num_prefix + c:]], dim=1)
        return self._with_prompts(x, len(bb.blocks) - 1)

    def _query_key_value(self, x: torch.Tensor, rows: torch.Tensor | slice):
        """q for ``rows`` only, k and v for all tokens, per head: (B, H, R|N, hd)."""
        attn = self.backbone.blocks[-1].attn
        h = self.backbone.blocks[-1].norm1(x)
        B, N, _ = h.shape
        weight, bias = attn.qkv.weight, attn.qkv.bias
        a = attn.attn_dim
        hr = h[:, rows] if isinstance(rows, slice) else torch.gather(
            h, 1, rows.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        q = F.linear(hr, weight[:a], None if bias is None else bias[:a])
        kv = F.linear(h, weight[a:], None if bias is None else bias[a:])
        q = attn.q_norm(q.view(B, -1, attn.num_heads, attn.head_dim).transpose(1, 2))
        k, v = kv.view(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return q, attn.k_norm(k), v, hr

    def _finish_rows(self, x_rows: torch.Tensor, head_out: torch.Tensor) -> torch.Tensor:
        """Rest of the last block for some rows, then norm and presence head.

        Args:
            x_rows: the rows' block input (..., D).
            head_out: their attention output per head (..., H, hd).
        """
        block = self.backbone.blocks[-1]
        attn = block.attn
        o = attn.proj(attn.norm(head_out.flatten(-2)))
        # drop_path: the identity in eval mode; per-sample stochastic depth when the backbone trains
        y = x_rows + block.drop_path1(block.ls1(o))
        y = y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))
        return self.presence_head(self.backbone.norm(y)).squeeze(-1)

    def _class_rows(self) -> slice:
        return slice(self.num_prefix, self.num_prefix + self.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C); fused attention everywhere."""
        return self.forward_from_trunk(self.trunk(images))

    def trunk_of(self, images: torch.Tensor) -> Trunk:
        """The tokens entering the last block (``trunk``), shared by the methods that take ``trunk=``."""
        return Trunk((self.trunk(images),))

    def logits_of(self, trunk: Trunk) -> torch.Tensor:
        """Class logits from a ``trunk_of``."""
        return self.forward_from_trunk(trunk.tensors[0])

    def forward_from_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits from the tokens entering the last block (only the prompt rows are computed)."""
        q, k, v, _ = self._query_key_value(x, self._class_rows())
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, C, hd)
        return self._finish_rows(x[:, self._class_rows()], out.transpose(1, 2))

    def forward_with_maps(self, images: torch.Tensor | None, classes: torch.Tensor,
                          blur: torch.Tensor | None = None,
                          trunk: Trunk | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the last block's attention maps of some class prompts.

        Args:
            images: (B, 3, H, W).
            classes: (B, R) class ids whose prompt rows' maps are wanted.
            blur: optional (B, R, heads) bool: heads whose pre-softmax logits
                are set to zero for that row (head-ranking's "blurring").
            trunk: the images' ``trunk_of``, in place of running it (``images`` is then not read).

        Returns:
            logits (B, C) (blurred rows change their own class's logit) and
            maps (B, R, heads, grid_h, grid_w) over the patches.
        """
        x = self.trunk(images) if trunk is None else trunk.tensors[0]
        rows = self._class_rows()
        q, k, v, _ = self._query_key_value(x, rows)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, C, H, hd)
        qs = torch.gather(q, 2, classes[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        logits = (qs * self.backbone.blocks[-1].attn.scale) @ k.transpose(-2, -1)  # (B, H, R, N)
        if blur is not None:
            logits = logits.masked_fill(blur.transpose(1, 2).unsqueeze(-1), 0.0)
        weights = logits.softmax(dim=-1)
        row_out = (weights @ v).transpose(1, 2)  # (B, R, H, hd)
        out = out.scatter(1, classes[:, :, None, None].expand_as(row_out), row_out)
        logits_all = self._finish_rows(x[:, rows], out)
        patches = weights[..., self.num_prefix + self.num_classes:].transpose(1, 2)
        return logits_all, patches.reshape(*patches.shape[:3], *self.grid_size)

    def blur_context(self, images: torch.Tensor | None, target: torch.Tensor,
                     trunk: Trunk | None = None) -> BlurContext:
        """Everything head ranking needs for the ``target`` class prompts, computed once.

        Args:
            images: (B, 3, H, W).
            target: (B,) class ids, or (B, R) for R prompt rows per image that share one
                trunk pass; the context's rows are then the B * R (image, row) pairs, image-major.
            trunk: the images' ``trunk_of``, in place of running it (``images`` is then not read).
        """
        x = self.trunk(images) if trunk is None else trunk.tensors[0]  # in the caller's precision
        with float32_last_block(x.device):
            return self._blur_context_from_trunk(x.to(self.presence_head.weight.dtype), target)

    def _blur_context_from_trunk(self, x: torch.Tensor, target: torch.Tensor) -> BlurContext:
        """:meth:`blur_context` after the trunk, in ``x``'s dtype (called with autocast off)."""
        logits = self.forward_from_trunk(x)
        rows = target.view(target.shape[0], -1) + self.num_prefix  # (B, R)
        q, k, v, _ = self._query_key_value(x, rows)
        scores = (q * self.backbone.blocks[-1].attn.scale) @ k.transpose(-2, -1)  # (B, H, R, N)
        normal = (scores.softmax(-1) @ v).transpose(1, 2).flatten(0, 1)  # (B * R, H, hd)
        # softmax of all-zero logits: uniform over every key, the same for every row of an image
        blurred = v.mean(dim=2).repeat_interleave(rows.shape[1], dim=0)
        x_row = torch.gather(x, 1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1])).flatten(0, 1).unsqueeze(1)

        def finish(head_out: torch.Tensor, row: torch.Tensor | None = None) -> torch.Tensor:
            x_in = x_row if row is None else x_row[row]
            with float32_last_block(x_in.device):  # candidates differ below bf16's resolution
                return self._finish_rows(x_in.expand(-1, head_out.shape[1], -1), head_out.to(x_in.dtype))

        return BlurContext(normal, blurred, finish, logits.repeat_interleave(rows.shape[1], dim=0),
                           target.reshape(-1))

    def probe_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen features for a linear probe: [class token, mean patch token] after the final norm."""
        tokens = self.backbone.forward_features(images)
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix:].mean(1)], dim=1)

    def patch_features(self, images: torch.Tensor, trunk: Trunk | None = None) -> torch.Tensor:
        """The frozen backbone's final patch tokens (B, grid_h * grid_w, D), without prompts (a pass of
        its own: the trunk's tokens carry the prompts' effect, so ``trunk`` is not read)."""
        feats = self.backbone.forward_features(images)
        return feats[:, self.num_prefix:]


def build_prompt_cam(options: Mapping[str, Any], num_classes: int, image_size: int) -> PromptCAM:
    """Prompt-CAM from the config's ``model`` section.

    Args:
        options: ``backbone``: a BackboneSpec mapping (a timm ViT; its kwargs may set
            ``drop_path_rate``); ``prompt_dropout``; ``backbone_train_mode``.
        num_classes: number of classes.
        image_size: input side in pixels; the ViT must be made for it.
    """
    backbone = create_backbone(BackboneSpec.from_dict(options["backbone"]), num_classes=0)
    if tuple(backbone.patch_embed.img_size) != (image_size, image_size):
        raise ValueError(f"the ViT backbone takes {tuple(backbone.patch_embed.img_size)} px images, not "
                         f"{image_size} px: set its kwargs img_size to the image size")
    return PromptCAM(backbone, num_classes, prompt_dropout=float(options.get("prompt_dropout", 0.0)),
                     backbone_train_mode=bool(options.get("backbone_train_mode", False)))
