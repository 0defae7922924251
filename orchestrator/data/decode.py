"""Decoding one image: encoded bytes or a file path -> a uint8 CHW RGB tensor, or `ImageReadError` naming it.

Every image is turned upright by its EXIF orientation (phone photos; `data.exif_transpose`) and
brought to 8 bits by scaling, not clipping (16-bit PNG and TIFF, 32-bit integer and float images).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch

from orchestrator.config.errors import JobError, plain_text


class ImageReadError(JobError):
    """An image file or blob that cannot be decoded."""


HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""PIL's modes of one-channel images of 16 (or 32) bits per pixel; scaled from 0-65535 to 0-255"""


def decode_image(blob_or_path, where: str, exif_transpose: bool = True) -> torch.Tensor:
    """Encoded bytes or a file path -> uint8 CHW RGB tensor, or ImageReadError naming `where`.

    PIL reads the header (and refuses a decompression bomb); JPEGs are then decoded by torchvision's
    libjpeg-turbo `decode_jpeg` (1.4x PIL's decode + convert + copy here: `orchestrator bench ingest`
    measures both), other formats by PIL.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        data = bytes(blob_or_path) if isinstance(blob_or_path, (bytes, bytearray)) else Path(blob_or_path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG" and img.mode in ("RGB", "L"):
                return _decode_jpeg(data, where, exif_transpose)
            array = np.asarray(rgb_image(img, exif_transpose))
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"image {where} is too large to decode safely: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"cannot read image {where}: {library_message(exc)}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def rgb_image(img, exif_transpose: bool = True):
    """A PIL image as 8-bit RGB: upright by its EXIF orientation (when asked), high bit depths scaled."""
    from PIL import Image, ImageOps

    if exif_transpose:
        img = ImageOps.exif_transpose(img)
    if img.mode in HIGH_BIT_DEPTH_MODES:
        scaled = np.asarray(img).astype(np.float32) / 257.0
        img = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float32)
        top = 1.0 if float(np.nanmax(values, initial=0.0)) <= 1.0 else 65535.0   # [0, 1] floats, else 16-bit counts
        img = Image.fromarray(np.clip(np.rint(np.nan_to_num(values) / top * 255), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def _decode_jpeg(data: bytes, where: str, exif_transpose: bool) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                           apply_exif_orientation=exif_transpose)
    except RuntimeError as exc:
        raise ImageReadError(f"cannot read image {where}: {library_message(exc)}") from None


def library_message(exc: BaseException) -> str:
    """What PIL or torchvision said, fit for one line of ours: no object reprs ('<_io.BytesIO object at
    0x...>' becomes 'it'), no source paths of the library's build ('/__w/vision/...'), no ANSI escapes."""
    text = plain_text(str(exc))
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "it", text)
    text = re.sub(r",?\s*(?:/[\w.+-]+)+\.(?:cpp|cc|c|h|hpp|py):\d+[,:]?", "", text)
    text = re.sub(r"^decode_jpeg\b\s*", "", text)
    text = re.sub(r"\s*Exception raised from .*", "", text, flags=re.S)
    return " ".join(text.split())[:300] or type(exc).__name__
