"""Images for the networks: decoding, the evaluation resize, and seeded augmentation.

Pixels are read by ``analysis.pixels``: 16-bit images scaled to 8 bits, EXIF
orientation not applied (the stored frame, the one the annotations use).

Evaluation geometry (what attention maps resize back to): the whole image is
resized to ``size x size`` (no crop, aspect not kept), so patch cell (i, j) of
a g x g grid covers image pixels x in [j W/g, (j+1) W/g), y in [i H/g, (i+1) H/g)
of the original W x H image: a map is brought back to image pixels by
resizing each axis independently.

Augmentation is drawn from a generator seeded by (seed, epoch, index), never
from a process-wide random state, so a sample looks the same in one process
or split across DDP ranks, and a resumed run sees the same epochs.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from analysis.pixels import open_image, over_size_limit, size_warning, to_rgb8

PRELOAD_LIMIT_BYTES = 2 << 30


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Decode one image as 8-bit RGB in its stored frame and resize it to (3, size, size) uint8.

    Bit depth and frame follow ``analysis.pixels`` (the rules ``prepare`` used);
    an image above Pillow's size limit gives a warning naming the file.

    Args:
        path: the image file.
        size: side of the square output.
    """
    with open_image(path) as im:
        if over_size_limit(im):
            warnings.warn(size_warning(path, im), stacklevel=2)
        im = to_rgb8(im)
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        array = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def augment(image: torch.Tensor, generator: torch.Generator, min_scale: float = 0.75,
            max_scale: float = 1.0) -> torch.Tensor:
    """Random resized crop (area fraction in [``min_scale``, ``max_scale``], near-square) and horizontal flip.

    Colour is left alone: the planted traits are colours, and jitter strong
    enough to matter would swap them.  Prompt-CAM's resize-to-240, random
    224 crop is ``min_scale = max_scale = (224 / 240) ** 2``.
    """
    _, h, w = image.shape
    r = torch.rand(4, generator=generator).tolist()
    scale = min_scale + (max_scale - min_scale) * r[0]
    ch, cw = max(1, round(h * scale ** 0.5)), max(1, round(w * scale ** 0.5))
    top, left = int(r[1] * (h - ch + 1)), int(r[2] * (w - cw + 1))
    crop = image[:, top:top + ch, left:left + cw].unsqueeze(0).float()
    out = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False).squeeze(0)
    if r[3] < 0.5:
        out = out.flip(-1)
    return out.round().clamp(0, 255).to(torch.uint8)


class ImageSet(Dataset):
    """Images of one split from the manifest, normalised for a backbone.

    Args:
        root: the data set root the manifest's paths are relative to
            (``images/`` is tried first, as in the CUB layout).
        manifest: rows of ``manifest.parquet`` (image_id, path, class_id ...).
        size: side of the network input.
        mean: per-channel mean of the backbone (0-1 scale).
        std: per-channel std of the backbone.
        train: apply seeded augmentation.
        seed: augmentation seed.
        crop_area: [min, max] area fraction of the augmentation's crop.
        preload: decode everything once into memory (default: when it fits
            in ``PRELOAD_LIMIT_BYTES``).
    """

    def __init__(self, root: str | Path, manifest: pd.DataFrame, size: int,
                 mean: Sequence[float], std: Sequence[float], train: bool = False, seed: int = 0,
                 preload: bool | None = None, crop_area: tuple[float, float] = (0.75, 1.0)) -> None:
        self.root = Path(root)
        self.rows = manifest.reset_index(drop=True)
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255
        self.train = train
        self.seed = seed
        self.crop_area = crop_area
        self.epoch = 0
        self.labels = torch.as_tensor(self.rows["class_id"].to_numpy(np.int64))
        self.image_ids = torch.as_tensor(self.rows["image_id"].to_numpy(np.int64))
        if preload is None:
            preload = len(self.rows) * 3 * size * size <= PRELOAD_LIMIT_BYTES
        self.cache = torch.stack([self._decode(i) for i in range(len(self.rows))]) if preload and len(self.rows) else None

    def _path(self, i: int) -> Path:
        rel = self.rows.at[i, "path"]
        under_images = self.root / "images" / rel
        return under_images if under_images.exists() else self.root / rel

    def _decode(self, i: int) -> torch.Tensor:
        return load_image(self._path(i), self.size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def raw(self, i: int) -> torch.Tensor:
        """The uint8 image before augmentation and normalisation."""
        return self.cache[i] if self.cache is not None else self._decode(i)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.raw(i)
        if self.train:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, int(i))) & 0x7FFFFFFF)
            image = augment(image, g, *self.crop_area)
        return (image.float() - self.mean) / self.std, int(self.labels[i])


def read_split(manifest_path: str | Path, split: str | Sequence[str]) -> pd.DataFrame:
    """Rows of the manifest in ``split`` (a name or several), ordered by image_id."""
    manifest = pd.read_parquet(manifest_path)
    splits = [split] if isinstance(split, str) else list(split)
    rows = manifest[manifest["split"].isin(splits)].sort_values("image_id")
    if rows.empty:
        raise ValueError(f"{manifest_path} has no images in split {splits}")
    return rows.reset_index(drop=True)
