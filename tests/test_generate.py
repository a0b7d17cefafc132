"""Generation: the fast static-cache loop (model/generate.py) and transformers' stock `generate`."""
import pytest
import torch

from model.generate import StaticKVCache, apply_repetition_penalty, generate, sample_next, stream_text
from model.model_vlm import MiniMindVLM, VLMConfig

IMG = 34


@pytest.fixture(scope="module")
def model(tiny_clip):
    torch.manual_seed(0)
    m = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=2), vision_model_path=tiny_clip).eval()
    with torch.no_grad():  # a peaky random model: greedy choices are not near-ties, and do not repeat one token
        for p in m.model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return m


def prompt(seed: int, n_text: int, n_images: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(40, 6400, (n_text,), generator=g)
    parts = [text[: n_text // 2]] + [torch.full((196,), IMG)] * n_images + [text[n_text // 2:]]
    return torch.cat(parts)[None]


def pixels(seed: int, n: int = 1) -> torch.Tensor:
    return torch.randn(1, n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - r.shape[1]:], mask[i, T - r.shape[1]:] = r[0], 1
    return ids, mask


def hf_greedy(model, ids, n, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


@torch.no_grad()
def test_static_cache_decoding_equals_full_recomputation(model):
    ids, px = prompt(1, 30), pixels(1)
    T = ids.shape[1]
    cache = StaticKVCache(model.config, 1, T + 8, model.device, model.dtype)
    step_logits = [model(ids, pixel_values=px, cache=cache, use_cache=True).logits[:, -1]]
    seq = ids
    for _ in range(6):
        nxt = step_logits[-1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        step_logits.append(model(nxt, cache=cache, use_cache=True).logits[:, -1])
    assert cache.get_seq_length() == seq.shape[1]
    full = model(seq, pixel_values=px).logits[0, T - 1:]
    torch.testing.assert_close(torch.cat(step_logits), full, rtol=1e-4, atol=1e-4)


def test_fast_path_equals_hf_generate_greedy(model):
    ids, px = prompt(2, 24), pixels(2)
    ours = generate(model, ids, pixel_values=px, max_new_tokens=20, eos_token_id=None)
    assert len(ours.unique()) > 10  # a constant continuation would hide a cache that is ignored
    assert torch.equal(ours, hf_greedy(model, ids, 20, pixel_values=px))


def test_batched_left_padded_equals_per_row(model):
    rows = [prompt(3, 10), prompt(4, 31), prompt(5, 4)]
    px = torch.cat([pixels(3), pixels(4), pixels(5)])
    ids, mask = left_pad(rows)
    single = [generate(model, r, pixel_values=px[i:i + 1], max_new_tokens=10, eos_token_id=None)
              for i, r in enumerate(rows)]
    batched = generate(model, ids, mask, px, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(batched, torch.cat(single))
    hf_batched = hf_greedy(model, ids, 10, attention_mask=mask, pixel_values=px)
    hf_single = torch.cat([hf_greedy(model, r, 10, pixel_values=px[i:i + 1]) for i, r in enumerate(rows)])
    assert torch.equal(hf_batched, hf_single)
    assert torch.equal(hf_batched, batched)


def test_multi_image_rows_with_spare_images(model):
    """A batch mixing a two-image row and a one-image row (its spare image slot is never used)."""
    two, one = prompt(6, 12, n_images=2), prompt(7, 12, n_images=1)
    px = torch.cat([pixels(6, 2), torch.cat([pixels(7), torch.zeros(1, 1, 3, 224, 224)], dim=1)])
    ids, mask = left_pad([two, one])
    with pytest.raises(ValueError, match="sample 1 has 1 image slot"):  # the zero padding is no image
        generate(model, ids, mask, px, max_new_tokens=6, eos_token_id=None)
    batched = generate(model, ids, mask, px, max_new_tokens=6, eos_token_id=None, num_images=torch.tensor([2, 1]))
    assert torch.equal(batched[0], generate(model, two, pixel_values=px[:1], max_new_tokens=6, eos_token_id=None)[0])
    assert torch.equal(batched[1], generate(model, one, pixel_values=px[1:, :1], max_new_tokens=6, eos_token_id=None)[0])


def test_eos_stops_and_pads_finished_rows(model):
    ids = prompt(8, 10)
    free = generate(model, ids, pixel_values=pixels(8), max_new_tokens=8, eos_token_id=None)[0]
    eos = int(free[2])  # pretend the third generated token is EOS
    out = generate(model, torch.cat([ids, ids]), pixel_values=pixels(8).expand(2, -1, -1, -1, -1),
                   max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    first = int((free == eos).nonzero()[0])
    assert out.shape[1] == first + 1 and (out[:, first] == eos).all()


def test_repetition_penalty_lowers_seen_tokens_positive_and_negative():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0]])
    seen = torch.tensor([[True, True, False, False, False]])
    out = apply_repetition_penalty(logits, seen, 1.5)
    p0, p1 = logits.softmax(-1), out.softmax(-1)
    assert p1[0, 0] < p0[0, 0] and p1[0, 1] < p0[0, 1]  # the negative one too (the original raised it)
    assert torch.equal(out[0, 2:], logits[0, 2:])
    from transformers import RepetitionPenaltyLogitsProcessor  # same rule as transformers'
    ref = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[0, 1]]), logits.clone())
    torch.testing.assert_close(out, ref)


def test_repetition_penalty_in_generation_matches_hf(model):
    ids = prompt(9, 16)
    ours = generate(model, ids, pixel_values=pixels(9), max_new_tokens=12, repetition_penalty=1.3, eos_token_id=None)
    assert torch.equal(ours, hf_greedy(model, ids, 12, pixel_values=pixels(9), repetition_penalty=1.3))


def test_sampling_top_p_and_seed():
    logits = torch.tensor([[5.0, 4.0, 0.0, -2.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.5, generator=g)
    assert set(draws.tolist()) == {0}  # token 0 alone covers 73% > top_p
    draws = sample_next(logits, temperature=1.0, top_p=0.999, generator=g)
    assert set(draws.tolist()) == {0, 1, 2}  # the tail token (0.07%) is cut
    assert torch.equal(sample_next(logits[:1], 0.0, 0.5), torch.tensor([0]))


def test_fast_sampling_reproducible_and_num_return_sequences(model):
    ids, px = prompt(10, 12), pixels(10)
    kw = dict(pixel_values=px, max_new_tokens=10, temperature=1.0, top_p=0.9, eos_token_id=None,
              num_return_sequences=3)
    a = generate(model, ids, generator=torch.Generator().manual_seed(1), **kw)
    b = generate(model, ids, generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == (3, 10) and torch.equal(a, b)
    assert len({tuple(r) for r in a.tolist()}) > 1  # the copies diverge


def test_stream_text_pieces_join_to_the_decoded_answer(model, fixture_tokenizer_path):
    from model.processor import load_tokenizer
    tok = load_tokenizer(fixture_tokenizer_path)
    ids, px = prompt(11, 20), pixels(11)
    stats = {}
    pieces = list(stream_text(model, tok, ids, px, max_new_tokens=30, stats=stats))
    ref = generate(model, ids, pixel_values=px, max_new_tokens=30, eos_token_id=tok.eos_token_id)[0].tolist()
    ref = [t for t in ref if t != tok.eos_token_id and t != 0]
    assert "".join(pieces) == tok.decode(ref, skip_special_tokens=True)
    assert stats["new_tokens"] == len(ref) and len(pieces) > 1


# ----------------------------------------------------- transformers' stock generate with this model

def test_hf_generate_encodes_images_once_and_supports_sampling_streaming(model, fixture_tokenizer_path):
    from transformers import TextStreamer

    from model.processor import load_tokenizer
    ids, px = prompt(12, 10), pixels(12)
    calls = []
    forward = model.vision_encoder.forward
    model.vision_encoder.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(ids, pixel_values=px, max_new_tokens=8, do_sample=True, temperature=0.7,
                                 top_p=0.85, pad_token_id=0, num_return_sequences=2)
    finally:
        model.vision_encoder.forward = forward
    assert out.shape[0] == 2 and len(calls) == 1  # pixel_values dropped after prefill by transformers

    tok = load_tokenizer(fixture_tokenizer_path)

    class Capture(TextStreamer):
        text = ""

        def on_finalized_text(self, text, stream_end=False):
            self.text += text
    streamer = Capture(tok, skip_prompt=True)
    with torch.no_grad():
        out = model.generate(ids, pixel_values=px, max_new_tokens=12, do_sample=False, pad_token_id=0,
                             eos_token_id=None, streamer=streamer)
    assert streamer.text == tok.decode(out[0, ids.shape[1]:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda(model, dtype):
    import copy
    m = copy.deepcopy(model).to("cuda", dtype)
    out = generate(m, prompt(13, 10), pixel_values=pixels(13).to(dtype), max_new_tokens=6, eos_token_id=None)
    assert out.shape == (1, 6)
