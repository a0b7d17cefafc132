"""model/chat.py: chats to model inputs, one at a time (the demos) and batched (eval_vlm.py --bench)."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from dataset.image_processing import preprocess_image
from model import resolve
from model.chat import ChatInputError, build_batch, build_inputs

TOKEN = "@" * 196


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(resolve("model/tokenizer")))


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 60, 3), dtype=np.uint8))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_batch_is_left_padded_rows_of_the_single_chat_builder(tok):
    chats = [user("What is two plus two, in words?"), user("<image>\nColour?"),
             user("First <image> then <image>: which is red?")]
    images = [[], [image(1)], [image(2), image(3)]]
    ids, mask, px = build_batch(tok, chats, images, TOKEN)
    assert ids.shape[0] == 3 and mask.shape == ids.shape and px.shape == (3, 2, 3, 224, 224)
    for i, (chat, imgs) in enumerate(zip(chats, images)):
        alone, alone_px = build_inputs(tok, chat, imgs, TOKEN)
        n = alone.shape[1]
        assert torch.equal(ids[i, -n:], alone[0]) and mask[i, -n:].all() and not mask[i, :-n].any()
        for j in range(2):
            want = alone_px[0, j] if j < len(imgs) else torch.zeros(3, 224, 224)
            assert torch.equal(px[i, j], want)
    assert torch.equal(px[2, 1], preprocess_image(image(3)))
    assert build_inputs(tok, chats[0], [], TOKEN)[1] is None  # no image, no pixel tensor


def test_bad_chats_raise_with_their_name(tok):
    with pytest.raises(ChatInputError, match=r"^eval.parquet row 7: the conversation has 1 <image> marker\(s\) but 0"):
        build_batch(tok, [user("hi"), user("<image> what?")], [[], []], TOKEN, names=["row 6", "eval.parquet row 7"])
    with pytest.raises(ChatInputError, match="the prompt is empty"):
        build_inputs(tok, user("   "), [], TOKEN)
    with pytest.raises(ChatInputError, match="at most 8 images"):
        build_inputs(tok, user("<image>" * 9), [image(0)] * 9, TOKEN)
