"""Explanation baselines on a trained model's own frozen backbone.

The comparison in Prompt-CAM's Table 1 is only fair when every explanation
looks at the same features, so the baselines run on the backbone of the model
being evaluated:

* :class:`LinearProbe`: the frozen backbone's probe features (the same
  ``[class token, mean patch token]`` after the final norm that
  ``model.probe_features`` gives for a ViT, global-average-pooled last stage
  for a CNN) followed by one ``Linear`` layer, as a single torch module
  ``images -> logits``.  :func:`fit_linear_probe` fits it as a standardised
  multinomial logistic regression (scikit-learn) on train+val and folds the
  standardisation into the linear layer.
* :func:`cam_maps`: Grad-CAM, Layer-CAM and Eigen-CAM (the ``grad-cam``
  package) of that probe.  On a ViT the target layer is the last block's
  ``norm1`` and :func:`vit_reshape_transform` drops the prefix tokens and lays
  the patch tokens out on the grid (the package's ViT recipe); on a CNN it is
  the last stage.
* :func:`attention_rollout`: Abnar & Zuidema's rollout of the backbone ViT.

Grad-CAM and Layer-CAM explain a given class (the callers pass the true
class); Eigen-CAM and rollout do not depend on any class.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from intr.models.backbones import sha256_of

CAM_METHODS = ("gradcam", "layercam", "eigencam")


def backbone_vit(model: nn.Module) -> VisionTransformer | None:
    """The timm ViT inside a Prompt-CAM or INTR model's backbone (None for a CNN backbone)."""
    backbone = model.backbone
    if isinstance(backbone, VisionTransformer):
        return backbone
    body = getattr(backbone, "body", None)
    if getattr(backbone, "is_vit", False) and isinstance(body, VisionTransformer):
        return body
    return None


class BackboneFeatures(nn.Module):
    """``images -> (B, F)`` probe features of a model's backbone, differentiable.

    For a ViT: the class token and the mean patch token of ``forward_features``
    (after the final norm), concatenated; for a CNN feature backbone: its last
    stage, globally average-pooled.  These equal ``model.probe_features``.

    Args:
        model: a Prompt-CAM or INTR model; only its ``backbone`` is kept.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.vit = backbone_vit(model)
        self._probe_features = model.probe_features  # reads only the backbone (registered above)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._probe_features(images)

    def target_layer(self) -> nn.Module:
        """The layer the CAMs read: the last ViT block's ``norm1``, or the CNN's last stage."""
        if self.vit is not None:
            return self.vit.blocks[-1].norm1
        return list(self.backbone.body.children())[-1]


class LinearProbe(nn.Module):
    """Frozen backbone features followed by a linear classifier: ``images -> logits``.

    When autograd is on and the input does not require gradients, the input is
    made to require them, so that a CAM's hooks see gradients even though
    every backbone weight is frozen.
    """

    def __init__(self, features: BackboneFeatures, linear: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.linear = linear

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not images.requires_grad:
            images = images.detach().requires_grad_(True)
        return self.linear(self.features(images))


@torch.no_grad()
def extract_features(features: nn.Module, images: Callable[[int], torch.Tensor], n: int,
                     device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Features (n, F) of ``images(i)`` for i in range(n), batched."""
    out = []
    features.eval()
    for start in range(0, n, batch_size):
        batch = torch.stack([images(i) for i in range(start, min(start + batch_size, n))]).to(device)
        out.append(features(batch).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def linear_from_logistic(coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray,
                         mean: np.ndarray, scale: np.ndarray, num_classes: int) -> nn.Linear:
    """A ``Linear(F, num_classes)`` equal to a logistic regression on standardised features.

    ``logits = coef @ ((x - mean) / scale) + intercept`` for the classes the
    regression saw; a class it never saw gets a logit of -1e4.  A binary
    regression (one coefficient row ``w``) becomes the logits ``(-z/2, z/2)``,
    whose softmax is the regression's sigmoid.
    """
    coef = np.asarray(coef, np.float64)
    intercept = np.asarray(intercept, np.float64)
    if coef.shape[0] == 1 and len(classes) == 2:
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    weight = coef / scale[None, :]
    bias = intercept - weight @ mean
    full_w = np.zeros((num_classes, coef.shape[1]))
    full_b = np.full(num_classes, -1e4)
    full_w[classes] = weight
    full_b[classes] = bias
    linear = nn.Linear(coef.shape[1], num_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(full_w))
        linear.bias.copy_(torch.from_numpy(full_b))
    return linear.requires_grad_(False)


def fit_probe_regression(x: np.ndarray, y: np.ndarray, c: float = 0.5):
    """The linear probe's fit: a multinomial logistic regression (``C=c``) on standardised features.

    Returns:
        (scaler, regression): the fitted ``StandardScaler`` and ``LogisticRegression``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y)) < 2:
        raise ValueError("the linear probe needs training images of at least two classes")
    scaler = StandardScaler().fit(x)
    return scaler, LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(x), y)


def fit_linear_probe(model: nn.Module, data, num_classes: int, device: torch.device,
                     batch_size: int = 256, c: float = 0.5) -> LinearProbe:
    """Fit the linear probe on ``data`` (an ImageSet, usually train+val) and return it on ``device``.

    Standardised features, multinomial logistic regression (``fit_probe_regression``, the probe of
    ``intr.evaluate``'s ``linear_probe`` row), standardisation folded into the layer.
    """
    features = BackboneFeatures(model).to(device).eval()
    x = extract_features(features, lambda i: data[i][0], len(data), device, batch_size)
    scaler, reg = fit_probe_regression(x, data.labels.numpy(), c)
    return probe_from_regression(features, scaler, reg, num_classes, device)


def probe_from_regression(features: BackboneFeatures, scaler, reg, num_classes: int,
                          device: torch.device) -> LinearProbe:
    """The torch probe of a fitted (scaler, regression), standardisation folded into its layer."""
    linear = linear_from_logistic(reg.coef_, reg.intercept_, reg.classes_.astype(int), scaler.mean_,
                                  scaler.scale_, num_classes)
    return LinearProbe(features, linear.to(device)).eval()


PROBE_FORMAT = "intr-linear-probe/1"


def save_linear_probe(probe: LinearProbe, path, model_path) -> None:
    """Write the probe's layer to ``path`` (atomic), with the sha256 of the ``model.pt`` its features come from."""
    from pathlib import Path

    from intr.models.checkpoint import save_checkpoint

    save_checkpoint({"format": PROBE_FORMAT, "model_sha256": sha256_of(model_path),
                     "weight": probe.linear.weight.detach().cpu(), "bias": probe.linear.bias.detach().cpu()}, Path(path))


def load_linear_probe(model: nn.Module, path, model_path, device: torch.device) -> LinearProbe:
    """The probe ``save_linear_probe`` wrote for this ``model_path``, on ``model``'s frozen backbone.

    Raises:
        CheckpointError: the file is damaged or not a checkpoint (``read_checkpoint``).
        ValueError: naming ``path`` when it is not a probe file, or was fitted on another model.pt
            (the probe's layer would read another backbone's features).
    """
    from intr.models.checkpoint import read_checkpoint

    state = read_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != PROBE_FORMAT:
        raise ValueError(f"{path}: not a linear probe written by intr evaluate (format {PROBE_FORMAT})")
    if state["model_sha256"] != sha256_of(model_path):
        raise ValueError(f"{path} was fitted on another model than {model_path} (sha256 differs): rerun "
                         "intr evaluate on this model to refit it")
    features = BackboneFeatures(model).to(device).eval()
    weight, bias = state["weight"], state["bias"]
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return LinearProbe(features, linear.requires_grad_(False).to(device)).eval()


def vit_reshape_transform(num_prefix: int, grid: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Token activations (B, prefix + gh*gw, D) -> (B, D, gh, gw), prefix tokens dropped."""
    gh, gw = grid

    def transform(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, num_prefix:]
        if patches.shape[1] != gh * gw:
            raise ValueError(f"expected {gh * gw} patch tokens after {num_prefix} prefix tokens, "
                             f"got {patches.shape[1]}")
        return patches.reshape(tokens.shape[0], gh, gw, tokens.shape[-1]).permute(0, 3, 1, 2)

    return transform


def cam_maps(probe: LinearProbe, images: torch.Tensor, target: torch.Tensor,
             methods: Sequence[str] = CAM_METHODS) -> dict[str, np.ndarray]:
    """CAM heat maps of the probe at input resolution, ``{method: (B, H, W) float32 in [0, 1]}``.

    Grad-CAM and Layer-CAM explain ``target`` (one class per image); Eigen-CAM
    is the first principal component of the target layer's activations and
    ignores it.  The package min-max scales each map to [0, 1].
    """
    from pytorch_grad_cam import EigenCAM, GradCAM, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = {"gradcam": GradCAM, "layercam": LayerCAM, "eigencam": EigenCAM}
    unknown = [m for m in methods if m not in classes]
    if unknown:
        raise ValueError(f"unknown CAM method(s) {unknown}; expected some of {sorted(classes)}")
    vit = probe.features.vit
    reshape = None
    if vit is not None:
        reshape = vit_reshape_transform(vit.num_prefix_tokens, tuple(vit.patch_embed.grid_size))
    layer = probe.features.target_layer()
    targets = [ClassifierOutputTarget(int(t)) for t in target.tolist()]
    out = {}
    for name in methods:
        with classes[name](model=probe, target_layers=[layer], reshape_transform=reshape) as cam:
            out[name] = np.asarray(cam(input_tensor=images, targets=targets), dtype=np.float32)
    probe.zero_grad(set_to_none=True)
    return out


def rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of per-layer attention.

    Each layer's attention (B, heads, N, N) is averaged over heads, the
    identity is added (the residual path) and rows are renormalised to sum 1;
    the layers are multiplied from the first to the last:
    ``R = A_L ... A_2 A_1``.  Returns R (B, N, N); row 0 is the class token's
    flow over every token.
    """
    result = None
    for attn in attentions:
        a = attn.float().mean(1)
        a = a + torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    if result is None:
        raise ValueError("attention rollout needs at least one layer")
    return result


@torch.no_grad()
def vit_attentions(vit: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's softmax attention (B, heads, N, N) of a timm ViT on ``images``.

    Computed from each block's attention input (hooked), with the block's own
    q/k projections, q/k norms and scale; the forward pass itself is timm's.
    """
    found: list[torch.Tensor] = []

    def hook(module, args):
        x = args[0]
        B, N, _ = x.shape
        qkv = module.qkv(x).reshape(B, N, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        q, k = module.q_norm(qkv[0]), module.k_norm(qkv[1])
        found.append(((q * module.scale) @ k.transpose(-2, -1)).softmax(-1))

    handles = [block.attn.register_forward_pre_hook(hook) for block in vit.blocks]
    try:
        vit.forward_features(images)
    finally:
        for h in handles:
            h.remove()
    return found


@torch.no_grad()
def attention_rollout(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Rollout maps (B, gh, gw): the class token's rolled-out attention over the patches.

    A ViT without a class token uses the mean over the patch rows instead.
    """
    r = rollout(vit_attentions(vit, images))
    prefix = vit.num_prefix_tokens
    rows = r[:, 0] if prefix else r[:, prefix:].mean(1)
    gh, gw = vit.patch_embed.grid_size
    return rows[:, prefix:].reshape(-1, gh, gw)


def pool_to_grid(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Average-pool (B, H, W) maps onto a (gh, gw) grid (adaptive pooling when not divisible)."""
    return F.adaptive_avg_pool2d(maps.unsqueeze(1).float(), grid).squeeze(1)
