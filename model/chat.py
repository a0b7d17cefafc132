"""From a chat (messages with `<image>` markers + images) to an engine request, and back to streamed text.

The one place where eval_vlm.py, web_demo.py and the API server turn user input into a prompt, through
the model's processor (model/processor.py: the chat template, the image decoder, the preprocessing)
and the serving engine (model/engine.py). Every check that is cheap comes before the work it protects:
image headers (pixels, aspect ratio) before decoding, the text's length before tokenizing, the token
count before any model work.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .engine import Engine, GenRequest
from .processor import (
    IMAGE_MARKER,
    IMAGE_PLACEHOLDER,
    MAX_ASPECT,
    MAX_IMAGE_PIXELS,
    ImageError,
    MiniMindVLMProcessor,
    count_markers,
    count_slots,
    decode_image,
)

# The published scripts' default image-description prompt.
DEFAULT_PROMPT = "仔细看一下这张图：\n\n<image>\n\n描述一下这个图像的内容。"
MAX_IMAGES = 8
CHARS_PER_TOKEN = 32           # no token of either tokenizer is longer: more characters than this per
                               # context position cannot fit, so such text is refused before tokenizing


class ChatInputError(ValueError):
    """A user mistake in a request (no prompt, bad image, marker/image mismatch, too long): shown, never raised
    through. `code` is the OpenAI-style error code the API server reports."""

    def __init__(self, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.code = code


def with_image_markers(prompt: str, n_images: int) -> str:
    """Put one `<image>` per image in front of a prompt that has none; keep the user's own markers."""
    if IMAGE_MARKER in prompt or n_images == 0:
        return prompt
    return "\n".join([IMAGE_MARKER] * n_images) + "\n" + prompt


def open_image(src: bytes | str | Path, name: str = "image", max_pixels: int = MAX_IMAGE_PIXELS,
               max_aspect: float = MAX_ASPECT) -> Any:
    """Decode an upload (bytes or path) into an RGB PIL image with model.processor.decode_image (its
    size, then the header's pixels and aspect ratio, are checked before any pixel is decoded), with
    user-facing errors."""
    try:
        return decode_image(src, name, max_pixels, max_aspect)
    except ImageError as e:
        raise ChatInputError(str(e), "image_too_large" if e.kind == "too_large" else "invalid_image") from None


def image_tensor(processor: MiniMindVLMProcessor, src: bytes | str | Path, name: str = "image",
                 max_pixels: int = MAX_IMAGE_PIXELS, max_aspect: float = MAX_ASPECT) -> torch.Tensor:
    """An upload, decoded (open_image) and preprocessed for the model at once: FloatTensor [3, S, S]."""
    return processor.image_processor.pixels(open_image(src, name, max_pixels, max_aspect), name)


def check_conversation(messages: list[dict], n_images: int) -> None:
    """Raise ChatInputError unless `messages` ends with a non-empty user turn whose `<image>` markers
    match the images given."""
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ChatInputError("the prompt is empty: type a question")
    n_markers = count_markers(messages)
    if n_markers != n_images:
        raise ChatInputError(f"the conversation has {n_markers} <image> marker(s) but {n_images} image(s)")
    if n_images > MAX_IMAGES:
        raise ChatInputError(f"at most {MAX_IMAGES} images per conversation (got {n_images})")


def check_text(text: str, what: str = "text") -> None:
    """Refuse text that cannot be tokenized (lone surrogates from JSON escapes such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ChatInputError(f"{what} is not valid Unicode (a lone surrogate?)") from None


def build_batch(processor: MiniMindVLMProcessor, conversations: list[list[dict]], images: list[list],
                names: list[str] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Several chats -> (input_ids [B, T] left-padded so every prompt ends where generation starts,
    attention_mask [B, T], pixel_values [B, Nmax, 3, S, S] or None, num_images [B]), for batch work
    outside the engine (benchmarks/). Each chat's PIL images come in marker order; a chat with fewer
    than Nmax images gets zeros in the spare places (num_images says which are real). A bad chat
    raises ChatInputError, prefixed with its entry of `names` when given."""
    for i, (messages, imgs) in enumerate(zip(conversations, images, strict=True)):
        try:
            check_conversation(messages, len(imgs))
        except ChatInputError as e:
            raise ChatInputError(f"{names[i]}: {e}" if names else str(e)) from None
    texts = [processor.render(m, add_generation_prompt=True) for m in conversations]
    enc = processor.tokenizer(texts, return_tensors="pt", padding=len(texts) > 1, padding_side="left",
                              add_special_tokens=False)
    pixel_values, num_images = processor.image_processor.batch(images)
    return enc["input_ids"], enc["attention_mask"], pixel_values, num_images


def build_inputs(processor: MiniMindVLMProcessor, messages: list[dict], images: list
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chat -> (input_ids [1, T], pixel_values [1, N, 3, S, S] or None), with the generation prompt."""
    input_ids, _, pixel_values, _ = build_batch(processor, [messages], [images])
    return input_ids, pixel_values


def encode_chat(engine: Engine, messages: list[dict], images: list) -> tuple[list[int], torch.Tensor | None]:
    """One chat (roles user/assistant/system, `<image>` markers in the text, images in marker order: PIL
    images or preprocessed [3, S, S] tensors) -> (prompt ids with the generation prompt, pixel_values
    [N, 3, S, S] or None). Raises ChatInputError for anything the engine could not run."""
    check_conversation(messages, len(images))
    chars = sum(len(m["content"]) for m in messages)
    for m in messages:
        check_text(m["content"], f"a {m['role']} message")
    if chars > engine.max_context * CHARS_PER_TOKEN:
        raise ChatInputError(f"the prompt has {chars} characters: far more than a context of "
                             f"{engine.max_context} tokens holds", "context_length_exceeded")
    p = engine.processor
    ids = engine.encode(p.render(messages, add_generation_prompt=True))
    if len(ids) >= engine.max_context:
        raise ChatInputError(f"the prompt is {len(ids)} tokens; the context holds {engine.max_context} "
                             f"(prompt and answer together)", "context_length_exceeded")
    slots = int(count_slots(torch.tensor([ids]), p.image_token_id, p.image_seq_length)[0])
    if slots != len(images):  # e.g. a slot's worth of '@' typed as text makes a slot of its own
        raise ChatInputError(f"the prompt has {slots} image slot(s) for {len(images)} image(s): "
                             f"text may not contain runs of {p.image_seq_length} {IMAGE_PLACEHOLDER!r}")
    if not images:
        return ids, None
    pixels = torch.stack([im if isinstance(im, torch.Tensor) else p.image_processor.pixels(im) for im in images])
    return ids, pixels


def answer(engine: Engine, messages: list[dict], images: list, max_new_tokens: int = 512,
           temperature: float = 0.65, top_p: float = 0.85, repetition_penalty: float = 1.0,
           stats: dict | None = None, seed: int | None = None) -> Iterator[str]:
    """Stream the assistant's reply to `messages` as text pieces. Input problems raise ChatInputError
    here, before the first piece. Closing the returned generator (or abandoning it) cancels the
    generation. `stats` (optional dict) receives prompt_tokens, new_tokens, ttft_s (vision encoder +
    prefill + first token, queueing included), seconds, finish_reason."""
    ids, pixel_values = encode_chat(engine, messages, images)
    stats = stats if stats is not None else {}
    stats.update(prompt_tokens=len(ids), new_tokens=0)
    start = time.perf_counter()
    handle = engine.submit(GenRequest(ids, pixel_values, max_new_tokens, temperature, top_p,
                                      repetition_penalty, seed))

    def pieces() -> Iterator[str]:
        try:
            for ev in handle:
                if ev.error:
                    raise RuntimeError(ev.error)
                stats["new_tokens"] = handle.completion_tokens[0]
                stats["seconds"] = time.perf_counter() - start
                if handle.first_token_at is not None:
                    stats.setdefault("ttft_s", handle.first_token_at - start)
                if ev.finish:
                    stats["finish_reason"] = ev.finish
                if ev.text:
                    yield ev.text
        finally:
            handle.cancel()  # a no-op once finished; frees the row when the reader stops early
    return pieces()
