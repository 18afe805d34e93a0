"""INTR (Paul et al., ICLR 2024): one decoder query per class asks "am I in this image?".

Backbone (timm ResNet-50 last stage with frozen batch norm, or any timm ViT's
patch tokens) -> 1x1 projection to d -> DETR transformer (post-norm encoder
with sine positional encoding, decoder whose queries are one learned
embedding per class; as in the official INTR code, the decoder's
cross-attention keys carry no positional encoding, unlike DETR's) -> one shared presence vector ``Linear(d, 1)`` -> a
logit per class.  The last decoder layer's cross-attention of a class query
over the feature map, per head, is that class's trait map.

How this departs from the official code (which runs each cross-attention
twice to get per-head and averaged weights): attention is fused
(``scaled_dot_product_attention``) everywhere, and explicit per-head weights
are computed once, only in the last decoder layer and only for the query rows
whose maps are asked for.  Parameter names follow DETR's
(``transformer.encoder.layers.N.self_attn.in_proj_weight`` ...) so DETR
checkpoints load directly; DETR's 100 object queries are replaced by one per
class.  Unlike DETR (any image size, padded and masked), a model is built for
one square input size, so its map grid is known before the first forward pass.

Training as the paper did (config/cub.yaml): ``train_backbone_layers`` trains
only the named ResNet stages (DETR and INTR: layer2-4; stem and layer1 stay
fixed), batch norm is always frozen for CNN backbones (DETR's
FrozenBatchNorm2d: statistics and affine fixed), and ``xavier_init``
Xavier-initialises every transformer matrix as DETR's ``_reset_parameters``
does (off, only the attention in-projections are, which the small CPU recipe
was tuned with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import timm
import torch
import torch.nn.functional as F
from torch import nn

from intr.models.backbones import BackboneSpec, check_shapes, create_backbone, resolve_checkpoint
from intr.models.checkpoint import read_checkpoint
from intr.models.protocol import BlurContext, Trunk
from intr.precision import float32_last_block


@dataclass
class TransformerConfig:
    """Sizes of the transformer (the paper: d=256, 8 heads, 6+6 layers, FFN 2048, dropout 0.1)."""

    d_model: int = 256
    heads: int = 8
    encoder_layers: int = 6
    decoder_layers: int = 6
    ffn: int = 2048
    dropout: float = 0.1


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (packed in_proj), fused attention by default.

    ``forward(..., weights_for=rows)`` additionally returns the explicit
    per-head softmax weights of those query rows, optionally with some heads'
    pre-softmax logits set to zero (``blur``).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, dim // heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """Per-head q, k, v: (B, heads, L, head_dim)."""
        w, b = self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)
        split = lambda t: t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # noqa: E731
        return split(F.linear(query, w[0], b[0])), split(F.linear(key, w[1], b[1])), split(F.linear(value, w[2], b[2]))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(query, key, value)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(-2))

    def explicit(self, q: torch.Tensor, k: torch.Tensor, blur: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax weights (B, heads, Lq, Lk); ``blur`` (B, Lq, heads) zeroes those logits."""
        logits = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        if blur is not None:
            logits = logits.masked_fill(blur.transpose(1, 2).unsqueeze(-1), 0.0)
        return logits.softmax(dim=-1)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn = MultiheadAttention(d, cfg.heads, cfg.dropout)
        self.linear1, self.linear2 = nn.Linear(d, cfg.ffn), nn.Linear(cfg.ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        qk = src + pos
        src = self.norm1(src + self.dropout(self.self_attn(qk, qk, src)))
        return self.norm2(src + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(src))))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn = MultiheadAttention(d, cfg.heads, cfg.dropout)
        self.multihead_attn = MultiheadAttention(d, cfg.heads, cfg.dropout)
        self.linear1, self.linear2 = nn.Linear(d, cfg.ffn), nn.Linear(cfg.ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)

    def before_cross(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        qk = tgt + query_pos
        return self.norm1(tgt + self.dropout(self.self_attn(qk, qk, tgt)))

    def after_cross(self, tgt: torch.Tensor, cross_out: torch.Tensor) -> torch.Tensor:
        tgt = self.norm2(tgt + self.dropout(cross_out))
        return self.norm3(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))

    def forward(self, tgt, memory, query_pos):
        tgt = self.before_cross(tgt, query_pos)
        # As in the official INTR code (unlike DETR), the keys carry no positional encoding.
        return self.after_cross(tgt, self.multihead_attn(tgt + query_pos, memory, memory))


class Transformer(nn.Module):
    """DETR's transformer, post-norm (``normalize_before=False``), decoder with a final norm."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.decoder.norm = nn.LayerNorm(cfg.d_model)


def sine_position(b: int, h: int, w: int, dim: int, device, dtype, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised sine positional encoding, (B, h*w, dim)."""
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32).view(h, 1).expand(h, w)
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32).view(1, w).expand(h, w)
    scale = 2 * math.pi
    y, x = y / (h + 1e-6) * scale, x / (w + 1e-6) * scale
    n = dim // 2
    dim_t = temperature ** (2 * (torch.arange(n, device=device) // 2) / n)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=-1).flatten(-2)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((py, px), dim=-1).flatten(0, 1).to(dtype).unsqueeze(0).expand(b, -1, -1)


class FeatureBackbone(nn.Module):
    """A timm backbone as a feature map (B, C, h, w): a CNN's last stage or a ViT's patch tokens."""

    def __init__(self, spec: BackboneSpec, frozen_batch_norm: bool = True) -> None:
        super().__init__()
        probe = timm.create_model(spec.name, pretrained=False, num_classes=0, **dict(spec.kwargs))
        self.is_vit = hasattr(probe, "patch_embed")
        if self.is_vit:
            self.body = create_backbone(spec, num_classes=0)
            self.channels = self.body.embed_dim
            self.num_prefix = self.body.num_prefix_tokens
        else:
            self.body = timm.create_model(spec.name, pretrained=spec.pretrained, features_only=True,
                                          out_indices=(-1,), **dict(spec.kwargs))
            if spec.checkpoint:
                _load_cnn_weights(self.body, resolve_checkpoint(spec.checkpoint))
            if frozen_batch_norm:
                self.body = timm.layers.freeze_batch_norm_2d(self.body)
            self.channels = self.body.feature_info.channels()[-1]
        self.pretrained_cfg = getattr(probe, "pretrained_cfg", {})
        del probe

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.is_vit:
            tokens = self.body.forward_features(images)[:, self.num_prefix:]
            gh, gw = self.body.patch_embed.dynamic_feat_size(images.shape[-2:]) \
                if hasattr(self.body.patch_embed, "dynamic_feat_size") else self.body.patch_embed.grid_size
            return tokens.transpose(1, 2).unflatten(-1, (gh, gw))
        return self.body(images)[-1]

    def grid_for(self, image_size: int) -> tuple[int, int]:
        """(h, w) of the feature map of a square image of side ``image_size``, without running the network.

        Args:
            image_size: input side in pixels.
        """
        if self.is_vit:
            patch_embed = self.body.patch_embed
            if not getattr(self.body, "dynamic_img_size", False) and tuple(patch_embed.img_size) != (image_size,) * 2:
                raise ValueError(f"the ViT backbone takes {tuple(patch_embed.img_size)} px images, not "
                                 f"{image_size} px: set its kwargs img_size to the image size")
            return tuple(int(g) for g in patch_embed.dynamic_feat_size((image_size, image_size)))
        # A CNN's output size depends on every stride, padding and rounding of its layers: let the
        # layers compute it on meta-device copies of the weights (shapes only: no arithmetic, and
        # batch-norm statistics update the copies, never the real buffers).
        meta = {name: t.to("meta") for name, t in [*self.body.named_parameters(), *self.body.named_buffers()]}
        probe = torch.zeros(2, 3, image_size, image_size, device="meta")
        shape = torch.func.functional_call(self.body, meta, (probe,))[-1].shape
        return int(shape[-2]), int(shape[-1])

    def probe_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.is_vit:
            tokens = self.body.forward_features(images)
            return torch.cat([tokens[:, 0], tokens[:, self.num_prefix:].mean(1)], dim=1)
        return self.body(images)[-1].mean((-2, -1))


def _load_cnn_weights(body: nn.Module, path) -> None:
    state = read_checkpoint(path)
    state = state.get("model", state)
    prefix = "backbone.0.body."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    check_shapes(body, state, path, "backbone checkpoint")
    missing, _ = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"backbone checkpoint {path} does not fit: missing {missing[:8]}")


class INTR(nn.Module):
    """Class queries over a transformer encoder's memory.

    Args:
        backbone: a :class:`FeatureBackbone`.
        num_classes: number of classes (one decoder query each).
        cfg: transformer sizes.
        image_size: side of the (square) input images, which fixes the feature grid.
    """

    def __init__(self, backbone: FeatureBackbone, num_classes: int, cfg: TransformerConfig,
                 image_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.num_classes = num_classes
        self.input_proj = nn.Conv2d(backbone.channels, cfg.d_model, kernel_size=1)
        self.transformer = Transformer(cfg)
        self.query_embed = nn.Embedding(num_classes, cfg.d_model)
        self.presence_head = nn.Linear(cfg.d_model, 1)
        self.image_size = image_size
        self._grid = backbone.grid_for(image_size)

    @property
    def num_heads(self) -> int:
        return self.cfg.heads

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the feature map, and so of every map, for ``image_size`` inputs."""
        return self._grid

    @property
    def patch_feature_dim(self) -> int:
        return self.backbone.channels

    @property
    def pretrained_cfg(self) -> dict:
        return self.backbone.pretrained_cfg

    def probe_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.probe_features(images)

    def patch_features(self, images: torch.Tensor | None, trunk: Trunk | None = None) -> torch.Tensor:
        """The backbone's feature map as (B, h * w, C): what each cell of a map looks at (``trunk``: the
        images' ``trunk_of``, which holds them, in place of running the backbone)."""
        feature_map = self.backbone(images) if trunk is None else trunk.features
        return feature_map.flatten(2).transpose(1, 2)

    def memory(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output and positional encoding, (B, h*w, d) each."""
        return self._memory(self._feature_map(images))

    def _feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map (B, C, h, w), refused when it is not the grid this INTR was built for."""
        feature_map = self.backbone(images)
        h, w = feature_map.shape[-2:]
        if (h, w) != self._grid:
            raise ValueError(f"images of {tuple(images.shape[-2:])} px give a {h}x{w} feature map; this INTR "
                             f"was built for {self.image_size} px images ({self._grid[0]}x{self._grid[1]})")
        return feature_map

    def _memory(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``memory`` from the backbone's feature map (B, C, h, w)."""
        features = self.input_proj(feature_map)
        b, d, h, w = features.shape
        src = features.flatten(2).transpose(1, 2)
        pos = sine_position(b, h, w, d, src.device, src.dtype)
        for layer in self.transformer.encoder.layers:
            src = layer(src, pos)
        return src, pos

    def _queries(self, b: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        query_pos = self.query_embed.weight.to(dtype).unsqueeze(0).expand(b, -1, -1)
        return torch.zeros_like(query_pos), query_pos

    def trunk_of(self, images: torch.Tensor) -> Trunk:
        """Encoder memory, the input of the last decoder layer and the query positions ((B, *, d) each),
        with the backbone's feature map: shared by the methods that take ``trunk=``."""
        feature_map = self._feature_map(images)
        return Trunk(self._decoder_trunk(feature_map), feature_map)

    def _decoder_trunk(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder memory, the input of the last decoder layer and the query positions, (B, *, d) each."""
        memory, pos = self._memory(feature_map)
        tgt, query_pos = self._queries(memory.shape[0], memory.dtype)
        for layer in self.transformer.decoder.layers[:-1]:
            tgt = layer(tgt, memory, query_pos)
        return memory, tgt, query_pos

    def _last_layer_input(self, images: torch.Tensor | None, trunk: Trunk | None = None):
        """Everything before the last decoder layer's cross-attention, computed once (from ``trunk`` if given)."""
        return self._last_layer_start(*(self.trunk_of(images) if trunk is None else trunk).tensors)

    def _last_layer_start(self, memory: torch.Tensor, tgt: torch.Tensor, query_pos: torch.Tensor):
        """The last decoder layer up to its cross-attention: the layer, its queries' input and q, k, v."""
        last = self.transformer.decoder.layers[-1]
        tgt = last.before_cross(tgt, query_pos)
        q, k, v = last.multihead_attn.project(tgt + query_pos, memory, memory)
        return last, tgt, q, k, v

    def _presence(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.presence_head(self.transformer.decoder.norm(tgt)).squeeze(-1)

    def _finish(self, last: DecoderLayer, tgt: torch.Tensor, head_out: torch.Tensor) -> torch.Tensor:
        cross = last.multihead_attn.out_proj(head_out.flatten(-2))
        return self._presence(last.after_cross(tgt, cross))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C); fused attention everywhere."""
        return self.logits_of(self.trunk_of(images))

    def logits_of(self, trunk: Trunk) -> torch.Tensor:
        """Class logits from a ``trunk_of`` (attention dropout while training, as ``forward``)."""
        last, tgt, q, k, v = self._last_layer_input(None, trunk)
        attn = last.multihead_attn
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if self.training else 0.0)
        return self._finish(last, tgt, out.transpose(1, 2))

    def forward_with_maps(self, images: torch.Tensor | None, classes: torch.Tensor,
                          blur: torch.Tensor | None = None,
                          trunk: Trunk | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and last-layer cross-attention maps (B, R, heads, h, w) of some class queries.

        ``blur`` (B, R, heads) zeroes those heads' pre-softmax logits for that row. ``trunk``: the
        images' ``trunk_of``, in place of running it (``images`` is then not read).
        """
        last, tgt, q, k, v = self._last_layer_input(images, trunk)
        attn = last.multihead_attn
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, C, heads, hd)
        qs = torch.gather(q, 2, classes[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        weights = attn.explicit(qs, k, blur)  # (B, heads, R, N)
        rows = (weights @ v).transpose(1, 2)
        out = out.scatter(1, classes[:, :, None, None].expand_as(rows), rows)
        maps = weights.transpose(1, 2).unflatten(-1, self.grid_size)
        return self._finish(last, tgt, out), maps

    def blur_context(self, images: torch.Tensor | None, target: torch.Tensor,
                     trunk: Trunk | None = None) -> BlurContext:
        """Everything head ranking needs for the ``target`` class queries, computed once.

        Args:
            images: (B, 3, H, W).
            target: (B,) class ids, or (B, R) for R query rows per image that share one
                pass up to the last layer; the context's rows are then the B * R (image, row)
                pairs, image-major.
            trunk: the images' ``trunk_of``, in place of running it (``images`` is then not read).
        """
        trunk = self.trunk_of(images) if trunk is None else trunk  # in the caller's precision
        with float32_last_block(target.device):
            dtype = self.presence_head.weight.dtype
            return self._blur_context_from_trunk(*(t.to(dtype) for t in trunk.tensors), target)

    def _blur_context_from_trunk(self, memory: torch.Tensor, tgt: torch.Tensor, query_pos: torch.Tensor,
                                 target: torch.Tensor) -> BlurContext:
        """:meth:`blur_context` after the decoder trunk, in the inputs' dtype (called with autocast off)."""
        last, tgt, q, k, v = self._last_layer_start(memory, tgt, query_pos)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        logits = self._finish(last, tgt, out)
        idx = target.view(target.shape[0], -1)  # (B, R)
        qt = torch.gather(q, 2, idx[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        normal = (last.multihead_attn.explicit(qt, k) @ v).transpose(1, 2).flatten(0, 1)  # (B * R, heads, hd)
        blurred = v.mean(dim=2).repeat_interleave(idx.shape[1], dim=0)
        tgt_row = torch.gather(tgt, 1, idx.unsqueeze(-1).expand(-1, -1, tgt.shape[-1])).flatten(0, 1).unsqueeze(1)

        def finish(head_out: torch.Tensor, row: torch.Tensor | None = None) -> torch.Tensor:
            tgt_in = tgt_row if row is None else tgt_row[row]
            with float32_last_block(tgt_in.device):  # candidates differ below bf16's resolution
                return self._finish(last, tgt_in.expand(-1, head_out.shape[1], -1), head_out.to(tgt_in.dtype))

        return BlurContext(normal, blurred, finish, logits.repeat_interleave(idx.shape[1], dim=0),
                           target.reshape(-1))


def xavier_init_transformer(transformer: nn.Module) -> None:
    """Xavier-uniform every matrix of ``transformer`` (every parameter with dim > 1), as DETR does.

    Args:
        transformer: the encoder-decoder (its biases and norms keep their init).
    """
    for p in transformer.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def train_only_backbone_layers(backbone: FeatureBackbone, layers: list[str]) -> None:
    """Freeze every backbone parameter outside the named top-level modules (``layer2`` ...).

    Args:
        backbone: the feature backbone.
        layers: names of the body's child modules that keep training (DETR: layer2, layer3, layer4).
    """
    children = {name for name, _ in backbone.body.named_children()}
    unknown = sorted(set(layers) - children)
    if unknown:
        raise ValueError(f"train_backbone_layers names {unknown}, which the backbone does not have "
                         f"(its layers: {sorted(children)})")
    for name, p in backbone.body.named_parameters():
        p.requires_grad_(name.split(".", 1)[0] in layers)


def load_detr_checkpoint(model: INTR, path) -> None:
    """Load a DETR checkpoint (``detr-r50-e632da11.pth`` layout) into ``model``.

    ``backbone.0.body.*`` goes to the ResNet, ``transformer.*`` and
    ``input_proj.*`` load as they are; DETR's object queries, class and box
    heads are dropped (INTR has one query per class and a presence head).
    A trained INTR released by the paper loads whole through ``intr.models.published``.
    """
    state = read_checkpoint(path)
    state = state.get("model", state)
    mapped = {}
    for key, value in state.items():
        if key.startswith("backbone.0.body."):
            mapped["backbone.body." + key[len("backbone.0.body."):]] = value
        elif key.startswith(("transformer.", "input_proj.")):
            mapped[key] = value
    check_shapes(model, mapped, path, "DETR checkpoint")
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    allowed = ("query_embed.", "presence_head.")
    missing = [k for k in missing if not k.startswith(allowed) and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"DETR checkpoint {path} does not fit this INTR: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")


def build_intr(options: Mapping[str, Any], num_classes: int, image_size: int) -> INTR:
    """INTR from the config's ``model`` section.

    Args:
        options: ``backbone`` (BackboneSpec mapping), ``transformer``
            (TransformerConfig fields), ``detr_checkpoint`` (optional DETR
            weights), ``freeze_backbone``, ``train_backbone_layers`` (null: all),
            ``xavier_init`` (every transformer matrix, before any checkpoint loads).
        num_classes: number of classes.
        image_size: input side in pixels.
    """
    spec = BackboneSpec.from_dict(options["backbone"])
    model = INTR(FeatureBackbone(spec), num_classes, TransformerConfig(**dict(options.get("transformer") or {})),
                 image_size)
    if options.get("xavier_init", False):
        xavier_init_transformer(model.transformer)
    if options.get("detr_checkpoint"):
        load_detr_checkpoint(model, resolve_checkpoint(options["detr_checkpoint"]))
    if options.get("train_backbone_layers") is not None:
        train_only_backbone_layers(model.backbone, list(options["train_backbone_layers"]))
    if options.get("freeze_backbone", False):
        model.backbone.requires_grad_(False)
    return model
