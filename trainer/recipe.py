"""The pure pieces of the published training recipe: learning-rate schedule, which parameters
train, and where a (possibly resized) resumed run picks up. No I/O, no distributed state."""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

# --freeze_llm: what trains besides nothing of the (always frozen) vision encoder.
FREEZE_CHOICES = {
    0: "everything but the vision encoder (SFT default)",
    1: "vision_proj + the last LM layer (pretrain default, the published recipe)",
    2: "vision_proj only",
}


def get_lr(step: int, total_steps: int, lr: float) -> float:
    """Cosine from lr down to lr/10 over total_steps, no warm-up: lr * (0.1 + 0.45 * (1 + cos(pi t / T)))."""
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(total_steps, 1))))


def set_trainable(model: nn.Module, freeze_llm: int) -> list[str]:
    """Apply a --freeze_llm strategy to a MiniMindVLM in place; returns the trainable parameter names.

    The vision encoder never trains. `lm_head.weight` is tied to `model.embed_tokens.weight`, so it
    trains exactly when the embeddings do (strategy 0).
    """
    if freeze_llm not in FREEZE_CHOICES:
        raise ValueError(f"--freeze_llm must be one of {sorted(FREEZE_CHOICES)}, got {freeze_llm}")
    model.requires_grad_(freeze_llm == 0)
    if freeze_llm >= 1:
        model.vision_proj.requires_grad_(True)
    if freeze_llm == 1:
        model.model.layers[-1].requires_grad_(True)
    if getattr(model, "vision_encoder", None) is not None:
        model.vision_encoder.requires_grad_(False)
    return [n for n, p in model.named_parameters() if p.requires_grad]


@dataclass(frozen=True)
class Position:
    """Where training stands: `epoch`, `samples` consumed in that epoch (over all ranks), and
    `step`, the global optimizer step (the schedule's t)."""
    epoch: int
    samples: int
    step: int


def steps_per_epoch(batches_per_rank: int, accumulation_steps: int) -> int:
    """Optimizer steps in one epoch: one per full accumulation group, plus one for a final partial group."""
    return math.ceil(batches_per_rank / accumulation_steps)


def resume_position(epoch: int, samples: int, epoch_samples: int, batch_size: int, world_size: int,
                    accumulation_steps: int, batches_per_rank: int) -> Position:
    """Translate a saved (epoch, samples consumed in it) into the position of a run with this
    batch size and world size. Sample counts are world-size free, so a run resized between save
    and resume continues at the right sample; the global step is recomputed for the new geometry
    (identical to the saved one when nothing changed)."""
    if samples >= epoch_samples:  # the epoch was finished
        epoch, samples = epoch + 1, 0
    per_step = batch_size * world_size * accumulation_steps
    step = epoch * steps_per_epoch(batches_per_rank, accumulation_steps) + math.ceil(samples / per_step)
    return Position(epoch, samples, step)
