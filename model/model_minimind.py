"""MiniMind: the small decoder-only language model under MiniMind-V.

One file, top to bottom: config, RMSNorm, rotary tables (with optional YaRN), grouped-query
attention over `scaled_dot_product_attention` with a KV cache, SwiGLU MLP, the optional
mixture-of-experts MLP, the decoder stack and the causal-LM head. Parameter names and shapes
match the published MiniMind2 weights key for key (`model.layers.{i}.self_attn.q_proj.weight`, ...),
so `out/llm_512.pth` and the MiniMind2-V files load strictly.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .processor import IGNORE_INDEX

# transformers 5.24 renamed the outputs' `past_key_values` field to `cache`; fill whichever this version has.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# YaRN (inference_rope_scaling=True) stretches the 2048-token training context 16x.
YARN = dict(factor=16, original_max_position_embeddings=2048, beta_fast=32, beta_slow=1, attention_factor=1.0)


class MiniMindConfig(PreTrainedConfig):
    model_type = "minimind"

    def __init__(
        self,
        dropout: float = 0.0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        hidden_act: str = "silu",
        hidden_size: int = 512,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 32768,
        num_attention_heads: int = 8,
        num_hidden_layers: int = 8,
        num_key_value_heads: int = 2,
        vocab_size: int = 6400,
        rms_norm_eps: float = 1e-05,
        rope_theta: float = 1e6,
        inference_rope_scaling: bool = False,
        flash_attn: bool = True,
        use_moe: bool = False,
        num_experts_per_tok: int = 2,
        n_routed_experts: int = 4,
        n_shared_experts: int = 1,
        scoring_func: str = "softmax",
        aux_loss_alpha: float = 0.01,
        seq_aux: bool = True,
        norm_topk_prob: bool = True,
        **kwargs: Any,
    ):
        self.dropout = dropout
        self.hidden_act = hidden_act
        self.hidden_size = hidden_size
        # SwiGLU keeps ~8/3 * hidden, rounded up to a multiple of 64 (1408 for 512, 2048 for 768).
        self.intermediate_size = intermediate_size or 64 * math.ceil(hidden_size * 8 / 3 / 64)
        self.max_position_embeddings = max_position_embeddings
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.num_key_value_heads = num_key_value_heads
        self.vocab_size = vocab_size
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.inference_rope_scaling = inference_rope_scaling
        self.flash_attn = flash_attn
        self.use_moe = use_moe
        self.num_experts_per_tok = num_experts_per_tok
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.norm_topk_prob = norm_topk_prob
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def rope_tables(head_dim: int, end: int, theta: float, rope_scaling: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [end, head_dim] laid out as cat(freqs, freqs) for the rotate-half convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    attn_factor = 1.0
    if rope_scaling is not None:
        orig_max = rope_scaling["original_max_position_embeddings"]
        factor, attn_factor = rope_scaling["factor"], rope_scaling["attention_factor"]
        if end / orig_max > 1.0:
            # YaRN: dims that rotate fewer than beta_slow times over orig_max are scaled by 1/factor,
            # dims that rotate more than beta_fast times are kept, with a linear ramp in between.
            def dim_of(rotations: float) -> float:
                return head_dim * math.log(orig_max / (rotations * 2 * math.pi)) / (2 * math.log(theta))
            low = max(math.floor(dim_of(rope_scaling["beta_fast"])), 0)
            high = min(math.ceil(dim_of(rope_scaling["beta_slow"])), head_dim // 2 - 1)
            ramp = ((torch.arange(head_dim // 2).float() - low) / max(high - low, 0.001)).clamp(0, 1)
            inv_freq = inv_freq * (1 - ramp + ramp / factor)
    freqs = torch.outer(torch.arange(end).float(), inv_freq)
    freqs = torch.cat([freqs, freqs], dim=-1)
    return freqs.cos() * attn_factor, freqs.sin() * attn_factor


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables as non-persistent buffers (they are not in the state dict)."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        cos, sin = self.compute_tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def compute_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return rope_tables(c.hidden_size // c.num_attention_heads, c.max_position_embeddings,
                           c.rope_theta, YARN if c.inference_rope_scaling else None)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, 1, T, head_dim] (broadcast over heads)."""
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if T == 1 and self.n_kv_heads != self.n_heads and not self.training:
            # A decode step: the query heads sharing a K/V head are that head's queries, so plain attention
            # over [B, kv_heads, group, head_dim] is the same sum as the GQA call below; SDPA's CPU kernel runs
            # it 1.3-1.5x faster (the mask [B, 1, 1, kv] broadcasts over the group).
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_heads, -1, self.head_dim), k, v, attn_mask=mask)
            return self.o_proj(y.reshape(B, -1))[:, None]
        # mask None + T > 1 means "plain causal, no padding, no cache": the fastest SDPA path.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, T, -1)))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class MoEGate(nn.Module):
    """Softmax router; returns top-k expert ids, their weights and the load-balancing loss."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        B, T, H = x.shape
        if c.scoring_func != "softmax":
            raise NotImplementedError(f"unsupported MoE scoring function {c.scoring_func!r}")
        scores = F.linear(x.reshape(-1, H), self.weight).softmax(dim=-1)  # [B*T, E]
        topk_w, topk_idx = scores.topk(c.num_experts_per_tok, dim=-1, sorted=False)
        if c.num_experts_per_tok > 1 and c.norm_topk_prob:
            topk_w = topk_w / (topk_w.sum(dim=-1, keepdim=True) + 1e-20)
        aux = scores.new_zeros(())
        if self.training and c.aux_loss_alpha > 0.0:
            E, k = c.n_routed_experts, c.num_experts_per_tok
            if c.seq_aux:
                # Per sequence: (fraction of routed slots an expert got * E) . (mean router prob).
                load = torch.zeros(B, E, device=x.device).scatter_add_(
                    1, topk_idx.view(B, -1), torch.ones(B, T * k, device=x.device)).div_(T * k / E)
                aux = (load * scores.view(B, T, E).mean(dim=1)).sum(dim=1).mean() * c.aux_loss_alpha
            else:
                load = F.one_hot(topk_idx.view(-1), num_classes=E).float().mean(0) * E
                aux = (scores.mean(0) * load).sum() * c.aux_loss_alpha
        return topk_idx, topk_w, aux


class MoEFeedForward(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_routed_experts))
        self.gate = MoEGate(config)
        self.shared_experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_shared_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        topk_idx, topk_w, self.aux_loss = self.gate(x)
        flat = x.reshape(-1, H)
        out = torch.zeros_like(flat)
        # Loop over the (few) experts, never over tokens: each expert sees only its routed rows.
        for e, expert in enumerate(self.experts):
            token, slot = (topk_idx == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                if self.training:  # keep every expert in the graph (DDP needs a gradient for each)
                    out = out + 0.0 * sum(p.sum() for p in expert.parameters())
                continue
            y = expert(flat[token]) * topk_w[token, slot].unsqueeze(-1).to(flat.dtype)
            out = out.index_add(0, token, y.to(out.dtype))
        out = out.view(B, T, H)
        for shared in self.shared_experts:
            out = out + shared(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, h, cos, sin, mask, cache):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def build_attention_mask(attention_mask: torch.Tensor | None, q_len: int, past_len: int,
                         dtype_device_like: torch.Tensor) -> torch.Tensor | None:
    """Boolean SDPA mask [B, 1, q_len, past_len + q_len] (True = may attend), or None when plain
    causal attention (or, for one new token, attending to everything) is exact."""
    kv_len = past_len + q_len
    if attention_mask is not None and attention_mask.dim() == 4:
        # A float 4-D mask is additive (0 / -inf), as SDPA takes it; anything else means "may attend".
        return attention_mask if attention_mask.is_floating_point() else attention_mask.bool()
    has_padding = attention_mask is not None and not bool(attention_mask[:, :kv_len].all())
    if not has_padding and (past_len == 0 or q_len == 1):
        return None
    device = dtype_device_like.device
    q_pos = torch.arange(past_len, kv_len, device=device)
    causal = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]  # [q, kv]
    mask = causal[None, None]
    if has_padding:
        keys = attention_mask[:, None, None, :kv_len].bool()
        # A padded query row would see no key at all (SDPA then yields NaN, which leaks through
        # 0 * NaN); letting every query see itself keeps pad rows finite and real rows unchanged.
        diag = torch.arange(kv_len, device=device)[None, :] == q_pos[:, None]
        mask = (mask & keys) | diag[None, None]
    return mask


def segment_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask [B, 1, T, T] for packed sequences: segment_ids [B, T] number the rows packed
    into each sequence; a token attends causally within its own row and never across rows, so each
    row computes exactly what it would alone. Padding (any shared id, e.g. 0) sees only padding."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]


class MiniMindModel(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, cache: Cache | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = inputs_embeds.shape
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                # Left padding: count positions from each row's first real token.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:past_len + T]
            else:
                position_ids = torch.arange(past_len, past_len + T, device=inputs_embeds.device)[None].expand(B, -1)
        cos, sin = self.rotary_emb(position_ids)
        mask = build_attention_mask(attention_mask, T, past_len, inputs_embeds)
        h = self.dropout(inputs_embeds)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        aux = sum((l.mlp.aux_loss for l in self.layers if isinstance(l.mlp, MoEFeedForward)),
                  h.new_zeros(()))
        return self.norm(h), aux


class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = MiniMindConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _skip_keys_device_placement = ["cache", "past_key_values"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            # Non-persistent buffers are not in checkpoints; rebuild them after meta-device loading.
            cos, sin = module.compute_tables()
            with torch.no_grad():
                module.cos.copy_(cos)
                module.sin.copy_(sin)
        elif isinstance(module, MoEGate):
            nn.init.normal_(module.weight, std=0.02)


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig | None = None):
        config = config or MiniMindConfig()
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def embed(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Token embeddings; the VLM overrides this to splice in image features."""
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_logits: bool = True,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Causal LM forward.

        With `labels`, the loss is next-token cross-entropy over positions whose label is not -100;
        `return_logits=False` then skips the full-vocabulary projection everywhere else (training
        only needs the loss). `logits_to_keep=k` keeps only the last k positions' logits.
        The KV cache comes as `cache` (transformers >= 5.24 names it so) or `past_key_values` (before).
        """
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, **kwargs)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if use_cache is False:
            cache = None
        hidden, aux_loss = self.model(inputs_embeds, attention_mask, position_ids, cache)
        loss = None
        if labels is not None:
            # Project only the supervised positions: the loss never looks at the rest.
            targets = labels[:, 1:]
            keep = targets != IGNORE_INDEX
            sup_logits = self.lm_head(hidden[:, :-1][keep])
            loss = F.cross_entropy(sup_logits.float(), targets[keep], reduction="sum") / keep.sum().clamp(min=1)
            loss = loss + aux_loss
        logits = None
        if return_logits:
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
        out.aux_loss = aux_loss
        return out
