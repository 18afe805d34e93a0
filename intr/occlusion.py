"""Occlusion operators: what a removed region of an image becomes.

Region effects (``intr.extract``) and insertion/deletion (``intr.faithfulness``)
both ask "how does the model's output change when these pixels are removed?".
The answer depends on what "removed" means, and this module is its one home.
Every operator works on a batch of (N, C, H, W) images (normalised as the
model expects) and (N, 1, H, W) masks, hard (0/1) or soft (in [0, 1]; 1 =
removed), and returns ``images * (1 - mask) + fill * mask``:

* ``blur``: the fill is the image under a Gaussian blur of ``sigma =
  blur_sigma * side`` (RISE's protocol, the one Prompt-CAM's faithfulness
  figures use; kept so those figures stay comparable with the papers).  A
  small blur keeps a region's colour, so it barely removes a colour trait;
* ``strong_blur``: the same with ``sigma = STRONG_BLUR_SIGMA * side``: the
  fill is close to the colour of a large neighbourhood;
* ``mean_fill``: the fill is the image's mean colour (one colour per image);
* ``background_fill``: the fill is the colour of the region's surroundings,
  by normalised convolution: a Gaussian blur (``BACKGROUND_SIGMA * side``)
  of the image with the region cut out, divided by the same blur of the
  kept-pixel weights, so no removed pixel contributes to the fill.  Where no
  kept pixel is near (weight below ``MIN_WEIGHT``, e.g. everything removed),
  the fill falls back to the mean colour of the kept pixels, or of the
  image when nothing is kept.

Normalisation is a per-channel affine map, so each operator gives the same
result on normalised tensors as on pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

OPERATORS = ("blur", "strong_blur", "mean_fill", "background_fill")
STRONG_BLUR_SIGMA = 0.25  # fraction of the image side
BACKGROUND_SIGMA = 0.1  # fraction of the image side: how far the surroundings reach
MIN_WEIGHT = 1e-3  # normalised convolution: less kept weight than this is "no surroundings"


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (B, C, H, W) images with standard deviation ``sigma`` pixels (the RISE blur).

    Kernel width ``2 ceil(3 sigma) + 1`` (capped so that reflect padding fits
    the image); ``sigma <= 0`` returns the images unchanged.

    Args:
        images: (B, C, H, W) float images.
        sigma: standard deviation in pixels.
    """
    if sigma <= 0:
        return images.clone()
    h, w = images.shape[-2:]
    half = min(int(math.ceil(3 * sigma)), h - 1, w - 1)
    if half < 1:
        return images.clone()
    return tv_gaussian_blur(images, kernel_size=[2 * half + 1] * 2, sigma=[float(sigma)] * 2)


def separable_gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """The same blur as ``gaussian_blur`` (same kernel, reflect padding) as two 1-D passes.

    Large sigmas make the 2-D kernel cost ``(2 ceil(3 sigma) + 1)^2`` per pixel; two 1-D passes
    cost twice the width.  Equal to ``gaussian_blur`` up to float rounding.

    Args:
        images: (B, C, H, W) float images.
        sigma: standard deviation in pixels.
    """
    h, w = images.shape[-2:]
    half = min(int(math.ceil(3 * sigma)), h - 1, w - 1)
    if sigma <= 0 or half < 1:
        return images.clone()
    x = torch.linspace(-half, half, 2 * half + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    rows = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    cols = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    out = F.conv2d(F.pad(images, [half, half, 0, 0], mode="reflect"), rows, groups=channels)
    return F.conv2d(F.pad(out, [0, 0, half, half], mode="reflect"), cols, groups=channels)


def mean_colour(images: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C, 1, 1) mean colour of each image, over the pixels' ``weights`` (N, 1, H, W) when given.

    An image whose weights sum to zero gets its plain mean colour.

    Args:
        images: (N, C, H, W) images.
        weights: (N, 1, H, W) non-negative pixel weights, or None for all pixels alike.
    """
    plain = images.mean((2, 3), keepdim=True)
    if weights is None:
        return plain
    total = weights.sum((2, 3), keepdim=True)
    weighted = (images * weights).sum((2, 3), keepdim=True) / total.clamp_min(1e-12)
    return torch.where(total > 0, weighted, plain)


def background_fill(images: torch.Tensor, removed: torch.Tensor, sigma: float) -> torch.Tensor:
    """The colour of each removed pixel's surroundings: normalised convolution of the kept pixels.

    Args:
        images: (N, C, H, W) images.
        removed: (N, 1, H, W) masks in [0, 1], 1 = removed.
        sigma: the surroundings' Gaussian reach in pixels.
    """
    kept = (1 - removed).to(images.dtype)
    blurred = separable_gaussian_blur(torch.cat([images * kept, kept], 1), sigma)
    colour, weight = blurred[:, :-1], blurred[:, -1:]
    fallback = mean_colour(images, kept)
    return torch.where(weight > MIN_WEIGHT, colour / weight.clamp_min(MIN_WEIGHT), fallback)


class Occlusion:
    """One occlusion operator with its settings; ``occlusion(images, removed)`` gives the occluded images.

    Args:
        operator: one of ``OPERATORS``.
        blur_sigma: the ``blur`` operator's sigma as a fraction of the image side.
    """

    def __init__(self, operator: str, blur_sigma: float) -> None:
        if operator not in OPERATORS:
            raise ValueError(f"occlusion operator must be one of {OPERATORS}, got {operator!r}")
        self.operator = operator
        self.blur_sigma = float(blur_sigma)

    def __repr__(self) -> str:
        return f"Occlusion({self.operator!r}, blur_sigma={self.blur_sigma})"

    @property
    def fill_depends_on_mask(self) -> bool:
        """Whether the fill changes with the removed pixels (else one fill per image serves every mask)."""
        return self.operator == "background_fill"

    def fill(self, images: torch.Tensor, removed: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, H, W) values the removed pixels take.

        Args:
            images: (N, C, H, W) images.
            removed: (N, 1, H, W) masks (1 = removed); only ``background_fill`` reads them, and
                None there means every pixel removed.
        """
        side = max(images.shape[-2:])
        if self.operator == "blur":
            return gaussian_blur(images, self.blur_sigma * side)
        if self.operator == "strong_blur":
            return separable_gaussian_blur(images, STRONG_BLUR_SIGMA * side)
        if self.operator == "mean_fill":
            return mean_colour(images).expand_as(images)
        if removed is None:
            removed = torch.ones_like(images[:, :1])
        return background_fill(images, removed, BACKGROUND_SIGMA * side)

    def __call__(self, images: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
        """``images`` with the ``removed`` (N, 1, H, W) pixels replaced by the operator's fill.

        Args:
            images: (N, C, H, W) images.
            removed: (N, 1, H, W) masks in [0, 1], 1 = removed.
        """
        removed = removed.to(images.dtype)
        return images * (1 - removed) + self.fill(images, removed) * removed


class LookalikeFill:
    """Pair-specific region fill: region r of an image of A becomes look-alike B's colour of region r.

    "What does the model say when this region of A looks like it does in B?" A blur, a
    mean or a background fill removes a region, so every large salient region moves the
    A - B margin; this fill changes a region only as far as B's typical appearance of it
    differs from A's, so regions A and B share barely move, and the region where they
    differ moves it most: a data-driven stand-in for the counterfactual renders, built
    from the images and the configured regions alone (no part labels).

    ``colours[c, r]`` is the mean colour (in the images' own, e.g. normalised, space) of
    region r's pixels over the images of class c; where class c has fewer than
    ``MIN_PIXELS`` pixels of region r, the mean over all classes' images takes its place.

    Where the regions come with body frames (discovered parts, ``analysis.part_discovery.BodyFrames``),
    ``places[c, r, p]`` is that mean over only the pixels in cell p of the ``PLACE_BINS`` x
    ``PLACE_BINS`` body-frame grid (``colours[c, r]`` where class c has fewer than
    ``MIN_PLACE_PIXELS`` there), and each pixel is filled with B's colour of the region at its own
    place of the body. A discovered region that holds pieces of two parts (a crown and, in some
    birds, a breast) then changes each piece only as far as B's colour of it differs, not all of it
    to one colour between the two.

    Args:
        colours: (classes, regions, C) mean colours.
        places: (classes, regions, PLACE_BINS ** 2, C) mean colours per body-frame cell (None: no frames).
    """

    MIN_PIXELS = 16
    MIN_PLACE_PIXELS = 4
    PLACE_BINS = 12  # cells per side of the body-frame grid (+-3 spreads: half a spread per cell)

    def __init__(self, colours: torch.Tensor, places: torch.Tensor | None = None) -> None:
        self.colours = colours
        self.places = places

    def __repr__(self) -> str:
        return f"LookalikeFill({tuple(self.colours.shape)}, places={self.places is not None})"

    def __call__(self, images: torch.Tensor, removed: torch.Tensor, class_b: torch.Tensor,
                 region: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        """``images`` with the ``removed`` (N, 1, H, W) pixels set to class ``class_b``'s colour of ``region``.

        Args:
            images: (N, C, H, W) images.
            removed: (N, 1, H, W) masks in [0, 1], 1 = removed.
            class_b: (N,) look-alike class per image; region: (N,) region id per image.
            cells: (N, H, W) each pixel's body-frame cell (``places``' third axis), -1 where the image
                has no frame (None: no frames): the colour of the pixel's place where known.
        """
        removed = removed.to(images.dtype)
        fill = self.colours.to(images.device, images.dtype)[class_b, region][:, :, None, None]  # (N, C, 1, 1)
        if self.places is not None and cells is not None:
            table = self.places.to(images.device, images.dtype)[class_b, region]  # (N, P, C)
            rows = torch.arange(len(table), device=images.device)[:, None, None]
            placed = table[rows, cells.clamp_min(0)].permute(0, 3, 1, 2)  # (N, C, H, W)
            fill = torch.where((cells >= 0)[:, None], placed, fill)
        return images * (1 - removed) + fill * removed


class LookalikeSums:
    """The sums a ``LookalikeFill`` is made from, added up batch by batch over a split.

    Args:
        num_classes, n_regions, channels: the tables' shape.
        device: where the sums are kept.
    """

    def __init__(self, num_classes: int, n_regions: int, channels: int, device: torch.device | str = "cpu") -> None:
        places = LookalikeFill.PLACE_BINS ** 2
        self.sums = torch.zeros(num_classes, n_regions, channels, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, n_regions, dtype=torch.float64, device=device)
        self.place_sums = torch.zeros(num_classes, n_regions, places, channels, dtype=torch.float64, device=device)
        self.place_counts = torch.zeros(num_classes, n_regions, places, dtype=torch.float64, device=device)
        self.framed = False

    def add(self, images: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor,
            cells: torch.Tensor | None = None) -> None:
        """Add a batch: images (N, C, H, W), labels (N, H, W) region ids, classes (N,), cells (N, H, W)
        body-frame cells, -1 where an image has no frame (None: none has)."""
        n_regions, places = self.counts.shape[1], self.place_counts.shape[2]
        key = (classes.view(-1, 1) * n_regions + labels.flatten(1).long()).flatten()  # (N * H * W,)
        pixels = images.permute(0, 2, 3, 1).reshape(-1, images.shape[1]).double()
        ones = torch.ones_like(key, dtype=torch.float64)
        self.sums.view(-1, self.sums.shape[-1]).index_add_(0, key, pixels)
        self.counts.view(-1).index_add_(0, key, ones)
        if cells is None:
            return
        cell = cells.flatten().long()
        framed = cell >= 0
        self.framed |= bool(framed.any())
        placed = key[framed] * places + cell[framed]
        self.place_sums.view(-1, self.sums.shape[-1]).index_add_(0, placed, pixels[framed])
        self.place_counts.view(-1).index_add_(0, placed, ones[framed])

    def fill(self) -> LookalikeFill:
        """The fill: mean colours with their fallbacks (``LookalikeFill``); places only where frames were added."""
        overall = self.sums.sum(0) / self.counts.sum(0).clamp_min(1)[:, None]
        colours = _mean_or(self.sums, self.counts, LookalikeFill.MIN_PIXELS, overall[None])
        if not self.framed:
            return LookalikeFill(colours.float())
        places = _mean_or(self.place_sums, self.place_counts, LookalikeFill.MIN_PLACE_PIXELS, colours[:, :, None])
        return LookalikeFill(colours.float(), places.float())


def _mean_or(sums: torch.Tensor, counts: torch.Tensor, floor: int, fallback: torch.Tensor) -> torch.Tensor:
    """``sums / counts`` (colour on the last axis of ``sums``) where ``counts >= floor``, else ``fallback``
    (broadcast to the means' shape)."""
    mean = sums / counts.clamp_min(1)[..., None]
    return torch.where((counts >= floor)[..., None], mean, fallback.expand_as(mean))
