"""MiniMind-V training data: conversations + images -> token ids, labels and pixel tensors.

    conversations JSON --render with the tokenizer's chat template (<image> -> an image's slot of '@')-->
    text --tokenize--> input_ids; labels = input_ids on assistant replies (through their closer,
    `<|im_end|>\\n` in ChatML), -100 elsewhere; images decoded and preprocessed in the worker.
    The marker, the slot, the image geometry, the decoder and its limits, and the label rule's
    markers all come from model/processor.py (a MiniMindVLMProcessor).

Bad rows never crash a run. `__getitem__(i)` serves the first good row at or after i (wrapping),
so batch shapes and DDP step counts never change; every row it had to skip is logged once (one
warning line with the file, row and reason) and reported in the item's `skipped` list. The
collate gathers those into `batch["bad_rows"]`; the trainer feeds batches to a `BadRowStats`
in the main process and prints its `summary()` at the end of each epoch.
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from model.files import atomic_write
from model.processor import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    ImageError,
    MiniMindVLMImageProcessor,
    MiniMindVLMProcessor,
    assistant_markers,
    count_markers,
    decode_image,
    image_slots,
    pad_images,
    render_conversation,
)

from .rows import RowStore
from .sampler import LengthGroupedSampler  # noqa: F401  (re-exported: the trainer imports it from here)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked after the parent tokenized
log = logging.getLogger("minimind.data")

PAD_ID = 0
MAX_SKIP = 64  # this many bad rows in a row means the data (not a row) is broken: stop with a clear error

# bad-row kinds, in the order summaries list them
BAD_KINDS = ("json", "conversation", "image_count", "image_missing", "image_path", "image_decode",
             "image_too_large", "too_long", "placeholder")
IMAGE_KINDS = {"missing": "image_missing", "unreadable": "image_decode", "too_large": "image_too_large",
               "aspect": "image_too_large"}  # model.processor.ImageError kind -> bad-row kind


class BadRow(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def parse_conversation(raw: str) -> list[dict]:
    """The `conversations` JSON string -> validated messages: an optional system message, then
    user/assistant turns alternating, starting with the user and ending with an assistant reply."""
    try:
        conv = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as e:
        raise BadRow("json", f"malformed conversations JSON ({e})") from None
    if not isinstance(conv, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in conv):
        raise BadRow("json", "conversations is not a list of {role, content} objects")
    turns = conv[1:] if conv and conv[0]["role"] == "system" else conv
    if not turns:
        raise BadRow("conversation", "empty conversation")
    expected = ["user", "assistant"] * ((len(turns) + 1) // 2)
    roles = [m["role"] for m in turns]
    if roles != expected[:len(roles)] or roles[-1] != "assistant":
        raise BadRow("conversation", f"roles {roles} do not alternate user/assistant ending with an assistant reply")
    return [{"role": m["role"], "content": m["content"]} for m in conv]


def token_seq(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assistant_labels(ids: torch.Tensor, header: Sequence[int], closer: Sequence[int]) -> torch.Tensor:
    """Labels for a 1-D id tensor: ids on every assistant reply, -100 elsewhere.

    A reply starts right after each `header` and ends with the first `closer` after it, closer
    included (model.processor.assistant_markers reads both off the chat template); a reply cut by truncation runs
    to the end. Vectorised: positions are supervised where the last reply start is later than the
    last closer end.
    """
    L = ids.numel()

    def match_ends(seq: Sequence[int]) -> torch.Tensor:
        """Positions just past each occurrence of `seq` in ids."""
        n = len(seq)
        if L < n:
            return torch.zeros(0, dtype=torch.long)
        windows = ids.unfold(0, n, 1)
        return (windows == torch.tensor(seq, dtype=ids.dtype)).all(dim=1).nonzero().flatten() + n

    last_open = torch.full((L,), -1, dtype=torch.long)
    last_close = torch.full((L,), -1, dtype=torch.long)
    starts, ends = match_ends(header), match_ends(closer)
    last_open[starts[starts < L]] = starts[starts < L]
    last_close[ends[ends < L]] = ends[ends < L]
    supervised = last_open.cummax(0).values > last_close.cummax(0).values
    return torch.where(supervised, ids, torch.full_like(ids, IGNORE_INDEX))


def last_slot_end(ids: torch.Tensor, image_id: int, slot_len: int) -> tuple[int, int]:
    """(number of image slots, position just past the last one; 0 when none)."""
    in_slot, _, patch = image_slots(ids[None], image_id, slot_len)
    in_slot, patch = in_slot[0], patch[0]
    n = int((in_slot & (patch == 0)).sum())
    end = int(in_slot.nonzero().max()) + 1 if n else 0
    return n, end


def default_image_root(data_path: Path) -> Path:
    """Where a .jsonl data file's images are when no folder is given: images/ next to it."""
    return Path(data_path).parent / "images"


class VLMDataset(Dataset):
    """Rows of a MiniMind-V data file (.parquet: `conversations` + `image_bytes`; .jsonl:
    `conversations` + `image` names under `image_root`) as training items:

        {"input_ids": LongTensor [L], "labels": LongTensor [L], "pixel_values": FloatTensor [N, 3, S, S],
         "index": int (the row served), "skipped": [(row, kind), ...] (bad rows passed over)}

    `processor`: the model's MiniMindVLMProcessor (`MiniMindVLMProcessor.from_config(model.config,
    tokenizer)`), or a tokenizer, which gets the published geometry. L <= max_length: text after the
    last image may be cut, a row whose images do not fit is skipped. JSONL image names must stay
    inside `image_root` (no `..`, absolute paths or symlinks out of it).
    """

    def __init__(self, data_path: str | Path, processor: Any, max_length: int = 640,
                 image_root: str | Path | None = None, cache_dir: str | Path | None = None):
        if not isinstance(processor, MiniMindVLMProcessor):
            processor = MiniMindVLMProcessor(MiniMindVLMImageProcessor(), processor)
        self.path = Path(data_path)
        self.rows = RowStore(self.path, cache_dir)
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.max_length = max_length
        self.image_root = Path(image_root) if image_root else default_image_root(self.path)
        self.header, self.closer = assistant_markers(self.tokenizer)
        self._lengths: np.ndarray | None = None
        self._bad: dict[int, str] = {}  # row -> kind, per process: each bad row is decoded and logged once

    def __len__(self) -> int:
        return len(self.rows)

    # -- text ------------------------------------------------------------------------------
    def encode(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(input_ids, labels, image refs) of row i, truncated; raises BadRow. No image is decoded."""
        messages = parse_conversation(self.rows.conversations(i))
        refs = self.rows.images(i)
        n_markers = count_markers(messages)
        if n_markers > len(refs):
            raise BadRow("image_count", f"{n_markers} <image> marker(s) but {len(refs)} image(s)")
        refs = refs[:n_markers]  # images without a marker have no slot to fill (the original ignored them too)
        p = self.processor
        ids = torch.tensor(token_seq(self.tokenizer, p.render(messages)), dtype=torch.long)
        n_slots, slots_end = last_slot_end(ids, p.image_token_id, p.image_seq_length)
        if n_slots != n_markers:
            raise BadRow("placeholder", f"{n_markers} <image> marker(s) gave {n_slots} complete slot(s) of "
                         f"{p.image_seq_length} id-{p.image_token_id} tokens (the text has its own "
                         f"{IMAGE_PLACEHOLDER!r} runs?)")
        if slots_end > self.max_length:
            raise BadRow("too_long", f"image slot(s) end at token {slots_end} > max_length {self.max_length}")
        labels = assistant_labels(ids, self.header, self.closer)
        ids, labels = ids[:self.max_length], labels[:self.max_length]
        if not bool((labels[1:] != IGNORE_INDEX).any()):
            raise BadRow("too_long", f"no assistant token left within max_length {self.max_length}")
        return ids, labels, refs

    # -- images ----------------------------------------------------------------------------
    def image_file(self, name: str) -> Path:
        """A JSONL image name -> its file, which must lie inside the image folder (symlinks resolved)."""
        root = self.image_root.resolve()
        try:
            path = (root / name).resolve()
        except (OSError, ValueError):  # e.g. a NUL character in the name
            raise BadRow("image_path", f"image {name!r} is not a usable file name") from None
        if not path.is_relative_to(root):
            raise BadRow("image_path", f"image {name!r} is outside the image folder {self.image_root}")
        return path

    def decode_images(self, refs: list) -> torch.Tensor:
        """Encoded images (Parquet bytes or JSONL names) -> FloatTensor [N, 3, S, S]; raises BadRow."""
        tensors = []
        for k, ref in enumerate(refs):
            src = ref if isinstance(ref, (bytes, bytearray)) else self.image_file(ref)
            name = f"image {k}" if isinstance(ref, (bytes, bytearray)) else repr(ref)
            try:
                tensors.append(self.processor.image_processor.pixels(decode_image(src, name), name))
            except ImageError as e:
                hint = " (check --images_path)" if e.kind == "missing" else ""
                raise BadRow(IMAGE_KINDS[e.kind], f"{e}{hint}") from None
        return torch.stack(tensors) if tensors else self.processor.image_processor.stack([])

    def load(self, i: int) -> dict:
        """Row i as an item; raises BadRow."""
        ids, labels, refs = self.encode(i)
        return {"input_ids": ids, "labels": labels, "pixel_values": self.decode_images(refs), "index": i}

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for k in range(min(MAX_SKIP, len(self))):
            i = (index + k) % len(self)
            if i in self._bad:  # known bad in this process: already warned about
                skipped.append((i, self._bad[i]))
                continue
            try:
                item = self.load(i)
            except BadRow as e:
                log.warning("%s row %d: skipped (%s): %s", self.path, i, e.kind, e)
                self._bad[i] = e.kind
                skipped.append((i, e.kind))
                continue
            item["skipped"] = skipped
            return item
        raise RuntimeError(f"{self.path}: rows {index}..{index + len(skipped) - 1} (wrapping) are all bad "
                           f"(kinds: {dict(Counter(k for _, k in skipped))}); run scripts/check_data.py {self.path}")

    # -- lengths ---------------------------------------------------------------------------
    def lengths(self, show_progress: bool = True) -> np.ndarray:
        """Token length of every row (before truncation; 0 for unparseable rows), from the text
        only (an image is exactly its slot of placeholder tokens). Cached next to the row cache."""
        if self._lengths is not None:
            return self._lengths
        image_text = self.processor.image_text
        # keyed by what decides a length: the tokenizer's vocabulary and template, the placeholder
        key = f"{len(self.tokenizer)}|{self.tokenizer.chat_template}|{self.header}|{image_text}"
        probe = token_seq(self.tokenizer, "The quick brown fox, 42 @ image")
        cache = self.rows.cache.with_suffix(f".len-{zlib.crc32(f'{key}|{probe}'.encode()):08x}.npy")
        if cache.exists():
            self._lengths = np.load(cache)
            return self._lengths
        # '@' never merges in the MiniMind tokenizers, so a one-'@' placeholder tokenizes like the
        # whole slot minus (slot length - 1) tokens, and tokenizing is ~3x faster
        short = IMAGE_PLACEHOLDER if not any(
            IMAGE_PLACEHOLDER in t and t != IMAGE_PLACEHOLDER for t in self.tokenizer.get_vocab()) else image_text
        per_image = len(token_seq(self.tokenizer, image_text)) - len(token_seq(self.tokenizer, short))
        out = np.zeros(len(self), dtype=np.int32)
        row = 0
        with tqdm(total=len(self), desc=f"token lengths of {self.path.name}", unit="row",
                  disable=not show_progress, leave=False) as bar:
            for batch in self.rows.iter_conversations():
                texts, where, markers = [], [], []
                for j, raw in enumerate(batch):
                    try:
                        messages = parse_conversation(raw)
                    except BadRow:
                        continue
                    texts.append(render_conversation(self.tokenizer, messages, image_text=short))
                    where.append(row + j)
                    markers.append(count_markers(messages))
                if texts:
                    enc = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
                    out[where] = np.array([len(e) for e in enc]) + per_image * np.array(markers)
                row += len(batch)
                bar.update(len(batch))
        with atomic_write(cache) as f:
            np.save(f, out)
        self._lengths = out
        return out


def collate_fn(items: list[dict]) -> dict:
    """Pad a list of items to the batch's longest row.

    input_ids [B, T] (pad 0), labels [B, T] (pad -100), attention_mask [B, T] (1 = real token),
    pixel_values [B, Nmax, 3, S, S] zero-padded or None when no row has an image, num_images [B],
    index [B], bad_rows: list of (row, kind) skipped while building this batch.
    """
    B = len(items)
    T = max(it["input_ids"].numel() for it in items)
    lens = torch.tensor([it["input_ids"].numel() for it in items])
    input_ids = torch.full((B, T), PAD_ID, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = (torch.arange(T)[None, :] < lens[:, None]).long()
    input_ids[attention_mask.bool()] = torch.cat([it["input_ids"] for it in items])
    labels[attention_mask.bool()] = torch.cat([it["labels"] for it in items])
    pixel_values, num_images = pad_images([it["pixel_values"] for it in items])
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": pixel_values, "num_images": num_images,
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "bad_rows": [s for it in items for s in it.get("skipped", [])]}


def first_fit_packs(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group rows (given by their token lengths) into packs of at most `capacity` tokens: first-fit,
    longest row first. Returns the packs as lists of row positions; every row lands in exactly one."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for p, free in enumerate(room):
            if lengths[i] <= free:
                packs[p].append(i)
                room[p] -= lengths[i]
                break
        else:
            packs.append([i])
            room.append(capacity - lengths[i])
    return packs


def collate_packed(items: list[dict], capacity: int) -> dict:
    """The rows of a batch packed into as few sequences of at most `capacity` tokens as first-fit
    finds. The batch is the same sample of rows as `collate_fn`'s, only laid out densely:

    input_ids / labels / attention_mask [P, T] as in `collate_fn` (T = the longest pack);
    position_ids [P, T]: restart at 0 with each row (its rotary positions are those it has alone);
    segment_ids [P, T]: 1 + the row's position in the batch, 0 on padding; attention stays inside a
    segment (see model.model_minimind.segment_attention_mask);
    image_row, image_pos [P, M]: pack p's k-th image is row image_row[p, k]'s image image_pos[p, k]
    (entries past a pack's images point at any image and are never read); pack_num_images [P]: images per pack;
    pixel_values, num_images, index, bad_rows: per row, exactly as `collate_fn` gives them.

    The first label of every row is never supervised (a row starts with its chat header), so no
    position predicts across a row boundary.
    """
    rows = collate_fn(items)
    lens = rows["attention_mask"].sum(dim=1)
    packs = first_fit_packs(lens.tolist(), capacity)
    order = torch.tensor([i for p in packs for i in p], dtype=torch.long)
    pack_of = torch.tensor([k for k, p in enumerate(packs) for _ in p], dtype=torch.long)
    row_len = lens[order]
    # each row's start inside its pack: exclusive cumulative sum of lengths, restarted per pack
    ends = row_len.cumsum(0)
    pack_first = torch.tensor([0] + [len(p) for p in packs], dtype=torch.long).cumsum(0)[:-1]
    start = ends - row_len - (ends - row_len)[pack_first][pack_of]
    P, T = len(packs), int((start + row_len).max())
    real = rows["attention_mask"][order].bool()  # [B, Tmax] in pack order
    offset = torch.arange(real.shape[1]).expand_as(real)
    dest = ((pack_of * T + start)[:, None] + offset)[real]  # flat [P*T] position of every real token
    out = {}
    for key, fill, src in (("input_ids", PAD_ID, rows["input_ids"][order][real]),
                           ("labels", IGNORE_INDEX,
                            rows["labels"][order].index_fill(1, torch.tensor([0]), IGNORE_INDEX)[real]),
                           ("position_ids", 0, offset[real]),
                           ("segment_ids", 0, (order + 1)[:, None].expand_as(real)[real])):
        flat = torch.full((P * T,), fill, dtype=torch.long)
        flat[dest] = src
        out[key] = flat.view(P, T)
    out["attention_mask"] = (out["segment_ids"] > 0).long()
    # images in pack order: each pack's images are its rows' images, row after row
    n = rows["num_images"][order]
    first = (n.cumsum(0) - n).repeat_interleave(n)
    per_pack = torch.zeros(P, dtype=torch.long).index_add(0, pack_of, n)
    img_pack = pack_of.repeat_interleave(n)
    slot = torch.arange(len(img_pack)) - (per_pack.cumsum(0) - per_pack)[img_pack]
    image_row = torch.zeros(P, max(1, int(per_pack.max())), dtype=torch.long)
    image_pos = torch.zeros_like(image_row)
    image_row[img_pack, slot] = order.repeat_interleave(n)
    image_pos[img_pack, slot] = torch.arange(len(img_pack)) - first
    return {**rows, **out, "image_row": image_row, "image_pos": image_pos, "pack_num_images": per_pack}


class BadRowStats:
    """Main-process tally of the bad rows the loader skipped (fed from `batch["bad_rows"]`)."""

    def __init__(self, name: str = "data"):
        self.name = name
        self.rows: dict[int, str] = {}

    def update(self, batch: dict) -> None:
        self.rows.update(dict(batch.get("bad_rows", [])))

    def merge(self, others: list[dict[int, str]]) -> None:
        """Add other tallies' rows (e.g. every DDP rank's); a row met by several counts once."""
        for rows in others:
            self.rows.update(rows)

    def counts(self) -> dict[str, int]:
        c = Counter(self.rows.values())
        return {k: c[k] for k in BAD_KINDS if c[k]} | {k: v for k, v in c.items() if k not in BAD_KINDS}

    def summary(self) -> str:
        c = self.counts()
        if not c:
            return f"{self.name}: no bad rows"
        return f"{self.name}: skipped {sum(c.values())} bad row(s): " + ", ".join(f"{k} {v}" for k, v in c.items())

    def reset(self) -> None:
        self.rows.clear()
