"""model/chat.py: chats to engine requests, with every check before the work it protects."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.chat import ChatInputError, encode_chat, open_image
from model.processor import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(tiny_clip):
    from model import PROJECT_TOKENIZER
    from model.engine import Engine
    from model.model_vlm import MiniMindVLM, VLMConfig
    torch.manual_seed(0)
    model = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=2), vision_model_path=tiny_clip).eval()
    eng = Engine(model, load_tokenizer(PROJECT_TOKENIZER), max_batch=2, max_context=600)
    yield eng
    eng.close()


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 60, 3), dtype=np.uint8))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format="PNG")
    return buf.getvalue()


def test_encode_chat_ids_and_pixels(engine):
    from model.processor import render_conversation
    chat = user("First <image> then <image>: which is red?")
    ids, px = encode_chat(engine, chat, [image(2), image(3)])
    text = render_conversation(engine.tokenizer, chat, add_generation_prompt=True, image_text="@" * 196)
    assert ids == engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(34) == 2 * 196
    assert px.shape == (2, 3, 224, 224) and torch.equal(px[1], engine.processor.image_processor.pixels(image(3)))
    assert encode_chat(engine, user("hello"), [])[1] is None  # no image, no pixel tensor


@pytest.mark.parametrize("chat, images, match", [
    (user("   "), [], "the prompt is empty"),
    (user("<image> what?"), [], r"1 <image> marker\(s\) but 0"),
    (user("<image>" * 9), [image(0)] * 9, "at most 8 images"),
    (user("@" * 196 + " is this an image?"), [], "image slot"),                # a slot typed as text
    (user("bad \ud800 surrogate"), [], "not valid Unicode"),
    (user(" ".join(map(str, range(400)))), [], "context holds 600"),           # too many tokens
    (user("x" * (600 * 32 + 1)), [], "characters"),                             # refused before tokenizing
])
def test_bad_chats_are_refused(engine, chat, images, match):
    with pytest.raises(ChatInputError, match=match):
        encode_chat(engine, chat, images)


def test_image_headers_are_checked_before_decoding(monkeypatch):
    from PIL import PngImagePlugin
    decoded = []
    load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: decoded.append(self.size) or load(self))
    with pytest.raises(ChatInputError, match="aspect ratio") as e:
        open_image(png((1, 20000)))                  # resized, this would be 224 x 4.5 million pixels
    assert e.value.code == "invalid_image"
    with pytest.raises(ChatInputError, match="too large") as e:
        open_image(png((8000, 8000)), max_pixels=10_000_000)
    assert e.value.code == "image_too_large"
    with pytest.raises(ChatInputError, match="not an image"):
        open_image(b"definitely not an image")
    assert decoded == []                             # none of them was decoded
    assert open_image(png((40, 30))).size == (40, 30)
    assert set(decoded) == {(40, 30)}
