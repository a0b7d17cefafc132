"""The two ways a chunk of items is scored: option log-likelihood and greedy generation.

Log-likelihood: each option is appended, as its own tokens, to the question rendered with the chat
template and the generation prompt (where the model's answer would begin), and the log-probabilities
the model gives those tokens are added up. Every (item, option) pair of a chunk is one row of a single
right-padded batch; the image features of an item are computed once and shared by its options; only
the option positions are projected to the vocabulary. The option with the highest sum is the model's
choice under the "sum" rule, the highest per-token mean under the "mean" rule (which does not favour
short options).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from model.chat import build_batch
from model.generate import generate
from model.processor import MiniMindVLMProcessor

from .readers import Item

BLANK_RGB = (128, 128, 128)


def blank_image(size: int) -> Any:
    """The grey square (size x size, the model's input size) every image is replaced by in the no-image baseline."""
    from PIL import Image
    return Image.new("RGB", (size, size), BLANK_RGB)


@torch.inference_mode()
def encode(model: Any, processor: MiniMindVLMProcessor, images: list[list[Any]]) -> torch.Tensor | None:
    """Vision features [B, Nmax, P, W] of each item's PIL images (zeros in unused places), one encoder
    call for the chunk; None when no item has an image."""
    pixel_values, num_images = processor.image_processor.batch(images)
    if pixel_values is None:
        return None
    return model.encode_images(pixel_values.to(model.dtype), num_images)


@torch.inference_mode()
def sequence_logprobs(model: Any, prompts: list[list[int]], continuations: list[list[int]],
                      features: torch.Tensor | None = None, feature_rows: list[int] | None = None,
                      pad_id: int = 0, num_images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(continuation token | everything before it), number of continuation tokens) for
    each prompt + continuation pair, in one forward pass.

    `features` [I, N, P, W] are image features; row s uses `features[feature_rows[s]]`, of which the
    first `num_images[feature_rows[s]]` are real (all N without `num_images`).
    Rows are right-padded: under causal attention a real token never sees the padding after it,
    so no attention mask is needed."""
    seqs = [p + c for p, c in zip(prompts, continuations, strict=True)]
    S, T = len(seqs), max(len(s) for s in seqs)
    device = model.device
    ids = torch.full((S, T), pad_id, dtype=torch.long)
    for s, seq in enumerate(seqs):
        ids[s, :len(seq)] = torch.tensor(seq)
    ids = ids.to(device)
    start = torch.tensor([len(p) for p in prompts], device=device)  # first continuation position
    count = torch.tensor([len(c) for c in continuations], device=device)
    feats = counts = None
    if features is not None:
        rows = torch.tensor(feature_rows)
        feats = features[rows.to(features.device)].to(device)
        counts = None if num_images is None else num_images[rows].to(device)
    hidden, _ = model.model(model.embed(ids, image_features=feats, num_images=counts), None, None, None)
    # Position t predicts token t + 1: the continuation tokens are predicted from start-1 .. start+count-2.
    pos = torch.arange(T - 1, device=device)[None, :]
    scored = (pos >= start[:, None] - 1) & (pos < (start + count)[:, None] - 1)
    logits = model.lm_head(hidden[:, :-1][scored]).float()
    targets = ids[:, 1:][scored]
    token_lp = F.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    rows = scored.nonzero()[:, 0]
    total = torch.zeros(S, device=device, dtype=torch.float32).index_add_(0, rows, token_lp)
    return total.cpu(), count.cpu()


def loglik_chunk(model: Any, processor: MiniMindVLMProcessor, items: list[Item], features: torch.Tensor | None,
                 max_rows: int = 64) -> list[dict | None]:
    """Per item: {"sum": [...], "mean": [...], "pick_sum": i, "pick_mean": i} over its options, or
    None for an item without options. `features` [len(items), Nmax, P, W]: item i's images first (see
    `encode`). At most `max_rows` option rows per forward pass."""
    tokenizer = processor.tokenizer
    num_images = torch.tensor([len(it.images) for it in items])
    prompts, conts, rows = [], [], []  # rows: the item (and feature row) of each option
    for i, item in enumerate(items):
        if not item.options:
            continue
        p = tokenizer(processor.render(item.mc_messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        for option in item.options:
            prompts.append(p)
            conts.append(tokenizer(option, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id])
            rows.append(i)
    sums, counts = [], []
    for a in range(0, len(prompts), max_rows):
        s, c = sequence_logprobs(model, prompts[a:a + max_rows], conts[a:a + max_rows], features,
                                 rows[a:a + max_rows], tokenizer.pad_token_id or 0, num_images)
        sums.append(s)
        counts.append(c)
    out: list[dict | None] = [None] * len(items)
    if not prompts:
        return out
    total, count = torch.cat(sums), torch.cat(counts).float()
    owner = torch.tensor(rows)
    for i in sorted(set(rows)):
        sel = owner == i
        s, m = total[sel], total[sel] / count[sel]
        out[i] = {"sum": [round(v, 4) for v in s.tolist()], "mean": [round(v, 4) for v in m.tolist()],
                  "pick_sum": int(s.argmax()), "pick_mean": int(m.argmax())}
    return out


def generate_chunk(model: Any, processor: MiniMindVLMProcessor, items: list[Item], images: list[list[Any]],
                   max_new_tokens: int) -> list[str]:
    """Greedy answers to each item's generation prompt (left-padded batch, the project's decode loop)."""
    tokenizer = processor.tokenizer
    input_ids, attention_mask, pixel_values, num_images = build_batch(
        processor, [it.messages for it in items], images, [it.source for it in items])
    if pixel_values is not None:
        pixel_values = pixel_values.to(model.dtype)
    out = generate(model, input_ids, attention_mask, pixel_values, max_new_tokens=max_new_tokens, temperature=0.0,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0,
                   num_images=num_images)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out.tolist()]
