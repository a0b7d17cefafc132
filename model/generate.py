"""Fast generation for MiniMind(-V): a preallocated KV cache and a lean decode loop.

transformers' stock `generate` works with this model too (see the tests), but its loop spends most of
a CPU decode step on bookkeeping: a growing `torch.cat` cache, logits-processor objects, stopping
criteria, re-derived masks and positions. Here one prefill fills a static cache, then every step is a
single-token forward plus a few in-place tensor ops. Every entry point (eval, web demo, API server)
generates through `generate` / `stream_text` below, so sampling lives in one place.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F


class StaticKVCache:
    """K/V for every layer, preallocated to [B, kv_heads, max_len, head_dim].

    Implements the two methods the attention layers use: `update` writes the new positions in place
    and returns views of the filled part; `get_seq_length` is the number of filled positions (the
    same for every row: left padding keeps rows aligned).
    """

    def __init__(self, config: Any, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        head_dim = config.hidden_size // config.num_attention_heads
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0
        self.last_layer = config.num_hidden_layers - 1

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > {self.max_len}")
        self.k[layer_idx, :, :, start:end] = k
        self.v[layer_idx, :, :, start:end] = v
        if layer_idx == self.last_layer:
            self.length = end  # every layer of this forward has written; the next forward starts here
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def repeat_rows(self, n: int) -> None:
        """Expand each row n times (num_return_sequences after a shared prefill)."""
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every already-seen token less likely: positive logits are divided by the penalty,
    negative ones multiplied (the original raised negative logits, making repeats *more* likely)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]: greedy when temperature <= 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already cover top_p (the top one always stays).
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _tokens(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            pixel_values: torch.Tensor | None, max_new_tokens: int, temperature: float, top_p: float,
            repetition_penalty: float, eos_token_id: int | None, pad_token_id: int,
            num_return_sequences: int, generator: torch.Generator | None,
            num_images: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ([B * num_return_sequences]) until all rows hit EOS or
    max_new_tokens. Finished rows yield pad_token_id."""
    device = model.device
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: plain causal attention, positions 0..T-1
    cache = StaticKVCache(model.config, B, T + max_new_tokens, device, model.dtype)
    kwargs = {}
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values.to(device)
        kwargs["num_images"] = num_images
    # Prefill: images are encoded here, once; only the last position's logits are needed.
    out = model(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                use_cache=True, logits_to_keep=1, **kwargs)
    logits = out.logits[:, -1]
    n = num_return_sequences
    if n > 1:  # share the prefill, then let the copies diverge
        cache.repeat_rows(n)
        logits = logits.repeat_interleave(n, dim=0)
        input_ids = input_ids.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0) if attention_mask is not None else None
    rows = B * n
    seen = None
    if repetition_penalty != 1.0:
        # Prompt tokens count as seen, pad positions do not (amax: any real occurrence marks it).
        real = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        seen = torch.zeros(rows, logits.shape[-1], dtype=torch.long, device=device)
        seen = seen.scatter_reduce_(1, input_ids, real, reduce="amax").bool()
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    if attention_mask is not None:
        # Preallocate the mask for every step and pass position ids directly: no per-step cat/cumsum.
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, max_new_tokens)], dim=1)
        next_pos = attention_mask.long().sum(dim=1, keepdim=True)
    for step in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        token = sample_next(logits, temperature, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(finished, pad_token_id)
            finished |= token == eos_token_id
        yield token
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            return
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        if attention_mask is None:
            out = model(input_ids=token[:, None], cache=cache, use_cache=True)
        else:
            length = T + step + 1
            out = model(input_ids=token[:, None], attention_mask=full_mask[:, :length],
                        position_ids=next_pos + step, cache=cache, use_cache=True)
        logits = out.logits[:, -1]


@torch.inference_mode()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             pixel_values: torch.Tensor | None = None, max_new_tokens: int = 512, temperature: float = 0.0,
             top_p: float = 1.0, repetition_penalty: float = 1.0, eos_token_id: int | None = 2,
             pad_token_id: int = 0, num_return_sequences: int = 1, generator: torch.Generator | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None,
             num_images: torch.Tensor | None = None) -> torch.Tensor:
    """Generate continuations of left-padded `input_ids` [B, T]; returns only the new tokens
    [B * num_return_sequences, <= max_new_tokens] (pad_token_id after a row's EOS).

    `temperature` 0 is greedy; `on_token(ids [B])` is called after every step (streaming);
    `num_images` [B]: images per row when `pixel_values` [B, Nmax, ...] is zero-padded.
    """
    steps = []
    for token in _tokens(model, input_ids, attention_mask, pixel_values, max_new_tokens, temperature, top_p,
                         repetition_penalty, eos_token_id, pad_token_id, num_return_sequences, generator,
                         num_images):
        steps.append(token)
        if on_token is not None:
            on_token(token)
    if not steps:
        return input_ids.new_zeros(input_ids.shape[0] * num_return_sequences, 0)
    return torch.stack(steps, dim=1).cpu()


@torch.inference_mode()
def stream_text(model: torch.nn.Module, tokenizer: Any, input_ids: torch.Tensor,
                pixel_values: torch.Tensor | None = None, max_new_tokens: int = 512, temperature: float = 0.0,
                top_p: float = 1.0, repetition_penalty: float = 1.0, stats: dict | None = None,
                generator: torch.Generator | None = None) -> Iterator[str]:
    """Yield the answer to one prompt (`input_ids` [1, T]) as text pieces while it is generated.

    Byte-level BPE can split one character over several tokens, so a piece is released only once
    the decoded text no longer ends in an incomplete character. `stats`, when given, receives
    `new_tokens` (EOS excluded) as generation goes.
    """
    ids: list[int] = []
    shown = 0
    eos = tokenizer.eos_token_id
    for token in _tokens(model, input_ids, None, pixel_values, max_new_tokens, temperature, top_p,
                         repetition_penalty, eos, tokenizer.pad_token_id or 0, 1, generator):
        t = int(token[0])
        if t == eos:
            break
        ids.append(t)
        if stats is not None:
            stats["new_tokens"] = len(ids)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if len(text) > shown and not text.endswith("\ufffd"):
            yield text[shown:]
            shown = len(text)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > shown:
        yield text[shown:]
