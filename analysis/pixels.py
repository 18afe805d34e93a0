"""Reading an image file's pixels the same way in ``prepare``, the networks' loader and the report.

Two rules live here so that the manifest's width, height and mode describe
exactly the pixels the network later sees:

* **Bit depth.** Images with more than 8 bits per sample (16-bit grayscale PNG
  or TIFF: Pillow modes ``I;16``, ``I;16B``, ``I;16L``, ``I``) are scaled to 8
  bits, ``round(v * 255 / (2**bits - 1))`` with ``bits`` from the TIFF's
  BitsPerSample tag (16 otherwise): a 16-bit value v becomes round(v / 257).
  Pillow's own conversion clips them at 255, which turns almost every pixel
  white. 16-bit colour PNG and TIFF files Pillow already reads as 8-bit RGB by
  each sample's high byte (v // 256), which is a scaling too.
* **Frame.** EXIF orientation is *not* applied: every data kind is used in the
  frame the pixels are stored in. CUB's keypoints and boxes and the synthetic
  masks are annotated in that frame, and the report's crops are cut from the
  stored pixels too, so network, annotations and report agree. ``prepare``
  counts the images whose EXIF orientation is not 1 (a photo viewer shows them
  rotated or mirrored) and says so in its summary.

Pillow warns about (and above twice the limit refuses) images with more than
``PIL.Image.MAX_IMAGE_PIXELS`` pixels without naming the file; ``open_image``
silences that bare warning so that its callers can name the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

# Modes whose samples hold more than 8 bits of one gray channel.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
TIFF_BITS_PER_SAMPLE = 258


def open_image(path: str | Path) -> Image.Image:
    """``Image.open(path)`` without Pillow's anonymous decompression-bomb warning (see ``over_size_limit``).

    Pillow still raises ``DecompressionBombError`` above twice its limit.

    Args:
        path: the image file.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def over_size_limit(image: Image.Image) -> bool:
    """Whether ``image`` has more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow's warning limit).

    Args:
        image: an opened image.
    """
    limit = Image.MAX_IMAGE_PIXELS
    return limit is not None and image.width * image.height > limit


def size_warning(path: str | Path, image: Image.Image) -> str:
    """The message naming a file above Pillow's size limit.

    Args:
        path: the image file.
        image: the opened image.
    """
    return (f"{path}: {image.width} x {image.height} = {image.width * image.height} pixels, above Pillow's "
            f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS); it is used, but "
            f"decoding it takes much memory: downscale the file if it is not meant to be this large")


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1: as stored; 2-8: a viewer mirrors or rotates it), 1 without a tag.

    Args:
        image: an opened image.
    """
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block means no usable orientation, not a broken image
        return 1
    return value if isinstance(value, int) else 1


def bits_per_sample(image: Image.Image) -> int:
    """Significant bits of a high-bit-depth image's samples: TIFF's BitsPerSample, else 16.

    Args:
        image: an opened image of one of ``HIGH_BIT_DEPTH_MODES``.
    """
    tags = getattr(image, "tag_v2", None)
    bits = tags.get(TIFF_BITS_PER_SAMPLE) if tags is not None else None
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return int(bits) if isinstance(bits, int) and 8 < bits <= 32 else 16


def to_rgb8(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB, high bit depths scaled to 0-255 (not clipped), in the stored frame.

    Args:
        image: an opened (or loaded) image of any mode.
    """
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image.convert("RGB")
    full_scale = 2 ** bits_per_sample(image) - 1
    # float32 is exact enough: v / 257 is never within 1/514 of a rounding tie.
    samples = np.asarray(image).astype(np.float32)
    gray = np.rint(np.clip(samples, 0, full_scale) * np.float32(255 / full_scale)).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
