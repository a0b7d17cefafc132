"""Weight and resume files of a training run.

    {save_dir}/{save_weight}_{hidden}{_moe}.pth           fp16 state dict, no vision encoder (the published format)
    {save_dir}/{save_weight}_{hidden}{_moe}_resume.pth    everything needed to continue bitwise:
        model (fp32, no vision encoder), optimizer, scaler, epoch, samples consumed in the epoch,
        global step, world size, batch size, accumulation steps, seed, every rank's RNG states,
        running totals and the wandb run id.

Both are written with `model.files.atomic_save` (temporary file, fsync, rename), so a SIGKILL at any moment
leaves either the previous file or the new one, never a truncated one.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.files import atomic_save
from model.weights import VISION_PREFIX, weight_path

RESUME_VERSION = 1


class ResumeFileError(RuntimeError):
    """A resume file that cannot be used: one line naming it and the fix."""


def resume_path(save_dir: str | Path, name: str, hidden_size: int, use_moe: bool) -> Path:
    """`{save_dir}/{name}_{hidden}{_moe}_resume.pth`, next to the weight file."""
    w = weight_path(save_dir, name, hidden_size, use_moe)
    return w.with_name(w.stem + "_resume.pth")


def rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / python RNG states, in types `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, cached), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x: Any) -> Any:
    """random.setstate wants tuples all the way down; a save/load round trip may hand back lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full-precision model state the resume file keeps: everything but the frozen vision tower."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith(VISION_PREFIX)}


def save_resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                rng_states: list[dict[str, Any]], **fields: Any) -> None:
    """Write the resume file atomically. `fields` carries the position and run bookkeeping."""
    atomic_save({"version": RESUME_VERSION, "model": trainable_state(model), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "rng": rng_states, **fields}, path)


def load_resume(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file from elsewhere, or a disk that lost it; atomic saves never truncate
        raise ResumeFileError(f"cannot read resume file {path} ({e}); delete it to start over, "
                              f"or start without --from_resume") from e
    if not isinstance(state, dict) or state.get("version") != RESUME_VERSION:
        raise ResumeFileError(f"{path} is not a resume file of this trainer (version {RESUME_VERSION}); "
                              f"delete it or start without --from_resume")
    return state


def restore_model(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Strictly load the resume file's model part: only the vision tower's keys may be absent."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(VISION_PREFIX)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ResumeFileError(f"{path} does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]}): "
                              f"resume with the same --hidden_size/--num_hidden_layers/--use_moe, or delete it")
    model.load_state_dict(state, strict=False)
