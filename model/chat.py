"""From a chat (messages with `<image>` markers + images) to model inputs, and back to streamed text.

The one place where eval_vlm.py, web_demo.py and the API server turn user input into a prompt:
the chat template (dataset.lm_dataset.render_conversation), CLIP preprocessing
(dataset.image_processing) and the fast generation loop (model.generate.stream_text).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from dataset.image_processing import load_image, preprocess_image
from dataset.lm_dataset import render_conversation

from .generate import stream_text

IMAGE_MARKER = "<image>"
# SPEC §6: the published scripts' default image-description prompt.
DEFAULT_PROMPT = "仔细看一下这张图：\n\n<image>\n\n描述一下这个图像的内容。"
MAX_IMAGE_PIXELS = 40_000_000  # ~6300 x 6300: bigger uploads are refused, not decoded
MAX_IMAGES = 8


class ChatInputError(ValueError):
    """A user mistake in a request (no prompt, bad image, marker/image mismatch): shown, never raised through."""


def with_image_markers(prompt: str, n_images: int) -> str:
    """Put one `<image>` per image in front of a prompt that has none; keep the user's own markers."""
    if IMAGE_MARKER in prompt or n_images == 0:
        return prompt
    return "\n".join([IMAGE_MARKER] * n_images) + "\n" + prompt


def open_image(src: bytes | str, name: str = "image") -> Any:
    """Decode an upload (bytes or path) into an RGB PIL image, with user-facing errors."""
    import warnings
    from PIL import Image
    # PIL warns above MAX_IMAGE_PIXELS and refuses (DecompressionBombError) above twice that:
    # refuse everything over our limit before it is decoded.
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS // 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = load_image(src)
    except FileNotFoundError as e:
        raise ChatInputError(str(e)) from None
    except ValueError as e:
        msg = str(e)
        if "decompression bomb" in msg.lower() or "exceeds limit" in msg.lower():
            raise ChatInputError(f"{name} is too large (limit {MAX_IMAGE_PIXELS // 1_000_000} megapixels)") from None
        raise ChatInputError(f"{name} is not an image this demo can read ({msg})") from None
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise ChatInputError(f"{name} is too large (limit {MAX_IMAGE_PIXELS // 1_000_000} megapixels)")
    return img


def check_conversation(messages: list[dict], n_images: int) -> None:
    """Raise ChatInputError unless `messages` ends with a non-empty user turn whose `<image>` markers
    match the images given."""
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ChatInputError("the prompt is empty: type a question")
    n_markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
    if n_markers != n_images:
        raise ChatInputError(f"the conversation has {n_markers} <image> marker(s) but {n_images} image(s)")
    if n_images > MAX_IMAGES:
        raise ChatInputError(f"at most {MAX_IMAGES} images per conversation (got {n_images})")


def build_batch(tokenizer: Any, conversations: list[list[dict]], images: list[list], image_token: str,
                names: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Several chats -> (input_ids [B, T] left-padded so every prompt ends where generation starts,
    attention_mask [B, T], pixel_values [B, Nmax, 3, 224, 224] or None). Each chat's PIL images come in
    marker order; a chat with fewer than Nmax images gets zeros in the spare places (never read).
    A bad chat raises ChatInputError, prefixed with its entry of `names` when given."""
    for i, (messages, imgs) in enumerate(zip(conversations, images, strict=True)):
        try:
            check_conversation(messages, len(imgs))
        except ChatInputError as e:
            raise ChatInputError(f"{names[i]}: {e}" if names else str(e)) from None
    texts = [render_conversation(tokenizer, m, add_generation_prompt=True, image_token=image_token)
             for m in conversations]
    enc = tokenizer(texts, return_tensors="pt", padding=len(texts) > 1, padding_side="left", add_special_tokens=False)
    n_max = max(len(imgs) for imgs in images)
    pixel_values = None
    if n_max:
        pixel_values = torch.zeros(len(images), n_max, 3, 224, 224)
        for i, imgs in enumerate(images):
            for j, img in enumerate(imgs):
                pixel_values[i, j] = preprocess_image(img)
    return enc["input_ids"], enc["attention_mask"], pixel_values


def build_inputs(tokenizer: Any, messages: list[dict], images: list, image_token: str
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chat (messages with roles user/assistant/system, `<image>` markers in the text, PIL images in
    marker order) -> (input_ids [1, T], pixel_values [1, N, 3, 224, 224] or None), with the generation prompt."""
    input_ids, _, pixel_values = build_batch(tokenizer, [messages], [images], image_token)
    return input_ids, pixel_values


def answer(model: Any, tokenizer: Any, messages: list[dict], images: list, max_new_tokens: int = 512,
           temperature: float = 0.65, top_p: float = 0.85, repetition_penalty: float = 1.0,
           stats: dict | None = None) -> Iterator[str]:
    """Stream the assistant's reply to `messages` as text pieces. Input problems raise ChatInputError
    here, before the first piece (so a server can still answer 400). `stats` (optional dict) receives
    prompt_tokens, new_tokens, ttft_s (vision encoder + prefill + first piece), seconds, finish_reason."""
    input_ids, pixel_values = build_inputs(tokenizer, messages, images, model.config.image_special_token)
    stats = stats if stats is not None else {}
    stats.update(prompt_tokens=input_ids.shape[1], new_tokens=0)
    if pixel_values is not None:
        pixel_values = pixel_values.to(model.dtype)

    def pieces() -> Iterator[str]:
        start = time.perf_counter()
        for i, piece in enumerate(stream_text(model, tokenizer, input_ids, pixel_values, max_new_tokens,
                                              temperature, top_p, repetition_penalty, stats=stats)):
            if i == 0:
                stats["ttft_s"] = time.perf_counter() - start
            stats["seconds"] = time.perf_counter() - start
            yield piece
        stats["seconds"] = time.perf_counter() - start
        stats["finish_reason"] = "length" if stats["new_tokens"] >= max_new_tokens else "stop"
    return pieces()
