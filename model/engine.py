"""One serving engine for many users: continuous batching on a single scheduler thread.

    engine = Engine(model, tokenizer, max_batch=16)
    handle = engine.submit(GenRequest(prompt_ids, pixel_values, max_new_tokens=64))
    for event in handle:              # Event(index, text, token, finish, error)
        print(event.text, end="")
    handle.cancel()                   # from any thread: the row leaves the batch at the next step

One thread owns the model. Requests wait in a bounded queue; at every step the scheduler

1. drops cancelled rows,
2. prefills at most `prefill_budget` prompt tokens: the next chunk of a long prompt in progress, then
   waiting requests admitted while there are free rows and their prompts fit; those are prefilled together,
   right-padded (plain causal attention, so padding never touches a real token), with every image of every
   newcomer encoded in one CLIP call. A prompt longer than the budget comes alone and is prefilled in chunks,
   one per step (each chunk attends causally to the positions already cached), so the running rows never
   wait for more than one budget's worth of prefill between two tokens,
3. samples one token for every running row, each with its own temperature / top_p / repetition penalty /
   seed, stop strings and length, sends each row's text to its own queue, and drops finished rows,
4. runs one decode forward for all remaining rows together.

The KV cache is one tensor per K and V, [layers, max_batch, kv_heads, capacity, head_dim]; row i's tokens
sit at positions 0..len_i-1 of its slot, the new token is written at len_i and the attention mask lets
row i see only positions <= len_i. Rows that leave are replaced by the last rows (the batch stays a
contiguous prefix of the cache, a prompt being chunked right after it), so nothing is copied except the
few moved rows. A row's computation never reads another row's data, so greedy output is the same alone or
in a full batch, and the same whether its prompt was prefilled whole or in chunks (tested).

Sampling is seeded per row by a counter-based hash of (seed, choice, step): a seeded request gives the same
tokens whatever else is in the batch. No lock is held across a yield; the only lock guards the tokenizer.

A chat sends its earlier images again with every turn (the API is stateless), so the engine keeps the vision
features of the last `image_cache` distinct images, keyed by a hash of their pixels: a follow-up turn
encodes only its new images (ViT-B/16 costs about 0.25 s per image on 2 CPU cores).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .processor import MiniMindVLMProcessor, pad_images

log = logging.getLogger("minimind")

DEFAULT_MAX_CONTEXT = 2048  # the context the published model was trained for (YaRN's original length)
CACHE_CHUNK = 128           # the KV cache grows in steps of this many positions
PREFILL_BUDGET = 1024       # prompt tokens prefilled per step (~0.4 s for the 512 x 8 model on 2 CPU cores)
IMAGE_CACHE = 64            # images whose vision features are kept (ViT-B/16: 196 x 768 fp32 = 0.6 MB each)


class EngineBusy(RuntimeError):
    """The wait queue is full: try again later (the API answers 503 with Retry-After)."""


class EngineClosed(RuntimeError):
    """The engine was shut down."""


@dataclass
class GenRequest:
    """One generation request: a tokenized prompt and its images, already checked against the limits."""
    input_ids: Sequence[int]
    pixel_values: torch.Tensor | None = None  # [N, 3, S, S], in slot order
    max_new_tokens: int = 512
    temperature: float = 0.0                  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None                   # None: a fresh random seed
    n: int = 1                                # independent choices sharing one prefill
    stop: Sequence[str] = ()                  # stop strings (not included in the text)


class Event(NamedTuple):
    index: int                # choice index
    text: str = ""            # new text (may be "" while a multi-byte character is incomplete)
    token: int | None = None  # the token id behind this event (None for a finish without a token)
    finish: str | None = None  # "stop" | "length" | "cancelled" when this choice ended
    error: str | None = None   # set on an engine failure or shutdown: the choice ended


class Handle:
    """A submitted request: iterate it (sync or async) for its events; cancel() from anywhere."""

    def __init__(self, engine: Engine, request: GenRequest, loop: asyncio.AbstractEventLoop | None):
        self.request = request
        self.prompt_tokens = len(request.input_ids)
        self.completion_tokens = [0] * request.n
        self.finish_reasons: list[str | None] = [None] * request.n
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.cancelled = False
        self._engine = engine
        self._open = request.n  # choices that have not ended yet
        self._loop = loop
        self._queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()

    def cancel(self) -> None:
        """Free this request's rows at the next step (no-op once it has finished)."""
        if not self.cancelled and self._open:
            self.cancelled = True
            self._engine._wake()

    @property
    def done(self) -> bool:
        return self._open == 0

    def _put(self, ev: Event) -> None:
        if self._loop is None:
            self._queue.put(ev)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, ev)
        except RuntimeError:  # the client's event loop is gone: nobody is listening
            self.cancelled = True

    def __iter__(self) -> Iterator[Event]:
        ended = 0
        while ended < self.request.n:
            ev = self._queue.get()
            ended += ev.finish is not None or ev.error is not None
            yield ev

    async def __aiter__(self) -> AsyncIterator[Event]:
        ended = 0
        while ended < self.request.n:
            ev = await self._queue.get()
            ended += ev.finish is not None or ev.error is not None
            yield ev


class Detokenizer:
    """Incremental detokenization with stop strings for one choice.

    A piece is released only when the decoded text does not end in an incomplete character (byte-level
    BPE can split one over several tokens), and text that could be the start of a stop string is held
    back until it is clear whether the stop string follows.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = self.read = 0  # decode window: ids[prefix:read] is text already counted
        self.held = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> tuple[str, bool]:
        """Text released by one more token, and whether a stop string has ended the choice."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return "", False
        self.prefix, self.read = self.read, len(self.ids)
        return self._release(self.held + now[len(before):])

    def flush(self) -> str:
        """The rest of the text when the choice ends for another reason (EOS, length)."""
        tail = self._decode(self.ids[self.prefix:])
        before = self._decode(self.ids[self.prefix:self.read])
        text = self.held + tail[len(before):]
        self.held = ""
        return text

    def _release(self, text: str) -> tuple[str, bool]:
        if not self.stop:
            return text, False
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return text[:cut], True
        # Hold back the longest tail that is the beginning of some stop string.
        hold = max((k for s in self.stop for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)
        self.held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False


@dataclass
class _Row:
    handle: Handle
    index: int
    detok: Detokenizer
    max_new: int
    generated: int = 0
    stop_hit: bool = field(default=False)


@dataclass
class _Chunked:
    """A prompt longer than the per-step prefill budget, prefilled one chunk per step into its rows' slots
    (right after the running rows, which keep decoding in between). CLIP ran once, when it was admitted."""
    handle: Handle
    ids: torch.Tensor     # [1, T] the prompt (its tokens count as seen for the repetition penalty)
    embeds: torch.Tensor  # [1, T, hidden] its embeddings, images spliced in
    done: int = 0         # prompt positions already in the cache

    @property
    def left(self) -> int:
        return self.embeds.shape[1] - self.done


# ------------------------------------------------------------------------------------------ sampling

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32;
    the multipliers are below 2**31 so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def row_uniform(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One uniform number in [0, 1) per row, a pure function of (seed, step): sampling never depends on
    which other rows share the batch."""
    a = _mix32(seed_lo ^ 0x3C6EF372)
    a = _mix32(a ^ seed_hi)
    a = _mix32(a ^ (step & _M32))
    b = _mix32(a ^ 0x1B873593)
    return ((a << 21) | (b >> 11)).double() / float(2 ** 53)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seed_lo: torch.Tensor,
                seed_hi: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """logits [n, V] -> next tokens [n]: greedy where temperature <= 0, else nucleus sampling by
    inverse CDF with each row's own uniform number."""
    tokens = logits.argmax(dim=-1)
    hot = (temperature > 0).nonzero(as_tuple=True)[0]
    if hot.numel() == 0:
        return tokens
    probs = F.softmax(logits[hot].float() / temperature[hot, None], dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # Drop a token when the tokens ranked above it already cover top_p (the top one always stays).
    drop = (sorted_p.cumsum(dim=-1) - sorted_p) > top_p[hot, None]
    kept = (~drop).sum(dim=-1, keepdim=True)
    cdf = sorted_p.masked_fill(drop, 0.0).double().cumsum(dim=-1)
    u = row_uniform(seed_lo[hot], seed_hi[hot], step[hot])[:, None] * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).clamp(max=kept - 1)
    return tokens.index_put((hot,), order.gather(1, idx).squeeze(1))


def apply_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Per-row repetition penalty: seen tokens' positive logits divided, negative ones multiplied."""
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen & (p != 1.0), penalised, logits)


# ------------------------------------------------------------------------------------------ KV cache views

class _PrefillCache:
    """Prefill of the newcomers, or of one chunk (positions start..start+T-1) of a long prompt: writes the
    K/V into their slots of the engine's cache (row `src[i]` of the prefill batch goes to slot `first + i`)
    and hands attention what it attends to: the new K/V alone for whole prompts, positions 0..start+T-1
    of the request's first slot for a later chunk (one request only)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, first: int, src: torch.Tensor, start: int = 0):
        self.k, self.v, self.first, self.src, self.start = k, v, first, src, start

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        end, stop = self.first + self.src.numel(), self.start + k.shape[2]
        self.k[layer_idx, self.first:end, :, self.start:stop] = k[self.src]
        self.v[layer_idx, self.first:end, :, self.start:stop] = v[self.src]
        if self.start == 0:
            return k, v
        slot = slice(self.first, self.first + 1)
        return self.k[layer_idx, slot, :, :stop], self.v[layer_idx, slot, :, :stop]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class _DecodeCache:
    """One decode step for rows 0..n-1: row i's new K/V go to position pos[i] of its slot; attention
    sees positions 0..t-1 of every row (the mask hides each row's positions beyond its own)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, t: int):
        self.k, self.v, self.pos, self.t = k, v, pos, t
        self.rows = torch.arange(pos.numel())

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        n = self.pos.numel()
        kl, vl = self.k[layer_idx], self.v[layer_idx]
        kl[self.rows, :, self.pos] = k[:, :, 0]
        vl[self.rows, :, self.pos] = v[:, :, 0]
        return kl[:n, :, :self.t], vl[:n, :, :self.t]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions and the mask are given explicitly


class ImageFeatureCache:
    """The vision features of the most recently used distinct images, keyed by a hash of their pixels
    (least recently used dropped first; capacity 0 keeps nothing). `misses` counts images encoded, `hits`
    the others (served from the cache, or a second copy in the same batch)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._features: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(pixels: torch.Tensor) -> bytes:
        """A digest of one image's preprocessed pixels [3, S, S] (their exact bytes)."""
        raw = pixels.detach().cpu().contiguous().view(torch.uint8)  # any dtype's exact bytes
        return hashlib.blake2b(raw.numpy(), digest_size=16).digest()  # hashes the buffer, no copy

    def __len__(self) -> int:
        return len(self._features)

    def get(self, key: bytes) -> torch.Tensor | None:
        feats = self._features.get(key)
        if feats is not None:
            self._features.move_to_end(key)
        return feats

    def put(self, key: bytes, feats: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self._features[key] = feats
        self._features.move_to_end(key)
        while len(self._features) > self.capacity:
            self._features.popitem(last=False)


# ------------------------------------------------------------------------------------------ the engine

def transpose_linear_storage(model: torch.nn.Module) -> int:
    """Store the language model's fp32 CPU linear weights transposed in memory: same values, same [out, in]
    shape, column-major strides. `F.linear(x, W)` multiplies by W^T, which is then a contiguous [in, out]
    matrix; CPU BLAS runs that product for a few rows (a decode step of 2-64 rows) up to 1.8x faster
    (1.1-1.2x when the weights come from memory rather than cache), and as fast as before for one row or a
    prefill. Reordered in place, once: no second copy of the weights, tied weights stay tied, CLIP and the
    vision projection are left alone. A model that has served is therefore not contiguous: call
    `.contiguous()` on its weights before saving it with safetensors. Returns how many were reordered."""
    done = 0
    for module in [*model.model.modules(), model.lm_head]:
        w = getattr(module, "weight", None)
        if (type(module) is torch.nn.Linear and type(w.data) is torch.Tensor and w.dtype == torch.float32
                and w.device.type == "cpu" and w.is_contiguous()):
            w.data = w.data.t().contiguous().t()
            done += 1
    return done


class Engine:
    """Continuous-batching generation over one model (see the module docstring).

    max_batch: rows decoded together (1 = one request at a time); max_queue: requests that may wait
    (more: EngineBusy); max_context: prompt + new tokens per row; prefill_budget: prompt tokens (padded)
    prefilled per step, so the running rows wait at most that long between two tokens: newcomers are
    admitted while their prompts fit, and a longer prompt is prefilled in chunks of this size, one per step.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_batch: int = 16, max_queue: int = 64,
                 max_context: int = DEFAULT_MAX_CONTEXT, prefill_budget: int = PREFILL_BUDGET,
                 image_cache: int = IMAGE_CACHE):
        cfg = model.config
        if max_batch < 1 or max_queue < 0 or prefill_budget < 1 or image_cache < 0:
            raise ValueError("max_batch and prefill_budget must be >= 1, max_queue and image_cache >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.processor = MiniMindVLMProcessor.from_config(cfg, tokenizer)  # the model's image/text contract
        transpose_linear_storage(model)
        self.max_batch, self.max_queue, self.prefill_budget = max_batch, max_queue, prefill_budget
        self.max_context = min(max_context, cfg.max_position_embeddings)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id or 0
        self.tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe to mutate concurrently
        self.device, self.dtype = model.device, model.dtype
        self._layers, self._kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
        self._head_dim = cfg.hidden_size // cfg.num_attention_heads
        self._vocab = cfg.vocab_size
        self._waiting: deque[Handle] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._rows: list[_Row] = []
        self.image_cache = ImageFeatureCache(image_cache)  # only the scheduler thread touches it
        self._chunked: _Chunked | None = None  # a long prompt being prefilled; its slots follow the rows'
        self._k = self._v = None
        self._cap = 0
        self._logits: torch.Tensor | None = None  # [n_active, V]: next-token logits of every running row
        S, dev = max_batch, self.device
        self._len = torch.zeros(S, dtype=torch.long, device=dev)         # positions filled per row
        self._temp = torch.zeros(S, device=dev)
        self._top_p = torch.ones(S, device=dev)
        self._penalty = torch.ones(S, device=dev)
        self._seed_lo = torch.zeros(S, dtype=torch.long, device=dev)
        self._seed_hi = torch.zeros(S, dtype=torch.long, device=dev)
        self._step = torch.zeros(S, dtype=torch.long, device=dev)
        self._seen = torch.zeros(S, self._vocab, dtype=torch.bool, device=dev)
        self.steps = 0            # decode forwards run (for tests and stats)
        self.max_rows_seen = 0    # the largest batch decoded so far
        self._thread = threading.Thread(target=self._run, name="minimind-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API (any thread)

    def encode(self, text: str) -> list[int]:
        with self.tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def submit(self, request: GenRequest, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue a request; events arrive on the returned handle (through `loop` for async consumers).
        Raises ValueError for a request that can never run and EngineBusy when the queue is full."""
        n_prompt = len(request.input_ids)
        if not 1 <= request.n <= self.max_batch:
            raise ValueError(f"n must be between 1 and {self.max_batch}")
        if n_prompt == 0 or n_prompt >= self.max_context:
            raise ValueError(f"the prompt has {n_prompt} tokens; the context holds {self.max_context}")
        if request.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        handle = Handle(self, request, loop)
        with self._cv:
            if self._closed:
                raise EngineClosed("the engine has been shut down")
            if len(self._waiting) >= self.max_queue:
                raise EngineBusy(f"{len(self._waiting)} requests are waiting; try again shortly")
            self._waiting.append(handle)
            self._cv.notify()
        return handle

    def close(self, timeout: float = 10.0) -> None:
        """Stop the scheduler; every unfinished request gets an error event."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows) + self._chunked_rows()

    def _chunked_rows(self) -> int:
        return 0 if self._chunked is None else self._chunked.handle.request.n

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # ------------------------------------------------------------------ scheduler thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._closed and not self._rows and not self._waiting and self._chunked is None:
                    self._cv.wait()
                if self._closed:
                    break
                newcomers = self._admit()
            try:
                with torch.inference_mode():
                    self._step_once(newcomers)
            except Exception as e:  # never let one bad step kill the server: fail the rows involved
                log.exception("engine step failed")
                self._fail(self._handles() + newcomers, f"generation failed: {type(e).__name__}")
                self._rows, self._chunked = [], None
                self._release_cache()
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        self._fail(self._handles() + waiting, "the server is shutting down")
        self._rows, self._chunked = [], None

    def _handles(self) -> list[Handle]:
        """The requests holding rows (the one being prefilled in chunks last)."""
        return [r.handle for r in self._rows] + ([self._chunked.handle] if self._chunked else [])

    def _fail(self, handles: list[Handle], message: str) -> None:
        for h in dict.fromkeys(handles):  # each handle once, in order
            for i in range(h.request.n):
                if h.finish_reasons[i] is None:
                    h.finish_reasons[i] = "error"
                    h._put(Event(i, error=message))
            h._open = 0

    def _admit(self) -> list[Handle]:
        """Pop waiting requests (FIFO) while rows and this step's prefill budget allow (called under the
        lock): whole prompts that fit what the chunk in progress leaves, or, when no chunk is in progress,
        one longer prompt on its own (it will be prefilled in chunks)."""
        if any(h.cancelled for h in self._waiting):
            for h in [h for h in self._waiting if h.cancelled]:
                self._end_cancelled(h)
            self._waiting = deque(h for h in self._waiting if not h.cancelled)
        free = self.max_batch - self.running
        budget = self.prefill_budget - (min(self._chunked.left, self.prefill_budget) if self._chunked else 0)
        taken: list[Handle] = []
        longest = 0
        while self._waiting:
            h = self._waiting[0]
            longest_if = max(longest, h.prompt_tokens)
            fits = longest_if * (len(taken) + 1) <= budget
            if h.request.n > free or not (fits or (not taken and self._chunked is None)):
                break
            self._waiting.popleft()
            taken.append(h)
            free -= h.request.n
            longest = longest_if
            if not fits:
                break  # a long prompt goes alone
        return taken

    def _end_cancelled(self, h: Handle) -> None:
        for i in range(h.request.n):
            if h.finish_reasons[i] is None:
                h.finish_reasons[i] = "cancelled"
                h._put(Event(i, finish="cancelled"))
        h._open = 0

    def _step_once(self, newcomers: list[Handle]) -> None:
        self._drop([i for i, r in enumerate(self._rows) if r.handle.cancelled], "cancelled")
        if self._chunked is not None and self._chunked.handle.cancelled:
            self._end_cancelled(self._chunked.handle)
            self._chunked = None
        if self._chunked is not None:
            self._prefill_chunk()
        if newcomers:
            self._prefill(newcomers)
        if not self._rows:
            if self._chunked is None:
                self._release_cache()
            return
        n = len(self._rows)
        logits = self._logits
        if bool((self._penalty[:n] != 1.0).any()):
            logits = apply_penalty(logits, self._seen[:n], self._penalty[:n])
        tokens = sample_rows(logits, self._temp[:n], self._top_p[:n], self._seed_lo[:n], self._seed_hi[:n],
                             self._step[:n])
        self._seen[torch.arange(n), tokens] = True
        self._step[:n] += 1
        order = self._drop(self._emit(tokens.tolist()), None)
        if not self._rows:
            if self._chunked is None:
                self._release_cache()
            return
        self._decode(tokens[order])

    def _emit(self, tokens: list[int]) -> list[int]:
        """Send every row its token's text; returns the rows that have finished."""
        finished = []
        now = time.perf_counter()
        with self.tokenizer_lock:
            for i, (row, tok) in enumerate(zip(self._rows, tokens)):
                h = row.handle
                if h.first_token_at is None:
                    h.first_token_at = now
                if tok == self.eos:
                    finish, text = "stop", row.detok.flush()
                else:
                    row.generated += 1
                    h.completion_tokens[row.index] += 1
                    text, stopped = row.detok.add(tok)
                    finish = "stop" if stopped else None
                    if finish is None and row.generated >= row.max_new:
                        finish, text = "length", text + row.detok.flush()
                if finish is not None:
                    h.finish_reasons[row.index] = finish
                    h._open -= 1
                    finished.append(i)
                h._put(Event(row.index, text, tok, finish))
        return finished

    def _drop(self, rows: list[int], reason: str | None) -> torch.Tensor:
        """Remove rows (indices into the running batch); the last rows move into the holes. Returns the
        new order as indices of the old rows (to reorder anything else held per row)."""
        n = len(self._rows)
        if not rows:
            return torch.arange(n)
        if reason is not None:
            for i in rows:
                r = self._rows[i]
                if r.handle.finish_reasons[r.index] is None:
                    r.handle.finish_reasons[r.index] = reason
                    r.handle._open -= 1
                    r.handle._put(Event(r.index, finish=reason))
        gone = set(rows)
        keep = [i for i in range(n) if i not in gone]
        m = len(keep)
        holes = [i for i in range(m) if i in gone]
        donors = [i for i in keep if i >= m]
        if holes:
            dst, src = torch.tensor(holes), torch.tensor(donors)
            for t in (self._len, self._temp, self._top_p, self._penalty, self._seed_lo, self._seed_hi,
                      self._step, self._seen):
                t[dst] = t[src]
            self._k[:, dst] = self._k[:, src]
            self._v[:, dst] = self._v[:, src]
            for d, s in zip(holes, donors):
                self._rows[d] = self._rows[s]
        order = list(range(m))
        for d, s in zip(holes, donors):
            order[d] = s
        order = torch.tensor(order, dtype=torch.long)
        if self._logits is not None:
            self._logits = self._logits[order]
        del self._rows[m:]
        if self._chunked is not None:  # its slots move down to follow the rows again
            k = self._chunked_rows()
            self._k[:, m:m + k] = self._k[:, n:n + k].clone()
            self._v[:, m:m + k] = self._v[:, n:n + k].clone()
        return order

    def _ensure_cache(self, need: int, rows: int) -> None:
        """Grow the KV cache to hold `need` positions for `rows` rows (copying the running rows). Both
        sizes grow in steps, so a lone request does not pay for zeroing a cache sized for max_batch."""
        if self._k is not None and need <= self._cap and rows <= self._k.shape[1]:
            return
        cap = max(self._cap, min(self.max_context, -(-need // CACHE_CHUNK) * CACHE_CHUNK))
        have = 0 if self._k is None else self._k.shape[1]
        n_rows = min(self.max_batch, max(have, 1 << max(rows - 1, 0).bit_length()))
        shape = (self._layers, n_rows, self._kv_heads, cap, self._head_dim)
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        n, old = self.running, self._cap
        if self._k is not None and n:
            k[:, :n, :, :old] = self._k[:, :n]
            v[:, :n, :, :old] = self._v[:, :n]
        self._k, self._v, self._cap = k, v, cap

    def _release_cache(self) -> None:
        self._k = self._v = None
        self._cap = 0
        self._logits = None

    def _prefill(self, handles: list[Handle]) -> None:
        """Prefill the newcomers together (right-padded, one CLIP call for all their images) and add
        their rows, one per choice, at the end of the batch; a prompt longer than the budget (it comes
        alone) starts its chunks instead."""
        lengths = [h.prompt_tokens for h in handles]
        T = max(lengths)
        ids = torch.full((len(handles), T), self.pad, dtype=torch.long)
        for b, h in enumerate(handles):
            ids[b, :lengths[b]] = torch.as_tensor(list(h.request.input_ids), dtype=torch.long)
        ids = ids.to(self.device)
        features, num_images = self._image_features(handles)
        embeds = self.model.embed(ids, image_features=features, num_images=num_images)
        first = len(self._rows)
        src = self._choice_rows(handles)
        need = max(len(h.request.input_ids) + h.request.max_new_tokens for h in handles)
        self._ensure_cache(max(T, min(need, self.max_context), int(self._len[:first].max()) + 1 if first else 0),
                           first + src.numel())
        if T > self.prefill_budget:
            self._chunked = _Chunked(handles[0], ids, embeds)
            self._prefill_chunk()
            return
        hidden, _ = self.model.model(embeds, None, None, _PrefillCache(self._k, self._v, first, src))
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.model.lm_head(hidden[torch.arange(len(handles), device=self.device), last])
        self._join(handles, ids, lengths, logits)

    def _prefill_chunk(self) -> None:
        """The next chunk (up to the budget) of the long prompt in progress; its rows join when it is done.
        Chunk positions start..end-1 attend to the positions before them already in the cache, causally."""
        c, first = self._chunked, len(self._rows)
        start = c.done
        end = start + min(c.left, self.prefill_budget)
        pos = torch.arange(start, end, device=self.device)
        mask = None  # the first chunk: plain causal attention, as a whole prompt gets
        if start:
            mask = torch.zeros(1, 1, end - start, end, device=self.device, dtype=self.dtype).masked_fill_(
                torch.arange(end, device=self.device) > pos[:, None], float("-inf"))
        cache = _PrefillCache(self._k, self._v, first, self._choice_rows([c.handle]), start)
        hidden, _ = self.model.model(c.embeds[:, start:end], mask, pos[None], cache)
        c.done = end
        if not c.left:
            self._chunked = None
            self._join([c.handle], c.ids, [end], self.model.lm_head(hidden[:, -1]))

    def _choice_rows(self, handles: list[Handle]) -> torch.Tensor:
        """For each row the newcomers will take (one per choice), its request's index among them."""
        return torch.tensor([b for b, h in enumerate(handles) for _ in range(h.request.n)], dtype=torch.long,
                            device=self.device)

    def _join(self, handles: list[Handle], ids: torch.Tensor, lengths: list[int], logits: torch.Tensor) -> None:
        """Add prefilled requests' rows, one per choice, at the end of the batch: ids [B, T] are their
        right-padded prompts, logits [B, V] their next-token logits."""
        first, src = len(self._rows), self._choice_rows(handles)
        rows = slice(first, first + src.numel())
        lens = torch.tensor(lengths, device=self.device)[src]
        self._len[rows] = lens
        self._step[rows] = 0
        # Prompt tokens count as seen for the repetition penalty; padding does not.
        real = (torch.arange(ids.shape[1], device=self.device)[None] < lens[:, None]).long()
        seen = torch.zeros(src.numel(), self._vocab, dtype=torch.long, device=self.device)
        self._seen[rows] = seen.scatter_reduce_(1, ids[src], real, reduce="amax").bool()
        j = first
        for h in handles:
            r = h.request
            max_new = min(r.max_new_tokens, self.max_context - h.prompt_tokens)
            for index in range(r.n):
                seed = secrets.randbits(64) if r.seed is None else r.seed
                seed = (seed + index * 0x9E3779B97F4A7C15) % 2 ** 64  # each choice its own stream
                self._seed_lo[j], self._seed_hi[j] = seed & _M32, seed >> 32
                self._temp[j], self._top_p[j], self._penalty[j] = r.temperature, r.top_p, r.repetition_penalty
                self._rows.append(_Row(h, index, Detokenizer(self.tokenizer, r.stop), max_new))
                j += 1
        logits = logits[src]
        self._logits = logits if self._logits is None else torch.cat([self._logits, logits])

    def _image_features(self, handles: list[Handle]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(vision features [B, Nmax, P, W] for the newcomers, zero-padded; images per newcomer [B]), or
        (None, None) when none has an image. Images not in the cache are encoded in one call (an image that
        comes twice, once)."""
        per = [h.request.pixel_values for h in handles]
        num_images = torch.tensor([0 if p is None else len(p) for p in per], dtype=torch.long)
        if not int(num_images.sum()):
            return None, None
        images = torch.cat([p for p in per if p is not None and len(p)])  # [M, 3, S, S], in slot order
        cache = self.image_cache
        keys = [cache.key(im) for im in images]
        found = {k: f for k in dict.fromkeys(keys) if (f := cache.get(k)) is not None}
        new = {k: i for i, k in enumerate(keys) if k not in found}  # the last copy of each new image
        cache.hits += len(keys) - len(new)
        cache.misses += len(new)
        if new:
            encoded = self.model.encode_images(images[list(new.values())].to(self.device))[:, 0]  # [m, P, W]
            for k, f in zip(new, encoded.unbind(0)):
                found[k] = f
                # a copy: a view would keep the whole call's output (every image, CLS row included) alive
                cache.put(k, f.clone() if cache.capacity else f)
        feats = torch.stack([found[k] for k in keys]).split(num_images.tolist())  # per newcomer, slot order
        return pad_images(feats)[0], num_images.to(self.device)

    def _decode(self, tokens: torch.Tensor) -> None:
        """One forward of every running row's newest token."""
        n = len(self._rows)
        pos = self._len[:n].clone()
        t = int(pos.max()) + 1
        if t > self._cap:
            self._ensure_cache(t, n)
        # An additive float mask: SDPA's CPU kernel takes it faster than a boolean one (same result).
        mask = torch.zeros(n, 1, 1, t, device=self.device, dtype=self.dtype).masked_fill_(
            torch.arange(t, device=self.device)[None, None, None, :] > pos[:, None, None, None], float("-inf"))
        model = self.model
        embeds = model.model.embed_tokens(tokens[:, None])
        hidden, _ = model.model(embeds, mask, pos[:, None], _DecodeCache(self._k, self._v, pos, t))
        self._logits = model.lm_head(hidden[:, -1])
        self._len[:n] += 1
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, n)
