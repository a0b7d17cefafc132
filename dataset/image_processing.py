"""Image decoding and CLIP preprocessing, with PIL and numpy only.

    bytes / file -> PIL RGB (transparency composited on white, 16-bit scaled to 8-bit)
      -> resize shortest side to 224 (bicubic) -> centre-crop 224x224
      -> [0, 1] -> normalise with CLIP's mean/std -> FloatTensor [3, 224, 224]

Equal to transformers' `CLIPImageProcessorPil` within 1e-5 (tests/test_data_images.py), without
loading transformers in every data-loader worker.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

SIZE = 224
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as transformers' CLIP processor does it: anything with transparency (RGBA, LA, P with a
    transparent index) is composited on white; 16/32-bit integer images are scaled to 8 bits
    (PIL's own conversion would clip them to white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), mode="L")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr, 1, ...


def load_image(src: bytes | str | Path) -> Image.Image:
    """Decode encoded image bytes or an image file into an RGB PIL image.

    Raises FileNotFoundError for a missing file and ValueError for data PIL cannot decode.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ValueError("empty image bytes")
        what, fp = "image bytes", io.BytesIO(bytes(src))
    else:
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        what, fp = str(path), path
    try:
        with Image.open(fp) as img:
            img.load()  # decode now: a truncated file must fail here, not later in a worker's collate
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode {what}: {e}") from e


def resize_shortest_side(img: Image.Image, size: int = SIZE) -> Image.Image:
    """Shortest side to `size`, the other scaled and truncated to int (as transformers does)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def center_crop(a: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Centre crop of an [H, W, C] array (offsets rounded down)."""
    h, w = a.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return a[top:top + size, left:left + size]


def preprocess_image(img: Image.Image) -> torch.Tensor:
    """A PIL image -> CLIP's normalised FloatTensor [3, 224, 224]."""
    a = np.asarray(resize_shortest_side(to_rgb(img)), dtype=np.float32)
    a = center_crop(a) * np.float32(1 / 255)
    a = (a - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
