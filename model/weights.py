"""Reading and writing MiniMind(-V) weight files, strictly.

The original loaded with `strict=False`, so a file with other key names silently loaded nothing
and users trained from random weights without noticing. Here the only keys allowed to be absent
are the frozen vision tower's (never saved) and, when an LM-only file such as `llm_512.pth` is
loaded into the VLM, the projection's; anything else missing or unexpected is an error.
"""
from __future__ import annotations

import logging
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .files import atomic_save

log = logging.getLogger("minimind")

VISION_PREFIX = "vision_encoder."
PROJ_PREFIX = "vision_proj."


class WeightError(RuntimeError):
    """A weight file that cannot be used; the message is one line (or a short list) naming the file."""


class WeightFileError(WeightError):
    """The file itself is not a readable plain weight file (empty, corrupt, pickled objects, a folder, ...)."""


class WeightMismatchError(WeightError):
    """A readable weight file that does not fit the model asked for."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict from a `.pth` (loaded with weights_only=True: no code in the file can run) or
    `.safetensors` file. Anything else is a one-line WeightFileError (FileNotFoundError when absent)."""
    path = Path(path)
    if path.is_dir():
        raise WeightFileError(f"{path} is a folder, not a weight file (a transformers model folder goes to "
                              f"--load_from)")
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightFileError(f"{path} is empty (0 bytes): the download or save did not finish; fetch or save "
                              f"it again")
    try:
        state = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pth(path)
    except OSError as e:
        raise WeightFileError(f"cannot read {path}: {e.strerror or e}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a resume file: take its model part
    if not isinstance(state, dict):
        raise WeightFileError(f"{path} holds a {type(state).__name__}, not a state dict (parameter names -> "
                              f"tensors): not a MiniMind(-V) weight file")
    odd = next(((k, v) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise WeightFileError(f"{path} holds a dict that is not a state dict (entry {odd[0]!r} is a "
                              f"{type(odd[1]).__name__}, not a tensor): not a MiniMind(-V) weight file")
    # DDP / torch.compile prefixes are not part of the model's names.
    return {k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in state.items()}


def folder_weight_file(folder: Path) -> Path:
    """The single weight file of a transformers model folder."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise WeightFileError(f"{folder}: no model.safetensors or pytorch_model.bin (sharded folders are not supported)")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise WeightFileError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}): fetch or "
                              f"write it again") from None


def _read_pth(path: Path) -> object:
    """torch.load with weights_only=True, its failures turned into our own one-line causes (torch's own
    messages suggest weights_only=False, which would run whatever code the file carries)."""
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4 detected": the outcome says all that matters
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise WeightFileError(f"{path} is not a plain weight file (it holds Python objects other than "
                                  f"tensors); refusing to load it") from None
        raise WeightFileError(f"{path} is not a PyTorch weight file (unreadable pickle data)") from None
    except EOFError:
        raise WeightFileError(f"{path} is truncated (it ends in the middle): fetch or save it again") from None
    except RuntimeError as e:
        if "unexpected EOF" in str(e):
            raise WeightFileError(f"{path} is truncated (it ends in the middle): fetch or save it again") from None
        if "zip archive" in str(e) or "central directory" in str(e):
            raise WeightFileError(f"{path} is truncated or corrupt (not a complete zip archive): fetch or save it "
                                  f"again") from None
        raise WeightFileError(f"{path} is not a PyTorch weight file (torch cannot read its format)") from None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError, OverflowError,
            MemoryError) as e:  # what a garbage file makes the unpickler raise
        raise WeightFileError(f"{path} is not a PyTorch weight file (unreadable contents: "
                              f"{type(e).__name__})") from None


# ------------------------------------------------------------------------------- shapes from weights

LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")
SHAPE_FLAGS = ("hidden_size", "num_hidden_layers", "use_moe")  # the flags that pick a model's size


def infer_shape(state: dict[str, torch.Tensor], source: str | Path = "the state dict") -> dict[str, int | bool]:
    """The config sizes a MiniMind(-V) state dict implies, from its tensor names and shapes alone:
    hidden_size, num_hidden_layers, vocab_size, intermediate_size, num_key_value_heads, use_moe and, for
    MoE, n_routed_experts and n_shared_experts. The result feeds MiniMindConfig / VLMConfig directly.

    Not derivable, so left to the config defaults: num_attention_heads (q_proj is hidden x hidden whatever
    the head count), hence num_key_value_heads assumes the default head count (it is k_proj's width over
    the default head size), and num_experts_per_tok (routing, not a weight). Raises WeightMismatchError when
    the names are not MiniMind's (`source` names the file in that message)."""
    from .model_minimind import MiniMindConfig
    embed = state.get("model.embed_tokens.weight", state.get("lm_head.weight"))
    layers = sorted({int(m.group(1)) for k in state if (m := LAYER_KEY.match(k))})
    if embed is None or embed.dim() != 2 or not layers:
        raise WeightMismatchError(f"{source} has no model.embed_tokens.weight and model.layers.N tensors: not a "
                                  f"MiniMind(-V) weight file")
    if layers != list(range(len(layers))):
        raise WeightMismatchError(f"{source}: layer numbers {layers[:8]} are not 0..{len(layers) - 1}: an "
                                  f"incomplete file")
    vocab, hidden = embed.shape
    shape: dict[str, int | bool] = {"hidden_size": hidden, "num_hidden_layers": len(layers), "vocab_size": vocab}
    heads = MiniMindConfig().num_attention_heads  # not stored in the weights: the default (8)
    k_proj = state.get("model.layers.0.self_attn.k_proj.weight")
    if k_proj is not None and hidden % heads == 0 and k_proj.shape[0] % (hidden // heads) == 0:
        shape["num_key_value_heads"] = k_proj.shape[0] // (hidden // heads)
    mlp = "model.layers.0.mlp."
    gate = state.get(mlp + "gate.weight")
    shape["use_moe"] = gate is not None
    if gate is not None:
        shape["n_routed_experts"] = gate.shape[0]
        shape["n_shared_experts"] = len({k[len(mlp):].split(".")[1] for k in state
                                         if k.startswith(mlp + "shared_experts.")})
        up = state.get(mlp + "experts.0.gate_proj.weight")
    else:
        up = state.get(mlp + "gate_proj.weight")
    if up is not None:
        shape["intermediate_size"] = up.shape[0]
    return shape


def describe_shape(shape: dict[str, int | bool]) -> str:
    """`{"num_hidden_layers": 4, "hidden_size": 128, "use_moe": False}` -> "4-layer, hidden-128 dense model"."""
    kind = f"MoE ({shape.get('n_routed_experts', '?')} experts)" if shape.get("use_moe") else "dense"
    return f"{shape['num_hidden_layers']}-layer, hidden-{shape['hidden_size']} {kind} model"


def check_shape(shape: dict[str, int | bool], wanted: dict[str, int | bool | None], source: str | Path) -> None:
    """Raise a one-line WeightMismatchError when a size the user asked for (None: not asked) differs from
    what the weights hold. `wanted` maps flag names (hidden_size, num_hidden_layers, use_moe) to values."""
    bad = [f"--{k} {int(v)}" for k, v in wanted.items()
           if v is not None and shape.get(k) is not None and int(v) != int(shape[k])]
    if bad:
        verb = "disagrees" if len(bad) == 1 else "disagree"
        raise WeightMismatchError(f"{source} holds a {describe_shape(shape)}; {' and '.join(bad)} {verb}: drop "
                                  f"the flag{'s' if len(bad) > 1 else ''} or pick another file")


def _short(keys: list[str], limit: int = 20) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_weights(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load a weight file into `model`, failing loudly on any key or shape mismatch.

    Returns {"loaded": [...], "missing": [...]} where missing holds only the tolerated keys.
    """
    return load_state(model, read_state_dict(path), path)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> dict[str, list[str]]:
    """`load_weights` for a state dict already in memory; `path` names its source in messages."""
    state = dict(state)
    own = model.state_dict()
    # Tied head: files always carry lm_head.weight; some exporters drop one side of the tie.
    if "lm_head.weight" in own and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    if "model.embed_tokens.weight" in own and "model.embed_tokens.weight" not in state and "lm_head.weight" in state:
        state["model.embed_tokens.weight"] = state["lm_head.weight"]
    state = {k: v for k, v in state.items() if not k.startswith(VISION_PREFIX)}
    is_lm_only = not any(k.startswith(PROJ_PREFIX) for k in state)
    missing = [k for k in own if k not in state]
    tolerated = [k for k in missing if k.startswith(VISION_PREFIX) or (is_lm_only and k.startswith(PROJ_PREFIX))]
    bad_missing = [k for k in missing if k not in tolerated]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} (file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
                   for k in state if k in own and state[k].shape != own[k].shape]
    if bad_missing or unexpected or wrong_shape:
        parts = [f"{path} does not match the model:"]
        if bad_missing:
            parts.append(f"  missing {len(bad_missing)} key(s): {_short(bad_missing)}")
        if unexpected:
            parts.append(f"  unexpected {len(unexpected)} key(s): {_short(unexpected)}")
        if wrong_shape:
            parts.append(f"  wrong shape: {_short(wrong_shape)}")
        parts.append("  check --hidden_size / --num_hidden_layers / --use_moe, or that the file is a MiniMind(-V) weight file")
        raise WeightMismatchError("\n".join(parts))
    model.load_state_dict(state, strict=False)
    proj_note = " (LM-only file: vision_proj keeps its fresh initialisation)" if is_lm_only and any(
        k.startswith(PROJ_PREFIX) for k in tolerated) else ""
    log.info("loaded %d tensors from %s%s", len(state), path, proj_note)
    return {"loaded": sorted(state), "missing": tolerated}


def export_state_dict(model: nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The publishable state dict: unwrapped names, no vision tower, every float tensor in `dtype`."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).clone()
            for k, v in model.state_dict().items() if not k.startswith(VISION_PREFIX)}


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the fp16, vision-free weight file the original scripts (and ours) load."""
    atomic_save(export_state_dict(model), path)


def weight_path(save_dir: str | Path, name: str, hidden_size: int, use_moe: bool) -> Path:
    """`{save_dir}/{name}_{hidden}{_moe}.pth`, the published naming."""
    return Path(save_dir) / f"{name}_{hidden_size}{'_moe' if use_moe else ''}.pth"
