"""MiniMind(-V) as stock transformers models: `LlamaForCausalLM` for the LM, `LlavaForConditionalGeneration`
(+ a `LlavaProcessor`) for the VLM. No custom code is involved, so the folders load without
`trust_remote_code` and in tools that know Llama/LLaVA (vLLM, SGLang, llama.cpp's converter).

Why the mapping is exact:
- MiniMind's LM *is* a Llama: pre-norm RMSNorm (weight * normed.type_as(x)), rotate-half RoPE with
  inv_freq 1/theta^(2i/d), GQA without biases, SwiGLU, tied embeddings. Even the parameter names match.
- LLaVA's projector is linear_1 -> act -> linear_2. With act = "linear" (the identity) and linear_2 an
  identity matrix with a zero bias, it computes exactly our single Linear(vision width, H): every output element
  of linear_2 is one product x * 1.0 plus products with 0.0, and x*1 and x + 0 are exact in floating point.
- vision_feature_layer -1 with the "default" strategy is CLIP's last_hidden_state without CLS, as ours.
- LLaVA swaps every image-token id for image features in order; with our image token ('@') and one token
  per patch that is our splice, as long as no other '@' token stands in a prompt that has images.
- MoE (LLaVA only): Qwen2-MoE's block is softmax top-k routing with renormalised weights (our router) plus a
  shared expert scaled by sigmoid(shared_expert_gate(x)). A zero gate gives sigmoid(0) = 0.5 exactly and a
  doubled shared down_proj undoes it exactly (scaling by a power of two never rounds), so the shared expert
  is added unscaled, as ours is. Its attention biases (qkv_bias) are off.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .model_minimind import YARN, MiniMindConfig
from .model_vlm import VLMConfig
from .processor import IMAGE_PLACEHOLDER, check_geometry, geometry_of, processor_chat_template
from .weights import folder_weight_file

PROJ_PREFIX = "vision_proj.vision_proj.0."
LLAVA_PROJ = "model.multi_modal_projector."
LLAVA_LM = "model.language_model."
LLAVA_VISION = "model.vision_tower."


class StockExportError(RuntimeError):
    """A model or folder that cannot be expressed as (or read back from) a stock Llama/LLaVA folder."""


def check_dense(config: MiniMindConfig, direction: str) -> None:
    if config.use_moe:
        raise StockExportError(
            f"{direction} writes a stock Llama, which has no MoE layer: export MoE models with to_llava (its text "
            f"model is a stock Qwen2-MoE) or to_hf")


def check_moe(config: MiniMindConfig) -> None:
    if config.use_moe and (config.n_shared_experts != 1 or config.scoring_func != "softmax"
                           or not config.norm_topk_prob):
        raise StockExportError(
            f"only MoE models with one shared expert, softmax scoring and renormalised top-k weights have a stock "
            f"equivalent (Qwen2-MoE); this one has {config.n_shared_experts} shared expert(s), scoring "
            f"{config.scoring_func!r}, norm_topk_prob {config.norm_topk_prob}: export it with to_hf")


def llama_config(config: MiniMindConfig, dtype: torch.dtype = torch.float16) -> Any:
    """The LlamaConfig that computes what `config` computes (YaRN carried over when enabled)."""
    from transformers import LlamaConfig
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    if config.inference_rope_scaling:
        rope = {"rope_type": "yarn", "rope_theta": float(config.rope_theta), "factor": float(YARN["factor"]),
                "original_max_position_embeddings": YARN["original_max_position_embeddings"],
                "beta_fast": float(YARN["beta_fast"]), "beta_slow": float(YARN["beta_slow"]),
                "attention_factor": float(YARN["attention_factor"])}
    cfg = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope, attention_bias=False, mlp_bias=False, tie_word_embeddings=True,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=0,
    )
    cfg.dtype = dtype
    return cfg


def qwen2_moe_config(config: MiniMindConfig, dtype: torch.dtype = torch.float32) -> Any:
    """The Qwen2MoeConfig that computes what the MoE `config` computes (see the module docstring)."""
    from transformers import Qwen2MoeConfig
    check_moe(config)
    base = llama_config(config, dtype)
    cfg = Qwen2MoeConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=base.rope_parameters, tie_word_embeddings=True, use_sliding_window=False,
        decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=config.intermediate_size,
        shared_expert_intermediate_size=config.intermediate_size, num_experts=config.n_routed_experts,
        num_experts_per_tok=config.num_experts_per_tok, norm_topk_prob=True, qkv_bias=False,
        router_aux_loss_coef=config.aux_loss_alpha,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=0,
    )
    cfg.dtype = dtype
    return cfg


def moe_to_qwen2(state: dict[str, torch.Tensor], n_layers: int, n_experts: int) -> dict[str, torch.Tensor]:
    """Our MoE layer tensors in Qwen2-MoE's in-memory layout (fused per-expert gate_up / down, shared expert
    with doubled down_proj and a zero gate); every other key unchanged."""
    out = dict(state)
    for i in range(n_layers):
        p = f"model.layers.{i}.mlp."
        ex = [{n: out.pop(f"{p}experts.{e}.{n}_proj.weight") for n in ("gate", "up", "down")} for e in range(n_experts)]
        out[p + "experts.gate_up_proj"] = torch.stack([torch.cat([x["gate"], x["up"]]) for x in ex])
        out[p + "experts.down_proj"] = torch.stack([x["down"] for x in ex])
        for n in ("gate", "up"):
            out[f"{p}shared_expert.{n}_proj.weight"] = out.pop(f"{p}shared_experts.0.{n}_proj.weight")
        down = out.pop(f"{p}shared_experts.0.down_proj.weight")
        out[p + "shared_expert.down_proj.weight"] = down * 2  # times sigmoid(0) = 0.5 below: exact
        out[p + "shared_expert_gate.weight"] = down.new_zeros(1, down.shape[0])
    return out


def moe_from_qwen2(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Inverse of moe_to_qwen2, refusing a shared-expert gate that is not zero (then it is not a MiniMind model)."""
    out = dict(state)
    for i in range(n_layers):
        p = f"model.layers.{i}.mlp."
        if out.pop(p + "shared_expert_gate.weight").any():
            raise StockExportError(f"layer {i}: the shared-expert gate is not zero, so this is not a MiniMind export")
        gate_up, down = out.pop(p + "experts.gate_up_proj"), out.pop(p + "experts.down_proj")
        for e in range(gate_up.shape[0]):
            gate, up = gate_up[e].chunk(2)
            out.update({f"{p}experts.{e}.gate_proj.weight": gate, f"{p}experts.{e}.up_proj.weight": up,
                        f"{p}experts.{e}.down_proj.weight": down[e]})
        for n in ("gate", "up"):
            out[f"{p}shared_experts.0.{n}_proj.weight"] = out.pop(f"{p}shared_expert.{n}_proj.weight")
        out[p + "shared_experts.0.down_proj.weight"] = out.pop(p + "shared_expert.down_proj.weight") / 2
    return out


def minimind_config_from_llama(cfg: dict, **extra: Any) -> VLMConfig:
    """Our config from a Llama (or Qwen2-MoE) config.json dict, refusing what MiniMind cannot compute."""
    try:
        return _minimind_config(cfg, dict(extra))
    except KeyError as e:
        raise StockExportError(f"config.json lacks {e}: not a complete Llama / Qwen2-MoE config") from None


def _minimind_config(cfg: dict, extra: dict) -> VLMConfig:
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg['hidden_act']!r} (MiniMind uses silu)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("qkv_bias"):
        problems.append("attention or MLP biases")
    if not cfg.get("tie_word_embeddings", False):
        problems.append("untied lm_head (MiniMind ties it to the embeddings)")
    heads = cfg["num_attention_heads"]
    if not isinstance(heads, int) or heads <= 0:
        raise StockExportError(f"num_attention_heads {heads!r} in config.json is not a positive integer")
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // heads):
        problems.append(f"head_dim {cfg['head_dim']} != hidden_size / heads")
    rope = cfg.get("rope_parameters") or {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 1e6)}
    yarn = rope.get("rope_type", "default") == "yarn"
    if yarn and any(float(rope.get(k, -1)) != float(v) for k, v in YARN.items()):
        problems.append(f"YaRN settings {rope} (MiniMind's are {YARN})")
    elif rope.get("rope_type", "default") not in ("default", "yarn"):
        problems.append(f"rope_type {rope.get('rope_type')!r}")
    moe = cfg.get("model_type") == "qwen2_moe"
    if moe:
        if cfg.get("moe_intermediate_size") != cfg.get("shared_expert_intermediate_size") or cfg.get(
                "mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1 or not cfg.get("norm_topk_prob"):
            problems.append("a Qwen2-MoE layout MiniMind does not have (expert sizes, dense layers or routing)")
        extra.update(use_moe=True, n_routed_experts=cfg["num_experts"], num_experts_per_tok=cfg["num_experts_per_tok"],
                     n_shared_experts=1, aux_loss_alpha=cfg.get("router_aux_loss_coef", 0.01))
    if problems:
        raise StockExportError(f"this {cfg.get('model_type', 'Llama')} model is not a MiniMind export: "
                               + "; ".join(problems))
    return VLMConfig(hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"],
                     num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads", heads),
                     intermediate_size=cfg["moe_intermediate_size" if moe else "intermediate_size"],
                     vocab_size=cfg["vocab_size"], rms_norm_eps=cfg["rms_norm_eps"], rope_theta=rope["rope_theta"],
                     max_position_embeddings=cfg["max_position_embeddings"], inference_rope_scaling=yarn, **extra)


def lm_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our LM keys are already Llama's (model.layers.{i}.self_attn.q_proj.weight, ...): keep them, drop the rest."""
    return {k: v for k, v in state.items() if k.startswith("model.") or k == "lm_head.weight"}


def build_llama(config: MiniMindConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float16) -> Any:
    """A LlamaForCausalLM holding our LM weights (strictly: every Llama parameter comes from `state`)."""
    from transformers import LlamaForCausalLM
    check_dense(config, "to_llama")
    model = LlamaForCausalLM(llama_config(config, dtype)).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in lm_state(state).items()}, strict=True)
    model.tie_weights()
    return model.eval()


def llava_config(config: VLMConfig, vision_config: Any, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import LlavaConfig
    cfg = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=(qwen2_moe_config(config, dtype) if config.use_moe else llama_config(config, dtype)).to_dict(),
        image_token_index=config.image_ids[0], image_seq_length=len(config.image_ids),
        projector_hidden_act="linear", vision_feature_layer=-1, vision_feature_select_strategy="default",
        multimodal_projector_bias=True, tie_word_embeddings=True,
    )
    cfg.dtype = dtype
    return cfg


def check_vision_tower(config: VLMConfig, vision_config: Any) -> None:
    try:
        check_geometry(config, geometry_of(vision_config), "--vision_model_path")
    except ValueError as e:
        raise StockExportError(str(e)) from None


def build_llava(config: VLMConfig, state: dict[str, torch.Tensor], vision_encoder: Any,
                dtype: torch.dtype = torch.float32) -> Any:
    """A LlavaForConditionalGeneration holding our LM, our projection and the CLIP tower, loaded strictly."""
    from transformers import LlavaForConditionalGeneration
    check_moe(config)
    check_vision_tower(config, vision_encoder.config)
    if not any(k.startswith(PROJ_PREFIX) for k in state):
        raise StockExportError("the weight file has no vision_proj: it is an LM-only file (export it with to_llama)")
    model = LlavaForConditionalGeneration(llava_config(config, vision_encoder.config, dtype)).to(dtype)
    H = config.hidden_size
    if config.use_moe:
        state = moe_to_qwen2(state, config.num_hidden_layers, config.n_routed_experts)
    full = {LLAVA_LM + k.removeprefix("model."): v for k, v in lm_state(state).items() if k != "lm_head.weight"}
    full["lm_head.weight"] = state["lm_head.weight"]
    full[LLAVA_PROJ + "linear_1.weight"] = state[PROJ_PREFIX + "weight"]
    full[LLAVA_PROJ + "linear_1.bias"] = state[PROJ_PREFIX + "bias"]
    full[LLAVA_PROJ + "linear_2.weight"] = torch.eye(H)
    full[LLAVA_PROJ + "linear_2.bias"] = torch.zeros(H)
    full.update({LLAVA_VISION + k: v for k, v in vision_encoder.state_dict().items()})
    model.load_state_dict({k: v.to(dtype) for k, v in full.items()}, strict=True)
    model.tie_weights()
    return model.eval()


def state_from_llava(model: Any) -> dict[str, torch.Tensor]:
    """Our state dict (LM + vision_proj, no vision tower) from a loaded LlavaForConditionalGeneration, after
    checking that its projector is one linear map and its image features are ours."""
    cfg = model.config
    problems = []
    if cfg.projector_hidden_act != "linear":
        problems.append(f"projector_hidden_act {cfg.projector_hidden_act!r} (needs 'linear')")
    if cfg.vision_feature_layer != -1 or cfg.vision_feature_select_strategy != "default":
        problems.append(f"vision_feature_layer {cfg.vision_feature_layer} / strategy "
                        f"{cfg.vision_feature_select_strategy!r} (needs -1 / 'default')")
    own = model.state_dict()
    w2, b2 = own[LLAVA_PROJ + "linear_2.weight"], own.get(LLAVA_PROJ + "linear_2.bias")
    if b2 is None or LLAVA_PROJ + "linear_1.bias" not in own:
        problems.append("the projector has no biases")
    elif not (torch.equal(w2.float(), torch.eye(w2.shape[0])) and not b2.any()):
        problems.append("the projector's second layer is not the identity")
    if problems:
        raise StockExportError("this LLaVA model is not a MiniMind-V export: " + "; ".join(problems))
    state = {"model." + k.removeprefix(LLAVA_LM): v for k, v in own.items() if k.startswith(LLAVA_LM)}
    state["lm_head.weight"] = own["lm_head.weight"]
    state[PROJ_PREFIX + "weight"] = own[LLAVA_PROJ + "linear_1.weight"]
    state[PROJ_PREFIX + "bias"] = own[LLAVA_PROJ + "linear_1.bias"]
    if cfg.text_config.model_type == "qwen2_moe":
        state = moe_from_qwen2(state, cfg.text_config.num_hidden_layers)
    return state


def clip_image_processor(config: VLMConfig) -> Any:
    """The model's preprocessing with transformers' CLIP processor: RGB, shortest side to the input size
    (bicubic), centre crop, the config's mean/std (the PIL backend: no torchvision needed)."""
    from transformers import CLIPImageProcessorPil
    size = config.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 image_mean=config.image_mean, image_std=config.image_std, do_convert_rgb=True)


def build_processor(tokenizer: Any, config: VLMConfig) -> Any:
    """A LlavaProcessor: each '@' in text (what `<image>` becomes in the chat template) grows to the
    placeholder tokens of one image (its patches + CLS, minus CLS under the "default" strategy)."""
    from transformers import LlavaProcessor
    n = len(config.image_ids)
    if tokenizer.encode(IMAGE_PLACEHOLDER * n, add_special_tokens=False) != config.image_ids:
        raise StockExportError(f"this tokenizer does not turn {n} {IMAGE_PLACEHOLDER!r} into {n} tokens of id "
                               f"{config.image_token_id} (the image slot)")
    return LlavaProcessor(image_processor=clip_image_processor(config), tokenizer=tokenizer,
                          patch_size=config.patch_size, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token=IMAGE_PLACEHOLDER,
                          chat_template=processor_chat_template(tokenizer.chat_template, IMAGE_PLACEHOLDER))


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StockExportError(f"cannot read {path}: {e}") from None


def load_stock(folder: Path, cls_name: str) -> Any:
    """A stock transformers model from `folder`, strictly: a missing, unexpected or misshapen tensor is an
    error (from_pretrained alone would initialise missing ones at random and only warn). Stock classes
    never run code from the folder."""
    import transformers
    cls = getattr(transformers, cls_name)
    try:
        model, info = cls.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise StockExportError(f"cannot load {folder} as a {cls_name}: {str(e).splitlines()[0]}") from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise StockExportError(f"{folder} does not hold a complete {cls_name}: " + "; ".join(
            f"{k.replace('_', ' ')}: {', '.join(map(str, sorted(v)[:5]))}" for k, v in bad.items()))
    return model


def stock_state(folder: Path, cfg: dict) -> tuple[VLMConfig, dict[str, torch.Tensor]]:
    """(our config, our state dict) from a to_llava or to_llama folder (`cfg`: its config.json), loaded with the
    stock classes. A Llama folder holds the LM alone: its state has no vision_proj (an LM-only state)."""
    folder_weight_file(folder)  # a clear message when the weights are missing altogether
    if cfg["model_type"] == "llava":
        text_cfg = cfg.get("text_config") or {}
        if text_cfg.get("model_type", "llama") not in ("llama", "qwen2_moe"):
            raise StockExportError(f"{folder}: the LLaVA text model is a {text_cfg.get('model_type')}, not a "
                                   f"Llama or Qwen2-MoE: not a MiniMind-V export")
        llava = load_stock(folder, "LlavaForConditionalGeneration")
        config = minimind_config_from_llama(text_cfg, image_token_id=llava.config.image_token_index,
                                            **geometry_of(llava.config.vision_config))
        return config, state_from_llava(llava)
    if cfg["model_type"] != "llama":
        raise StockExportError(f"{folder}: a {cfg['model_type']!r} model, not a LLaVA or Llama export")
    return minimind_config_from_llama(cfg), load_stock(folder, "LlamaForCausalLM").state_dict()
