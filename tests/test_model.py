"""The language model: the published state-dict layout, the math against a naive reference, masks, caches, MoE."""
import math

import pytest
import torch
import torch.nn.functional as F

from model.model_minimind import CACHE_FIELD, MiniMindConfig, MiniMindForCausalLM, rope_tables
from model.model_vlm import MiniMindVLM, VLMConfig

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            max_position_embeddings=512)


def tiny_lm(seed: int = 0, **kw) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(**{**TINY, **kw})).eval()


def expected_keys(hidden: int, layers: int, moe: bool, vlm: bool = True) -> dict[str, tuple]:
    """The published state-dict layout, written out key by key."""
    kv = 2 * (hidden // 8)
    inter = 64 * math.ceil(hidden * 8 / 3 / 64)
    keys = {"model.embed_tokens.weight": (6400, hidden), "model.norm.weight": (hidden,),
            "lm_head.weight": (6400, hidden)}
    ffn = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    for i in range(layers):
        p = f"model.layers.{i}."
        keys |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                 p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                 p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
        if moe:
            for e in range(4):
                keys |= {f"{p}mlp.experts.{e}.{n}.weight": s for n, s in ffn.items()}
            keys |= {f"{p}mlp.shared_experts.0.{n}.weight": s for n, s in ffn.items()}
            keys[p + "mlp.gate.weight"] = (4, hidden)
        else:
            keys |= {f"{p}mlp.{n}.weight": s for n, s in ffn.items()}
    if vlm:
        keys |= {"vision_proj.vision_proj.0.weight": (hidden, 768), "vision_proj.vision_proj.0.bias": (hidden,)}
    return keys


@pytest.mark.parametrize("moe,count", [(False, 77), (True, 181)])
def test_state_dict_layout_matches_spec(moe, count):
    model = MiniMindVLM(VLMConfig(use_moe=moe))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_keys(512, 8, moe)
    assert len(got) == count
    assert all(v.is_floating_point() for v in model.state_dict().values())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert model.config.intermediate_size == 1408
    assert MiniMindConfig(hidden_size=768).intermediate_size == 2048


def test_parameter_count_is_26m():
    model = MiniMindForCausalLM(MiniMindConfig())
    n = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert 25.5e6 < n < 26.5e6


def naive_forward(model: MiniMindForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The published architecture spelled out with explicit matrices, independent of the model's code paths."""
    c = model.config
    sd = model.state_dict()
    hd = c.hidden_size // c.num_attention_heads
    T = ids.shape[1]
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(T).float()[:, None] * inv[None]  # [T, hd/2]

    def rope(x):  # x [T, hd]: pairs (i, i + hd/2) rotate by ang[:, i]
        a, b = x[:, : hd // 2], x[:, hd // 2:]
        return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], dim=-1)

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps))

    out = []
    for row in ids:
        h = sd["model.embed_tokens.weight"][row]
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            x = rms(h, sd[p + "input_layernorm.weight"])
            q, k, v = (x @ sd[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
            heads = []
            for hh in range(c.num_attention_heads):
                g = hh // (c.num_attention_heads // c.num_key_value_heads)
                qh = rope(q[:, hh * hd:(hh + 1) * hd])
                kh = rope(k[:, g * hd:(g + 1) * hd])
                vh = v[:, g * hd:(g + 1) * hd]
                s = qh @ kh.T / math.sqrt(hd)
                s = s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
                heads.append(s.softmax(-1) @ vh)
            h = h + torch.cat(heads, -1) @ sd[p + "self_attn.o_proj.weight"].T
            x = rms(h, sd[p + "post_attention_layernorm.weight"])
            gate = x @ sd[p + "mlp.gate_proj.weight"].T
            h = h + ((gate * torch.sigmoid(gate)) * (x @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
        out.append(rms(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T)
    return torch.stack(out)


def test_forward_matches_naive_reference():
    model = tiny_lm()
    ids = torch.randint(3, 6400, (2, 17))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, naive_forward(model, ids), atol=1e-4)


def test_rope_tables_layout_and_yarn():
    cos, sin = rope_tables(8, 4, 1e6)
    inv = 1.0 / (1e6 ** (torch.arange(0, 8, 2).float() / 8))
    assert torch.allclose(cos[3], torch.cat([torch.cos(3 * inv)] * 2))
    assert torch.allclose(sin[2], torch.cat([torch.sin(2 * inv)] * 2))
    # YaRN leaves fast-rotating dims alone and divides the slowest by the factor.
    yarn = dict(factor=16, original_max_position_embeddings=2048, beta_fast=32, beta_slow=1, attention_factor=1.0)
    c0, _ = rope_tables(64, 32768, 1e6)
    c1, _ = rope_tables(64, 32768, 1e6, yarn)
    assert torch.allclose(c0[:, 0], c1[:, 0])
    slow0 = torch.acos(c0[1, 31].clamp(-1, 1))
    slow1 = torch.acos(c1[1, 31].clamp(-1, 1))
    assert torch.isclose(slow1, slow0 / 16, rtol=1e-3)
    # the config flag switches it on (for a context longer than the original 2048)
    long = {**TINY, "max_position_embeddings": 4096}
    scaled = MiniMindForCausalLM(MiniMindConfig(**long, inference_rope_scaling=True)).model.rotary_emb.cos
    plain = MiniMindForCausalLM(MiniMindConfig(**long)).model.rotary_emb.cos
    assert torch.allclose(scaled[:, 0], plain[:, 0]) and not torch.allclose(scaled, plain)


def test_kv_cache_decoding_equals_full_recomputation():
    model = tiny_lm()
    ids = torch.randint(3, 6400, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :7], use_cache=True)
        steps = [out.logits]
        cache = out[CACHE_FIELD]
        for t in range(7, 12):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
        # a multi-token chunk on top of a cache (chunked prefill) too, passed by the pre-5.24 name
        out2 = model(ids[:, :4], use_cache=True)
        chunk = model(ids[:, 4:12], past_key_values=out2[CACHE_FIELD], use_cache=True).logits
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    assert torch.allclose(chunk, full[:, 4:], atol=1e-5)


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    return ids, mask


def test_left_padded_forward_equals_each_row_alone():
    model = tiny_lm()
    rows = [torch.randint(3, 6400, (n,)) for n in (9, 4, 6)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            assert torch.allclose(batched[i, -len(r):], alone, atol=1e-5)
        assert torch.isfinite(batched).all()  # pad rows stay finite (no NaN leaking through 0 * NaN)


def test_batched_left_padded_generate_equals_per_row():
    model = tiny_lm(seed=1)
    rows = [torch.randint(3, 6400, (n,)) for n in (8, 3, 5)]
    ids, mask = left_pad(rows)
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    batched = model.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    for i, r in enumerate(rows):
        alone = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), **kw)[0, len(r):]
        assert torch.equal(batched[i], alone)


def test_generate_greedy_equals_manual_argmax_loop():
    """transformers' generate (KV cache, whatever it names it) equals recomputing the whole sequence."""
    model = tiny_lm(seed=2)
    with torch.no_grad():  # peaky weights: a varied continuation, which an ignored cache would change
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    ids = torch.randint(3, 6400, (1, 6))
    got = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
    x = ids
    with torch.no_grad():
        for _ in range(10):
            x = torch.cat([x, model(x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert len(x[0, 6:].unique()) > 5
    assert torch.equal(got, x)


def test_sampling_generate_options():
    model = tiny_lm(seed=3)
    ids = torch.randint(3, 6400, (1, 5))
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=4, do_sample=True, temperature=0.65, top_p=0.85,
                         repetition_penalty=1.3, num_return_sequences=3, eos_token_id=None)
    assert out.shape == (3, 9)
    assert torch.equal(out[:, :5], ids.expand(3, -1))


def test_loss_only_on_supervised_positions():
    model = tiny_lm()
    ids = torch.randint(3, 6400, (2, 10))
    labels = ids.clone()
    labels[:, :6] = -100
    labels[1, 8:] = -100
    out = model(ids, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 6400), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, ref, atol=1e-5)
    lean = model(ids, labels=labels, return_logits=False)
    assert lean.logits is None and torch.allclose(lean.loss, ref, atol=1e-5)


def test_moe_routes_and_reports_aux_loss():
    model = tiny_lm(use_moe=True).train()
    ids = torch.randint(3, 6400, (2, 10))
    out = model(ids, labels=ids)
    assert out.aux_loss > 0
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 6400), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ce + out.aux_loss, atol=1e-5)
    out.loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad is not None
    # eval: no aux loss; the MoE layer equals its definition (top-k renormalised experts + shared)
    model.eval()
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        scores = (x.reshape(-1, 64) @ mlp.gate.weight.T).softmax(-1)
        w, idx = scores.topk(2, -1)
        w = w / w.sum(-1, keepdim=True)
        ref = torch.stack([sum(w[t, j] * mlp.experts[int(idx[t, j])](x[0, t]) for j in range(2))
                           for t in range(5)])[None] + mlp.shared_experts[0](x)
        assert torch.allclose(mlp(x), ref, atol=1e-5)
    assert model(ids).aux_loss == 0
