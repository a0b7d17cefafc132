"""From a chat (messages with `<image>` markers + images) to an engine request, and back to streamed text.

The one place where eval_vlm.py, web_demo.py and the API server turn user input into a prompt:
the chat template (dataset.lm_dataset.render_conversation), CLIP preprocessing
(dataset.image_processing) and the serving engine (model.engine). Every check that is cheap comes
before the work it protects: image headers (pixels, aspect ratio) before decoding, the text's length
before tokenizing, the token count before any model work.
"""
from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import torch

from dataset.image_processing import load_image, preprocess_image
from dataset.lm_dataset import render_conversation

from .engine import Engine, GenRequest
from .model_vlm import image_slots

IMAGE_MARKER = "<image>"
# The published scripts' default image-description prompt.
DEFAULT_PROMPT = "仔细看一下这张图：\n\n<image>\n\n描述一下这个图像的内容。"
MAX_IMAGE_PIXELS = 40_000_000  # ~6300 x 6300: bigger uploads are refused, not decoded
MAX_ASPECT = 20                # beyond 20:1 the centre crop keeps under 5% of the image; resizing it costs a lot
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


def open_image(src: bytes | str, name: str = "image", max_pixels: int = MAX_IMAGE_PIXELS,
               max_aspect: float = MAX_ASPECT) -> Any:
    """Decode an upload (bytes or path) into an RGB PIL image, with user-facing errors. The size and
    aspect ratio are read from the header and checked before any pixel is decoded."""
    import warnings

    from PIL import Image
    # PIL refuses (DecompressionBombError) above twice this: a last line behind our own header check.
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS // 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as probe:
                width, height = probe.size
    except FileNotFoundError:
        raise ChatInputError(f"{name}: file not found") from None
    except Image.DecompressionBombError:
        raise ChatInputError(f"{name} is too large (limit {max_pixels / 1e6:g} megapixels)", "image_too_large") from None
    except Exception as e:  # PIL raises many kinds for junk
        raise ChatInputError(f"{name} is not an image that can be read ({type(e).__name__})",
                             "invalid_image") from None
    if width < 1 or height < 1 or width * height > max_pixels:
        raise ChatInputError(f"{name} is too large: {width}x{height} (limit {max_pixels / 1e6:g} megapixels)",
                             "image_too_large")
    if max(width, height) > max_aspect * min(width, height):
        raise ChatInputError(f"{name} is {width}x{height}: aspect ratio over {max_aspect:g}:1 is not accepted",
                             "invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return load_image(src)
    except (ValueError, OSError):
        raise ChatInputError(f"{name} is not an image that can be read (it could not be decoded)",
                             "invalid_image") from None


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


def check_text(text: str, what: str = "text") -> None:
    """Refuse text that cannot be tokenized (lone surrogates from JSON escapes such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ChatInputError(f"{what} is not valid Unicode (a lone surrogate?)") from None


def build_batch(tokenizer: Any, conversations: list[list[dict]], images: list[list], image_token: str,
                names: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Several chats -> (input_ids [B, T] left-padded so every prompt ends where generation starts,
    attention_mask [B, T], pixel_values [B, Nmax, 3, 224, 224] or None), for batch work outside the
    engine (benchmarks/). Each chat's PIL images come in marker order; a chat with fewer than Nmax
    images gets zeros in the spare places (never read). A bad chat raises ChatInputError, prefixed
    with its entry of `names` when given."""
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
    """One chat -> (input_ids [1, T], pixel_values [1, N, 3, 224, 224] or None), with the generation prompt."""
    input_ids, _, pixel_values = build_batch(tokenizer, [messages], [images], image_token)
    return input_ids, pixel_values


def encode_chat(engine: Engine, messages: list[dict], images: list) -> tuple[list[int], torch.Tensor | None]:
    """One chat (roles user/assistant/system, `<image>` markers in the text, images in marker order: PIL
    images or preprocessed [3, 224, 224] tensors) -> (prompt ids with the generation prompt, pixel_values
    [N, 3, 224, 224] or None). Raises ChatInputError for anything the engine could not run."""
    check_conversation(messages, len(images))
    chars = sum(len(m["content"]) for m in messages)
    for m in messages:
        check_text(m["content"], f"a {m['role']} message")
    if chars > engine.max_context * CHARS_PER_TOKEN:
        raise ChatInputError(f"the prompt has {chars} characters: far more than a context of "
                             f"{engine.max_context} tokens holds", "context_length_exceeded")
    cfg = engine.model.config
    text = render_conversation(engine.tokenizer, messages, add_generation_prompt=True,
                               image_token=cfg.image_special_token)
    ids = engine.encode(text)
    if len(ids) >= engine.max_context:
        raise ChatInputError(f"the prompt is {len(ids)} tokens; the context holds {engine.max_context} "
                             f"(prompt and answer together)", "context_length_exceeded")
    in_slot, _, patch = image_slots(torch.tensor([ids]), cfg.image_ids[0], len(cfg.image_ids))
    slots = int((in_slot & (patch == 0)).sum())
    if slots != len(images):  # e.g. 196 '@' typed as text make a slot of their own
        raise ChatInputError(f"the prompt has {slots} image slot(s) for {len(images)} image(s): "
                             f"text may not contain runs of {len(cfg.image_ids)} '@'")
    if not images:
        return ids, None
    pixels = torch.stack([im if isinstance(im, torch.Tensor) else preprocess_image(im) for im in images])
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
