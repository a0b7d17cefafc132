"""Reading and writing MiniMind(-V) weight files, strictly.

The original loaded with `strict=False`, so a file with other key names silently loaded nothing
and users trained from random weights without noticing. Here the only keys allowed to be absent
are the frozen vision tower's (never saved) and, when an LM-only file such as `llm_512.pth` is
loaded into the VLM, the projection's; anything else missing or unexpected is an error.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .files import atomic_save

log = logging.getLogger("minimind")

VISION_PREFIX = "vision_encoder."
PROJ_PREFIX = "vision_proj."


class WeightMismatchError(RuntimeError):
    pass


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict from a `.pth` (loaded with weights_only=True) or `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a resume file: take its model part
    if not isinstance(state, dict):
        raise WeightMismatchError(f"{path} does not hold a state dict (got {type(state).__name__})")
    # DDP / torch.compile prefixes are not part of the model's names.
    return {k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in state.items()}


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
