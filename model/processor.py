"""The image/text contract of MiniMind-V, in one place.

    "<image>" in a message --render--> the placeholder run ('@' x patches) --tokenize--> patches x id 34
    image bytes / file --decode (limits checked on the header first)--> RGB
      --shortest side to image_size (bicubic), centre crop, normalise--> FloatTensor [3, image_size, image_size]

Everything that has to agree between the data, the model and the chat surfaces lives here: the marker,
the placeholder character and its token id, patches per image, the image size / mean / std (read from
the vision tower's own files; the published CLIP ViT-B/16 values are only defaults), the one image
decoder and its limits, the chat rendering and the label rule's assistant header / closer, the ignore
label, the one tokenizer loader, and `MiniMindVLMProcessor` (a transformers processor saved next to an
exported model, so `AutoProcessor` works there).

This file is self-contained (no project imports): transformers copies it into exported model folders.
"""
from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

# ------------------------------------------------------------------------------------------ text side
IMAGE_MARKER = "<image>"  # where an image goes in a message
IMAGE_PLACEHOLDER = "@"   # its token fills an image's slot; the MiniMind tokenizers never merge it with anything
IGNORE_INDEX = -100       # label of positions that are not supervised

# ------------------------------------------------------------------------------------------ published geometry
# CLIP ViT-B/16 at 224 px: 14 x 14 patches of width 768. Defaults only: a vision tower's own files win.
DEFAULT_IMAGE_SIZE = 224
DEFAULT_PATCH_SIZE = 16
DEFAULT_VISION_WIDTH = 768
DEFAULT_IMAGE_TOKEN_ID = 34  # '@' in the MiniMind tokenizers
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ------------------------------------------------------------------------------------------ decoding limits
MAX_IMAGE_BYTES = 128 * 2 ** 20  # encoded size (an uncompressed 40-megapixel RGB file is 120 MB)
MAX_IMAGE_PIXELS = 40_000_000    # ~6300 x 6300: bigger images are refused from their header, never decoded
MAX_ASPECT = 20                  # beyond 20:1 the centre crop keeps under 5% of the image, and resizing the
                                 # short side up costs a lot (1 x 20000 would become 224 x 4.5 million)


def num_patches(image_size: int, patch_size: int) -> int:
    """Patch tokens per image, which is the length of an image slot."""
    return (image_size // patch_size) ** 2


DEFAULT_PATCHES = num_patches(DEFAULT_IMAGE_SIZE, DEFAULT_PATCH_SIZE)


# ------------------------------------------------------------------------------------------ vision tower geometry

def missing_tower_message(path: Path) -> str:
    return (f"no vision model at {path}: run `python scripts/download.py clip` for the real "
            f"openai/clip-vit-base-patch16, or `python scripts/make_tiny_clip.py` for an offline stand-in")


def geometry_of(vision_config: Any) -> dict[str, int]:
    """image_size, patch_size, vision_hidden_size of a vision config (a full CLIP config's vision part)."""
    vc = getattr(vision_config, "vision_config", None) or vision_config
    return {"image_size": int(vc.image_size), "patch_size": int(vc.patch_size),
            "vision_hidden_size": int(vc.hidden_size)}


def vision_geometry(path: str | Path) -> dict[str, Any]:
    """What a vision tower folder says about its input and output: geometry_of its config.json, and
    image_mean / image_std from its preprocessor_config.json (CLIP's when the file is absent).
    Reads JSON only; raises FileNotFoundError (saying how to get one) when there is no model."""
    from transformers import AutoConfig
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(missing_tower_message(path))
    out: dict[str, Any] = geometry_of(AutoConfig.from_pretrained(str(path), trust_remote_code=False))
    pre = path / "preprocessor_config.json"
    p = json.loads(pre.read_text()) if pre.is_file() else {}
    out["image_mean"] = [float(x) for x in p.get("image_mean", CLIP_MEAN)]
    out["image_std"] = [float(x) for x in p.get("image_std", CLIP_STD)]
    return out


def tower_geometry_or_published(path: str | Path | None) -> dict[str, Any]:
    """vision_geometry of the tower folder when there is one, else {} (a config then keeps the published
    ViT-B/16 geometry): for work that needs the geometry but not the tower, e.g. checking data or
    converting text-only weights."""
    try:
        return vision_geometry(path) if path else {}
    except FileNotFoundError:
        return {}


def check_geometry(config: Any, geometry: dict[str, Any], where: str | Path) -> None:
    """One-line ValueError unless a vision tower (`geometry`, from vision_geometry or geometry_of) fits the
    model's config."""
    bad = [f"{k} {geometry[k]} (model: {getattr(config, k)})" for k in geometry
           if not np.allclose(np.asarray(geometry[k], dtype=np.float64), np.asarray(getattr(config, k), dtype=np.float64),
                              rtol=0, atol=1e-6)]
    if bad:
        raise ValueError(f"vision model {where} does not fit this model: {', '.join(bad)}; pass the "
                         f"--vision_model_path the model was trained with")


# ------------------------------------------------------------------------------------------ decoding

class ImageError(ValueError):
    """An image that cannot be used. `kind`: missing, too_large (bytes or pixels), aspect, unreadable."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def check_image_size(size: tuple[int, int], name: str, max_pixels: int = MAX_IMAGE_PIXELS,
                     max_aspect: float = MAX_ASPECT) -> None:
    """Refuse from the (header) size alone: too many pixels or too elongated to resize cheaply."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"{name} is {width}x{height}: not an image that can be read", "unreadable")
    if width * height > max_pixels:
        raise ImageError(f"{name} is too large: {width}x{height} (limit {max_pixels / 1e6:g} megapixels)",
                         "too_large")
    if max(width, height) > max_aspect * min(width, height):
        raise ImageError(f"{name} is {width}x{height}: aspect ratio over {max_aspect:g}:1 is not accepted", "aspect")


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


def decode_image(src: bytes | str | Path, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                 max_aspect: float = MAX_ASPECT, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """The one image decoder: encoded bytes or a file -> RGB PIL image, in bounded memory.

    In order, each before the work it protects: the encoded size, then the header's width x height and
    aspect ratio (PIL's `open` reads only the header), then the full decode. Raises ImageError.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        name, n_bytes, fp = name or "image", len(src), io.BytesIO(bytes(src))
    else:
        path = Path(src)
        name = name or str(path)
        if not path.is_file():
            raise ImageError(f"{name}: file not found", "missing")
        n_bytes, fp = path.stat().st_size, path
    if n_bytes == 0:
        raise ImageError(f"{name} is empty", "unreadable")
    if n_bytes > max_bytes:
        raise ImageError(f"{name} is too large: {n_bytes / 2 ** 20:.0f} MiB encoded (limit {max_bytes / 2 ** 20:g} MiB)",
                         "too_large")
    try:
        with warnings.catch_warnings():
            # PIL warns above ~89 and refuses above ~179 megapixels; our own limit, checked below, is lower.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                check_image_size(img.size, name, max_pixels, max_aspect)
                img.load()  # decode now: a truncated file fails here, not later in a collate
                return to_rgb(img)
    except Image.DecompressionBombError:
        raise ImageError(f"{name} is too large (limit {max_pixels / 1e6:g} megapixels)", "too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{name} is not an image that can be read ({type(e).__name__})", "unreadable") from None


# ------------------------------------------------------------------------------------------ preprocessing

def resize_shortest_side(img: Image.Image, size: int) -> Image.Image:
    """Shortest side to `size`, the other scaled and truncated to int (as transformers does)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def center_crop(a: np.ndarray, size: int) -> np.ndarray:
    """Centre crop of an [H, W, C] array (offsets rounded down)."""
    h, w = a.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return a[top:top + size, left:left + size]


class MiniMindVLMImageProcessor(BaseImageProcessor):
    """CLIP-style preprocessing: RGB -> shortest side to `image_size` (bicubic) -> centre crop ->
    [0, 1] -> (x - mean) / std -> FloatTensor [3, image_size, image_size]. Equal to transformers'
    CLIPImageProcessorPil within 1e-5. PIL images are size-checked (MAX_IMAGE_PIXELS, MAX_ASPECT)
    before any pixel work, so a lazily opened image is refused from its header."""

    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int = DEFAULT_IMAGE_SIZE, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, max_pixels: int = MAX_IMAGE_PIXELS,
                 max_aspect: float = MAX_ASPECT, **kwargs: Any):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.image_mean = [float(x) for x in image_mean]
        self.image_std = [float(x) for x in image_std]
        self.max_pixels, self.max_aspect = max_pixels, max_aspect

    @classmethod
    def from_config(cls, config: Any) -> MiniMindVLMImageProcessor:
        return cls(config.image_size, config.image_mean, config.image_std)

    def pixels(self, img: Image.Image, name: str = "image") -> torch.Tensor:
        """One PIL image -> its normalised FloatTensor [3, S, S]."""
        check_image_size(img.size, name, self.max_pixels, self.max_aspect)
        a = np.asarray(resize_shortest_side(to_rgb(img), self.image_size), dtype=np.float32)
        a = center_crop(a, self.image_size) * np.float32(1 / 255)
        a = (a - np.asarray(self.image_mean, dtype=np.float32)) / np.asarray(self.image_std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))

    def stack(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> FloatTensor [N, 3, S, S] (N may be 0)."""
        if not images:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        return torch.stack([self.pixels(im, f"image {i}") for i, im in enumerate(images)])

    def batch(self, per_sample: Sequence[Sequence[Image.Image]]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Each sample's PIL images -> (pixel_values [B, Nmax, 3, S, S] zero-padded or None, num_images [B])."""
        return pad_images([self.stack(imgs) for imgs in per_sample])

    def preprocess(self, images: Any, return_tensors: Any = None, **kwargs: Any) -> BatchFeature:
        """A PIL image or a (nested) list of them -> {"pixel_values": FloatTensor [N, 3, S, S]}."""
        return BatchFeature({"pixel_values": self.stack(flatten_images(images))})


def flatten_images(images: Any) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [im for x in images for im in flatten_images(x)]
    return [images]


def pad_images(per_sample: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Each sample's [n_i, 3, S, S] images -> (pixel_values [B, max n_i, 3, S, S] zero-padded, or None
    when no sample has one; num_images LongTensor [B]): the batch layout the model takes. Works for any
    per-image tensors alike (the engine pads vision features [n_i, P, W] with it)."""
    num_images = torch.tensor([t.shape[0] for t in per_sample], dtype=torch.long)
    if not len(per_sample) or not int(num_images.max()):
        return None, num_images
    return torch.nn.utils.rnn.pad_sequence(list(per_sample), batch_first=True), num_images


# ------------------------------------------------------------------------------------------ slots in token ids

def image_slots(input_ids: torch.Tensor, image_id: int, slot_len: int = DEFAULT_PATCHES
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Locate image slots: complete runs of `slot_len` placeholder ids, taken greedily from the
    left inside each maximal run of placeholders (a stray '@' is ordinary text).

    Returns (in_slot [B, T] bool, image index within the sample [B, T], patch index [B, T]);
    the two index tensors are only meaningful where in_slot is True.
    """
    B, T = input_ids.shape
    is_ph = input_ids == image_id
    pos = torch.arange(T, device=input_ids.device).expand(B, T)
    prev = torch.nn.functional.pad(is_ph[:, :-1], (1, 0), value=False)
    nxt = torch.nn.functional.pad(is_ph[:, 1:], (0, 1), value=False)
    # Start / end of the run each token belongs to, via running max / min over run boundaries.
    run_start = torch.where(is_ph & ~prev, pos, torch.zeros_like(pos)).cummax(dim=1).values
    run_end = torch.where(is_ph & ~nxt, pos, torch.full_like(pos, T)).flip(1).cummin(dim=1).values.flip(1)
    offset = pos - run_start
    full = ((run_end - run_start + 1) // slot_len) * slot_len
    in_slot = is_ph & (offset < full)
    slot_begin = in_slot & (offset % slot_len == 0)
    image_idx = slot_begin.long().cumsum(dim=1) - 1
    return in_slot, image_idx, offset % slot_len


def count_slots(input_ids: torch.Tensor, image_id: int, slot_len: int) -> torch.Tensor:
    """Image slots per sample: LongTensor [B]."""
    in_slot, _, patch = image_slots(input_ids, image_id, slot_len)
    return (in_slot & (patch == 0)).sum(dim=1)


# ------------------------------------------------------------------------------------------ chat rendering

def count_markers(messages: list[dict]) -> int:
    return sum(m["content"].count(IMAGE_MARKER) for m in messages if isinstance(m.get("content"), str))


def render_conversation(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False,
                        image_text: str = IMAGE_PLACEHOLDER * DEFAULT_PATCHES) -> str:
    """The chat-template text of `messages`, every `<image>` replaced by `image_text` (an image's
    placeholder run: `MiniMindVLMProcessor.image_text`)."""
    msgs = [{**m, "content": m["content"].replace(IMAGE_MARKER, image_text)}
            if isinstance(m.get("content"), str) else m for m in messages]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_markers(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(header, closer) token ids around every assistant reply, read off the tokenizer's chat template
    (ChatML: `<|im_start|>assistant\\n` and `<|im_end|>\\n`). The label rule supervises each reply from
    just after its header through its closer."""
    probe = "\u2063reply\u2063"
    user = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False)
    header = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)[len(prompt):]
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": probe}], tokenize=False)
    if not header or not full.startswith(prompt + header + probe):
        raise ValueError("the tokenizer's chat template does not put an assistant reply right after its "
                         "generation prompt: use the MiniMind tokenizer")
    closer = full[len(prompt + header + probe):]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (header, closer)]
    return ids[0], ids[1]


# The exported processors' chat template: the tokenizer's own template, preceded by a step that turns
# every message's content into the plain string that template expects. `<image>` in text and
# {"type": "image"} items become IMAGE_TEXT, which the processor then expands to an image's slot.
_NORMALISE_MESSAGES = """{%- set _ns = namespace(msgs=[]) -%}
{%- for _m in messages -%}
  {%- if _m.content is string -%}
    {%- set _c = _m.content | replace(IMAGE_MARKER, IMAGE_TEXT) -%}
  {%- else -%}
    {%- set _p = namespace(parts=[]) -%}
    {%- for _item in _m.content -%}
      {%- if _item.type == 'image' -%}{%- set _p.parts = _p.parts + [IMAGE_TEXT] -%}
      {%- elif _item.type == 'text' -%}{%- set _p.parts = _p.parts + [_item.text | replace(IMAGE_MARKER, IMAGE_TEXT)] -%}
      {%- endif -%}
    {%- endfor -%}
    {%- set _c = _p.parts | join('\\n') -%}
  {%- endif -%}
  {%- set _ns.msgs = _ns.msgs + [{'role': _m.role, 'content': _c, 'tool_calls': _m.tool_calls}] -%}
{%- endfor -%}
{%- set messages = _ns.msgs -%}
"""


def processor_chat_template(tokenizer_template: str, image_text: str) -> str:
    """A processor chat template taking string or list-of-parts messages; each image becomes `image_text`."""
    return (_NORMALISE_MESSAGES.replace("IMAGE_MARKER", repr(IMAGE_MARKER)).replace("IMAGE_TEXT", repr(image_text))
            + tokenizer_template)


# ------------------------------------------------------------------------------------------ tokenizer

class TokenizerNotFoundError(FileNotFoundError):
    pass


def has_tokenizer(path: str | Path) -> bool:
    """Whether a folder holds a transformers tokenizer (what load_tokenizer needs)."""
    return (Path(path) / "tokenizer.json").exists() or (Path(path) / "tokenizer_config.json").exists()


def load_tokenizer(path: str | Path) -> Any:
    """The one tokenizer loader (a stock transformers tokenizer class; no remote code)."""
    from transformers import AutoTokenizer
    path = Path(path)
    if not has_tokenizer(path):
        raise TokenizerNotFoundError(
            f"no tokenizer at {path}: run `python scripts/download.py` for the published MiniMind tokenizer, "
            f"or pass --tokenizer_path model/tokenizer for the project's own")
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)  # never a folder's code, no y/N prompt


# ------------------------------------------------------------------------------------------ the processor

class MiniMindVLMProcessor(ProcessorMixin):
    """Tokenizer + MiniMindVLMImageProcessor + `<image>` expansion, as transformers processors go:

        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                              {"type": "text", "text": "What is it?"}]}], add_generation_prompt=True)
        inputs = processor(text=text, images=[Image.open("cat.png")], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=50)

    Each `<image>` in the text becomes the image's slot (`image_seq_length` placeholder tokens); the
    output holds input_ids, attention_mask and, with images, pixel_values [B, Nmax, 3, S, S] (zero
    padded) with num_images [B]. Sample i takes the next `<image>`-count images of the flat list.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 image_seq_length: int = DEFAULT_PATCHES, image_token_id: int = DEFAULT_IMAGE_TOKEN_ID,
                 **kwargs: Any):
        self.image_seq_length = int(image_seq_length)
        self.image_token_id = int(image_token_id)
        if tokenizer is not None:
            got = tokenizer(self.image_text, add_special_tokens=False)["input_ids"]
            if got != [self.image_token_id] * self.image_seq_length:
                raise ValueError(f"this tokenizer does not turn {self.image_seq_length} {IMAGE_PLACEHOLDER!r} into "
                                 f"{self.image_seq_length} tokens of id {self.image_token_id} (the image slot): "
                                 f"use the MiniMind tokenizer")
            if chat_template is None and tokenizer.chat_template:
                chat_template = processor_chat_template(tokenizer.chat_template, IMAGE_MARKER)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any) -> MiniMindVLMProcessor:
        """The processor for a model with this VLMConfig."""
        return cls(MiniMindVLMImageProcessor.from_config(config), tokenizer,
                   image_seq_length=len(config.image_ids), image_token_id=config.image_token_id)

    @property
    def image_text(self) -> str:
        """What one `<image>` becomes before tokenizing: its slot of placeholder characters."""
        return IMAGE_PLACEHOLDER * self.image_seq_length

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return render_conversation(self.tokenizer, messages, add_generation_prompt, self.image_text)

    def __call__(self, images: Any = None, text: str | list[str] | None = None, return_tensors: Any = None,
                 **kwargs: Any) -> BatchFeature:
        if text is None:
            raise ValueError("MiniMindVLMProcessor needs text (with one <image> per image)")
        texts = [text] if isinstance(text, str) else list(text)
        counts = [t.count(IMAGE_MARKER) for t in texts]
        flat = flatten_images(images)
        if sum(counts) != len(flat):
            raise ValueError(f"the text has {sum(counts)} {IMAGE_MARKER} marker(s) but {len(flat)} image(s) were given")
        enc = self.tokenizer([t.replace(IMAGE_MARKER, self.image_text) for t in texts], return_tensors=return_tensors,
                             **kwargs)
        data = dict(enc)
        if flat:
            bounds = np.cumsum([0, *counts])
            data["pixel_values"], data["num_images"] = self.image_processor.batch(
                [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
        return BatchFeature(data, tensor_type=return_tensors)
