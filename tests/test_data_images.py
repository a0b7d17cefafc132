"""Image decoding and CLIP preprocessing against transformers' processor."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.image_processing import load_image, preprocess_image, to_rgb


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def random_image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P")
        img.info["transparency"] = 0  # palette index 0 transparent
        return img
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "L": 1, "CMYK": 4}[mode]
    a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if channels == 1 else a, mode=mode)


@pytest.mark.parametrize("mode,size", [("RGB", (128, 96)), ("RGB", (64, 64)), ("RGB", (224, 224)),
                                        ("RGB", (333, 500)), ("RGB", (225, 1000)), ("RGBA", (100, 300)),
                                        ("LA", (90, 90)), ("L", (300, 200)), ("P", (64, 80)), ("CMYK", (500, 333))])
def test_preprocess_matches_transformers(mode, size):
    from transformers import CLIPImageProcessorPil
    img = random_image(mode, size)
    ref = torch.from_numpy(CLIPImageProcessorPil()(images=img, return_tensors="np")["pixel_values"][0])
    out = preprocess_image(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 1e-5


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent black
    assert to_rgb(img).getpixel((5, 5)) == (255, 255, 255)


def test_16_bit_images_are_scaled_not_clipped():
    a = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 0 .. 65520
    img16 = Image.fromarray(a)  # mode I;16
    assert img16.mode.startswith("I")
    rgb = np.asarray(load_image(encode(img16)))
    expected = np.round(a / 65535 * 255).astype(np.uint8)
    assert rgb.shape == (64, 64, 3)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert 0 < rgb.mean() < 250  # PIL's plain convert would saturate almost everything to white


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_load_image_bytes_and_file(tmp_path, fmt):
    img = random_image("RGB", (40, 30))
    data = encode(img, fmt)
    from_bytes = load_image(data)
    (tmp_path / "x.img").write_bytes(data)
    from_file = load_image(tmp_path / "x.img")
    assert from_bytes.mode == "RGB" and from_bytes.size == (40, 30)
    assert np.array_equal(np.asarray(from_bytes), np.asarray(from_file))


@pytest.mark.parametrize("data", [b"", b"not an image at all", encode(random_image("RGB", (64, 64)), "JPEG")[:300]])
def test_undecodable_bytes_raise_value_error(data):
    with pytest.raises(ValueError, match="decode|empty"):
        load_image(data)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")
