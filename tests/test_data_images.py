"""model/processor.py: the image decoder and CLIP preprocessing against transformers' processor."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.processor import ImageError, MiniMindVLMImageProcessor, decode_image, to_rgb

preprocess_image = MiniMindVLMImageProcessor().pixels


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
    rgb = np.asarray(decode_image(encode(img16)))
    expected = np.round(a / 65535 * 255).astype(np.uint8)
    assert rgb.shape == (64, 64, 3)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert 0 < rgb.mean() < 250  # PIL's plain convert would saturate almost everything to white


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_image_bytes_and_file(tmp_path, fmt):
    img = random_image("RGB", (40, 30))
    data = encode(img, fmt)
    from_bytes = decode_image(data)
    (tmp_path / "x.img").write_bytes(data)
    from_file = decode_image(tmp_path / "x.img")
    assert from_bytes.mode == "RGB" and from_bytes.size == (40, 30)
    assert np.array_equal(np.asarray(from_bytes), np.asarray(from_file))


@pytest.mark.parametrize("data", [b"", b"not an image at all", encode(random_image("RGB", (64, 64)), "JPEG")[:300]])
def test_undecodable_bytes_raise_image_error(data):
    with pytest.raises(ImageError, match="not an image that can be read|empty") as e:
        decode_image(data)
    assert e.value.kind == "unreadable"


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ImageError, match="nope.png: file not found") as e:
        decode_image(tmp_path / "nope.png")
    assert e.value.kind == "missing"


# ---- hostile images: refused from the header, never decoded or resized ---------------------------
def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data: a decompression bomb's first bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.fixture
def decodes(monkeypatch):
    """The sizes of the images whose pixels get decoded."""
    from PIL import ImageFile
    seen = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: seen.append(self.size) or load(self))
    return seen


@pytest.mark.parametrize("data, kind, match", [
    (encode(Image.new("L", (1, 20000), 128)), "aspect", "1x20000: aspect ratio over 20:1"),
    (png_header(8000, 8000), "too_large", "8000x8000 .limit 40 megapixels"),        # PIL itself only warns
    (png_header(100_000, 100_000), "too_large", "too large"),                       # PIL's own bomb error
])
def test_hostile_headers_are_refused_without_decoding(data, kind, match, decodes):
    assert len(data) < 200
    with pytest.raises(ImageError, match=match) as e:
        decode_image(data, "upload")
    assert e.value.kind == kind and decodes == []


def test_limits_are_parameters_and_bytes_come_first(tmp_path, decodes):
    ok = encode(random_image("RGB", (300, 40)))
    with pytest.raises(ImageError, match="aspect ratio over 5:1"):
        decode_image(ok, max_aspect=5)
    with pytest.raises(ImageError, match="limit 0.01 megapixels"):
        decode_image(ok, max_pixels=10_000)
    (tmp_path / "big.png").write_bytes(ok)
    with pytest.raises(ImageError, match="MiB encoded") as e:
        decode_image(tmp_path / "big.png", max_bytes=100)
    assert e.value.kind == "too_large" and decodes == []
    assert decode_image(ok).size == (300, 40) and decodes == [(300, 40)]


def test_image_processor_checks_a_lazily_opened_image_first(decodes):
    with Image.open(io.BytesIO(png_header(8000, 8000))) as lazy:
        with pytest.raises(ImageError, match="too large"):
            preprocess_image(lazy)
    assert decodes == []


def test_pad_images_lays_out_each_samples_images_zero_padded():
    from model.processor import pad_images
    a, c = torch.randn(2, 3, 8, 8), torch.randn(1, 3, 8, 8)
    pixels, num = pad_images([a, torch.zeros(0, 3, 8, 8), c])
    assert pixels.shape == (3, 2, 3, 8, 8) and num.tolist() == [2, 0, 1]
    assert torch.equal(pixels[0], a) and torch.equal(pixels[2, :1], c)
    assert not pixels[1].any() and not pixels[2, 1].any()
    assert pad_images([torch.zeros(0, 3, 8, 8)] * 2)[0] is None and pad_images([])[0] is None
