"""model/engine.py: continuous batching gives every request what it gets alone; sampling, stops, cancellation."""
import contextlib
import threading
import time

import pytest
import torch

from model.engine import (
    Detokenizer,
    Engine,
    EngineBusy,
    GenRequest,
    ImageFeatureCache,
    row_uniform,
    sample_rows,
    transpose_linear_storage,
)
from model.generate import generate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_clip):
    from model.model_vlm import MiniMindVLM, VLMConfig
    torch.manual_seed(0)
    m = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=2), vision_model_path=tiny_clip).eval()
    with torch.no_grad():  # a peaky random model: greedy choices are not near-ties
        for p in m.model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return m


@pytest.fixture(scope="module")
def tok():
    from model import PROJECT_TOKENIZER
    from model.processor import load_tokenizer
    return load_tokenizer(PROJECT_TOKENIZER)


@pytest.fixture
def engine(model, tok):
    eng = Engine(model, tok, max_batch=16, max_queue=32, image_cache=0)  # every image encoded where it comes
    yield eng
    eng.close()


def request(prompt_seed: int, n_text: int, n_images: int, **kw) -> GenRequest:
    g = torch.Generator().manual_seed(prompt_seed)
    text = torch.randint(40, 6400, (n_text,), generator=g)
    ids = torch.cat([text[: n_text // 2]] + [torch.full((196,), 34)] * n_images + [text[n_text // 2:]])
    px = torch.randn(n_images, 3, 224, 224, generator=g) if n_images else None
    return GenRequest(ids.tolist(), px, **kw)


def tokens(handle) -> list[int]:
    return [ev.token for ev in handle if ev.token is not None]


def test_greedy_batch_of_16_equals_each_request_alone(engine, model):
    reqs = [request(s, 4 + 5 * s, s % 3, max_new_tokens=12 + s % 5) for s in range(16)]
    alone = [tokens(engine.submit(r)) for r in reqs]
    steps = engine.steps
    handles = [engine.submit(r) for r in reqs]
    together = [tokens(h) for h in handles]
    assert together == alone
    assert engine.max_rows_seen == 16 and engine.steps - steps < sum(len(a) for a in alone) / 4  # really batched
    for r, a in zip(reqs[:4], alone):  # and the same as the single-request decode loop
        px = None if r.pixel_values is None else r.pixel_values[None]
        ref = generate(model, torch.tensor([r.input_ids]), pixel_values=px, max_new_tokens=len(a), eos_token_id=None)
        assert ref[0].tolist() == a


def test_linear_weights_are_stored_transposed_with_the_same_values(tiny_clip):
    """The engine's fp32 fast path reorders the language model's linear weights in memory only: same values,
    same shapes, tied weights still tied, CLIP and the vision projection untouched, and only once."""
    from model.model_vlm import MiniMindVLM, VLMConfig
    m = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=2), vision_model_path=tiny_clip).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert transpose_linear_storage(m) == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    lm = [mod.weight for mod in m.model.modules() if isinstance(mod, torch.nn.Linear)] + [m.lm_head.weight]
    assert all(w.t().is_contiguous() and not w.is_contiguous() for w in lm)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    others = [p for name, p in m.named_parameters() if name.startswith(("vision_encoder", "vision_proj"))]
    assert others and all(p.is_contiguous() for p in others)
    assert transpose_linear_storage(m) == 0


def test_rows_join_and_leave_a_running_batch(engine):
    """Requests arriving while others decode (continuous batching) still get their solo tokens."""
    reqs = [request(100 + s, 10 + s, s % 2, max_new_tokens=6 + 4 * s) for s in range(8)]
    alone = [tokens(engine.submit(r)) for r in reqs]
    handles = []
    for r in reqs:
        handles.append(engine.submit(r))
        time.sleep(0.01)
    assert [tokens(h) for h in handles] == alone


@contextlib.contextmanager
def forward_sizes(model, pause: float = 0.0):
    """Record the query length of every decoder forward (1: a decode step), sleeping `pause` in each."""
    sizes = []
    hook = model.model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[1]) or time.sleep(pause))
    try:
        yield sizes
    finally:
        hook.remove()


def test_long_prompts_are_prefilled_in_chunks_with_the_same_tokens(model, tok):
    """A prompt longer than prefill_budget is prefilled one chunk per step: greedy tokens are those of a
    whole-prompt prefill, alone, with n choices, with the penalty, and joining a batch whose rows finish
    (so its slots move) while it is chunked."""
    reqs = [request(300 + s, 10 + 7 * s, 1 + s % 2, max_new_tokens=8) for s in range(5)]  # 206-430 tokens
    reqs.append(request(306, 20, 1, max_new_tokens=8, repetition_penalty=1.3, n=2))
    with contextlib.closing(Engine(model, tok, max_batch=16)) as whole:  # the default budget: every prompt in one piece
        ref = [tokens(whole.submit(r)) for r in reqs]
    with contextlib.closing(Engine(model, tok, max_batch=16, prefill_budget=64)) as eng, forward_sizes(model) as sizes:
        assert [tokens(eng.submit(r)) for r in reqs] == ref
        assert max(sizes) == 64
        short = [eng.submit(request(400 + s, 8, 0, max_new_tokens=2 + s)) for s in range(4)]
        handles = [eng.submit(r) for r in reqs]
        assert [tokens(h) for h in handles] == ref and all(len(tokens(h)) == 2 + s for s, h in enumerate(short))


def test_running_rows_decode_between_the_chunks_of_a_long_prompt(model, tok):
    with contextlib.closing(Engine(model, tok, max_batch=4, prefill_budget=64)) as eng, forward_sizes(model) as sizes:
        running = iter(eng.submit(request(500, 8, 0, max_new_tokens=40)))
        next(running)
        sizes.clear()
        long = eng.submit(request(501, 40, 1, max_new_tokens=3))  # 236 prompt tokens: chunks of 64, 64, 64, 44
        assert len(tokens(long)) == 3
        list(running)
    chunks = [i for i, t in enumerate(sizes) if t > 1]
    assert [sizes[i] for i in chunks] == [64, 64, 64, 44]
    assert all(sizes[i + 1] == 1 for i in chunks)  # a decode step after every chunk: nobody waits for all four


def test_cancel_during_a_chunked_prefill(model, tok):
    with contextlib.closing(Engine(model, tok, max_batch=2, prefill_budget=32)) as eng, forward_sizes(model, 0.02) as sizes:
        h = eng.submit(request(600, 40, 1, max_new_tokens=5))  # 236 tokens: 8 chunks
        deadline = time.time() + 30
        while len(sizes) < 2 and time.time() < deadline:
            time.sleep(0.005)
        h.cancel()
        assert [ev.finish for ev in h] == ["cancelled"] and len(sizes) < 8
        assert len(tokens(eng.submit(request(601, 8, 0, max_new_tokens=3)))) == 3


def test_seeded_sampling_is_independent_of_the_batch(engine):
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    alone = tokens(engine.submit(request(1, 20, 1, **kw)))
    others = [engine.submit(request(s, 15, 0, max_new_tokens=10, temperature=0.8)) for s in range(5)]
    mine = engine.submit(request(1, 20, 1, **kw))
    assert tokens(mine) == alone
    for h in others:
        tokens(h)
    assert tokens(engine.submit(request(1, 20, 1, **{**kw, "seed": 8}))) != alone
    h = engine.submit(request(1, 20, 1, **{**kw, "n": 3}))
    by_choice = [[], [], []]
    for ev in h:
        if ev.token is not None:
            by_choice[ev.index].append(ev.token)
    assert by_choice[0] == alone and len({tuple(c) for c in by_choice}) == 3  # choices diverge


def test_sample_rows_follows_top_p_and_uniforms():
    u = row_uniform(torch.zeros(4000, dtype=torch.long), torch.zeros(4000, dtype=torch.long), torch.arange(4000))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.03
    logits = torch.tensor([[5.0, 4.0, 0.0, -2.0]]).repeat(4000, 1)
    seeds = torch.arange(4000)
    args = (seeds, torch.zeros_like(seeds), torch.zeros_like(seeds))
    draws = sample_rows(logits, torch.ones(4000), torch.full((4000,), 0.5), *args)
    assert set(draws.tolist()) == {0}  # token 0 alone covers 73% > top_p
    draws = sample_rows(logits, torch.ones(4000), torch.full((4000,), 0.999), *args)
    assert set(draws.tolist()) == {0, 1, 2}  # the tail token (0.07%) is cut
    share = (draws == 1).float().mean()
    assert 0.2 < float(share) < 0.33  # p(1) = 0.265 after the cut
    temps = torch.tensor([0.0, 1.0]).repeat(2000)  # greedy and sampled rows side by side
    draws = sample_rows(logits, temps, torch.ones(4000), *args)
    assert (draws[temps == 0] == 0).all() and (draws[temps > 0] != 0).any()


def test_penalty_matches_the_single_request_loop(engine, model):
    r = request(9, 16, 1, max_new_tokens=12, repetition_penalty=1.3)
    ref = generate(model, torch.tensor([r.input_ids]), pixel_values=r.pixel_values[None], max_new_tokens=12,
                   repetition_penalty=1.3, eos_token_id=None)
    assert tokens(engine.submit(r)) == ref[0].tolist()


def test_detokenizer_streams_whole_characters_and_honours_stop(tok):
    text = "Hello wörld, 你好! The END is near."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok, [])
    pieces = [d.add(t)[0] for t in ids] + [d.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    d = Detokenizer(tok, ["END", "zzz"])
    out, stopped = [], False
    for t in ids:
        piece, stopped = d.add(t)
        out.append(piece)
        if stopped:
            break
    assert stopped and "".join(out) == "Hello wörld, 你好! The "


def test_stop_length_and_context_cap(model, tok):
    eng = Engine(model, tok, max_batch=4, max_context=300)
    try:
        r = request(3, 40, 1, max_new_tokens=10_000)  # 236 prompt tokens: only 64 fit
        h = eng.submit(r)
        assert len(tokens(h)) == 300 - 236 and h.finish_reasons == ["length"]
        with pytest.raises(ValueError, match="context"):
            eng.submit(request(3, 120, 1))  # 316 prompt tokens
        free = tokens(eng.submit(request(4, 10, 0, max_new_tokens=40)))
        text = tok.decode(free, skip_special_tokens=True)
        stop = text[len(text) // 2:len(text) // 2 + 2]
        h = eng.submit(request(4, 10, 0, max_new_tokens=40, stop=[stop]))
        got = "".join(ev.text for ev in h)
        assert h.finish_reasons == ["stop"] and got == text[:text.index(stop)]
        assert h.completion_tokens[0] < len(free)  # the row stopped there, not at max_new_tokens
    finally:
        eng.close()


def slow(model, seconds: float):
    """Make every decoder forward sleep: a request that would run for long."""
    return model.model.register_forward_pre_hook(lambda *a: time.sleep(seconds))


def test_cancel_frees_the_row_and_full_queue_is_refused(model, tok):
    eng = Engine(model, tok, max_batch=1, max_queue=1)
    hook = slow(model, 0.02)
    try:
        long = eng.submit(request(5, 10, 0, max_new_tokens=1000))  # ~20 s if left alone
        it = iter(long)
        next(it), next(it)
        waiting = eng.submit(request(6, 10, 0, max_new_tokens=3))
        with pytest.raises(EngineBusy):
            eng.submit(request(7, 10, 0, max_new_tokens=3))
        t0 = time.perf_counter()
        long.cancel()
        assert len(tokens(waiting)) == 3 and time.perf_counter() - t0 < 5
        assert long.finish_reasons == ["cancelled"]
    finally:
        hook.remove()
        eng.close()


def test_many_threads_submit_at_once(engine):
    results, errors = {}, []

    def client(i):
        try:
            results[i] = tokens(engine.submit(request(200 + i, 8, i % 2, max_new_tokens=5)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 24 and all(len(v) == 5 for v in results.values())


def test_close_ends_every_request_with_an_error(model, tok):
    eng = Engine(model, tok, max_batch=1, max_queue=4)
    hook = slow(model, 0.02)
    try:
        hs = [eng.submit(request(s, 10, 0, max_new_tokens=500)) for s in range(3)]
        next(iter(hs[0]))
        eng.close()
        for h in hs:
            evs = list(h)
            assert evs[-1].error == "the server is shutting down"
    finally:
        hook.remove()


@pytest.fixture
def encoder_calls(model, monkeypatch) -> list[int]:
    """The number of images in each call of the model's vision encoder, as the test runs."""
    calls: list[int] = []
    encode = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda px, *a: calls.append(len(px)) or encode(px, *a))
    return calls


def test_images_seen_before_are_not_encoded_again(model, tok, encoder_calls):
    """A chat re-sends its images every turn: features come from the cache, with the same tokens."""
    calls = encoder_calls
    first = request(1, 10, 2, max_new_tokens=8)            # images A, B
    second = request(2, 12, 1, max_new_tokens=8)           # image C
    second.pixel_values = torch.cat([first.pixel_values, second.pixel_values])  # A, B, C: a follow-up turn
    second.input_ids = [34] * 196 * 2 + second.input_ids
    fresh = Engine(model, tok, max_batch=4, image_cache=0)
    try:
        expected = [tokens(fresh.submit(r)) for r in (first, second)]
    finally:
        fresh.close()
    assert calls == [2, 3]
    calls.clear()
    eng = Engine(model, tok, max_batch=4, image_cache=8)
    try:
        got = [tokens(eng.submit(r)) for r in (first, second)]
        assert got == expected and calls == [2, 1]            # the second turn encodes only C
        assert (eng.image_cache.hits, eng.image_cache.misses, len(eng.image_cache)) == (2, 3, 3)
        together = [eng.submit(r) for r in (first, second)]  # both from the cache, batched
        assert [tokens(h) for h in together] == expected and calls == [2, 1]
    finally:
        eng.close()


def test_an_image_twice_in_one_batch_is_encoded_once(model, tok, encoder_calls):
    calls = encoder_calls
    r = request(3, 8, 1, max_new_tokens=6)
    twice = request(3, 8, 2, max_new_tokens=6)
    twice.pixel_values = torch.cat([r.pixel_values, r.pixel_values])
    eng = Engine(model, tok, max_batch=4, image_cache=0)
    try:
        alone = tokens(eng.submit(twice))
        assert calls == [1] and len(eng.image_cache) == 0       # capacity 0 keeps nothing
        handles = [eng.submit(r), eng.submit(twice)]
        assert tokens(handles[1]) == alone and calls == [1, 1]
    finally:
        eng.close()


def test_image_cache_drops_the_least_recently_used():
    cache = ImageFeatureCache(2)
    a, b, c = (ImageFeatureCache.key(torch.full((3, 4, 4), float(i))) for i in range(3))
    assert len({a, b, c}) == 3 and ImageFeatureCache.key(torch.full((3, 4, 4), 0.0)) == a
    cache.put(a, torch.zeros(1))
    cache.put(b, torch.ones(1))
    assert cache.get(a) is not None      # a is now the most recent
    cache.put(c, torch.ones(1))          # drops b
    assert cache.get(b) is None and cache.get(a) is not None and cache.get(c) is not None and len(cache) == 2


def test_cached_features_own_their_memory(model, tok):
    """Each entry holds one image's features, not a view of the whole encoder output it came from."""
    eng = Engine(model, tok, max_batch=4, image_cache=8)
    try:
        tokens(eng.submit(request(5, 8, 3, max_new_tokens=2)))
        entries = list(eng.image_cache._features.values())
        assert len(entries) == 3
        for f in entries:
            assert f.untyped_storage().nbytes() == f.numel() * f.element_size()
    finally:
        eng.close()
