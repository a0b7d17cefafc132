"""MiniMind-V: MiniMind plus a frozen CLIP ViT-B/16 vision tower and one linear projection.

    image [B, N, 3, 224, 224]
      -> CLIP vision transformer (frozen, no grad)   last_hidden_state[:, 1:]  [B*N, 196, 768]
      -> VisionProj: Linear(768, H)                                            [B, N, 196, H]
      -> splice: the k-th run of 196 placeholder ids (id 34, '@') in a sample
         is replaced, position by position, by that sample's k-th image        [B, T, H]
      -> MiniMind decoder -> lm_head                                          [B, T, 6400]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionModel

from .model_minimind import MiniMindConfig, MiniMindForCausalLM

PATCHES = 196  # (224 / 16)^2 patch tokens per image
VISION_DIM = 768


class VLMConfig(MiniMindConfig):
    model_type = "minimind-v"

    def __init__(self, image_special_token: str = "@" * PATCHES, image_ids: list[int] | None = None,
                 **kwargs: Any):
        self.image_special_token = image_special_token
        self.image_ids = list(image_ids) if image_ids is not None else [34] * PATCHES
        super().__init__(**kwargs)


class VisionProj(nn.Module):
    def __init__(self, vision_dim: int = VISION_DIM, hidden_size: int = 512):
        super().__init__()
        self.vision_proj = nn.Sequential(nn.Linear(vision_dim, hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.vision_proj(features)


def load_vision_encoder(path: str | Path) -> CLIPVisionModel:
    """Load only CLIP's vision tower (from a full CLIPModel folder or a vision-only one), frozen."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no CLIP model at {path}: run `python scripts/download.py clip` for the real "
            f"openai/clip-vit-base-patch16, or `python scripts/make_tiny_clip.py` for an offline stand-in")
    encoder = CLIPVisionModel.from_pretrained(str(path))
    encoder.requires_grad_(False)
    return encoder.eval()


def image_slots(input_ids: torch.Tensor, image_id: int, slot_len: int = PATCHES
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Locate image slots: complete runs of `slot_len` placeholder ids, taken greedily from the
    left inside each maximal run of placeholders (a stray '@' is ordinary text).

    Returns (in_slot [B, T] bool, image index within the sample [B, T], patch index [B, T]);
    the two index tensors are only meaningful where in_slot is True.
    """
    B, T = input_ids.shape
    is_ph = input_ids == image_id
    pos = torch.arange(T, device=input_ids.device).expand(B, T)
    prev = torch.nn.functional.pad(is_ph[:, :-1], (1, 0), value=False)
    nxt = torch.nn.functional.pad(is_ph[:, 1:], (0, 1), value=False)
    # Start / end of the run each token belongs to, via running max / min over run boundaries.
    run_start = torch.where(is_ph & ~prev, pos, torch.zeros_like(pos)).cummax(dim=1).values
    run_end = torch.where(is_ph & ~nxt, pos, torch.full_like(pos, T)).flip(1).cummin(dim=1).values.flip(1)
    offset = pos - run_start
    full = ((run_end - run_start + 1) // slot_len) * slot_len
    in_slot = is_ph & (offset < full)
    slot_begin = in_slot & (offset % slot_len == 0)
    image_idx = slot_begin.long().cumsum(dim=1) - 1
    return in_slot, image_idx, offset % slot_len


class MiniMindVLM(MiniMindForCausalLM):
    config_class = VLMConfig

    def __init__(self, config: VLMConfig | None = None, vision_model_path: str | Path | None = None):
        config = config or VLMConfig()
        super().__init__(config)
        self.vision_encoder = load_vision_encoder(vision_model_path) if vision_model_path else None
        self.vision_proj = VisionProj(VISION_DIM, config.hidden_size)

    @classmethod
    def from_pretrained(cls, *args: Any, vision_model_path: str | Path | None = None, **kwargs: Any) -> MiniMindVLM:
        """transformers' from_pretrained, then the frozen CLIP tower from `vision_model_path` (a MiniMind-V
        folder never holds it; handing the path to __init__ would load it on transformers' meta device)."""
        model = super().from_pretrained(*args, **kwargs)
        if vision_model_path is not None:
            model.vision_encoder = load_vision_encoder(vision_model_path).to(model.device)
        return model

    def train(self, mode: bool = True) -> MiniMindVLM:
        super().train(mode)
        if self.vision_encoder is not None:
            self.vision_encoder.eval()  # frozen: dropout/etc. stay off even while training
        return self

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, N, 3, 224, 224] (or [B, 3, 224, 224]) -> frozen CLIP patch features [B, N, 196, 768],
        every image of the batch in one call."""
        if self.vision_encoder is None:
            raise ValueError("images were given but this MiniMindVLM has no vision encoder: "
                             "construct it with vision_model_path=... (a CLIP ViT-B/16 folder)")
        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(1)
        B, N = pixel_values.shape[:2]
        dtype = self.vision_encoder.dtype
        out = self.vision_encoder(pixel_values=pixel_values.flatten(0, 1).to(dtype))
        return out.last_hidden_state[:, 1:, :].reshape(B, N, PATCHES, -1)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Token embeddings with every image slot replaced by its image's projected patches.

        `image_features` ([B, N, 196, 768], e.g. from a feature cache) may stand in for
        `pixel_values`; both absent means a text-only batch.
        """
        h = self.model.embed_tokens(input_ids)
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        if input_ids.shape[1] == 1 and image_features is None:
            return h  # a decode step: one new text token
        in_slot, image_idx, patch_idx = image_slots(input_ids, self.config.image_ids[0], len(self.config.image_ids))
        n_slots = (in_slot & (patch_idx == 0)).sum(dim=1)
        n_images = 0 if image_features is None else image_features.shape[1]
        if bool((n_slots > n_images).any()):
            bad = int((n_slots > n_images).nonzero()[0, 0])
            raise ValueError(f"sample {bad} has {int(n_slots[bad])} image slot(s) but only {n_images} "
                             f"image(s) were given")
        if image_features is None:
            if self.training:  # DDP needs every trainable parameter in the graph, images or not
                h = h + 0.0 * self.vision_proj(h.new_zeros(1, VISION_DIM)).sum()
            return h
        proj = self.vision_proj(image_features.to(h.dtype))  # [B, N, 196, H]
        b, t = in_slot.nonzero(as_tuple=True)
        return h.index_put((b, t), proj[b, image_idx[b, t], patch_idx[b, t]].to(h.dtype))

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, **kwargs: Any):
        """MiniMindForCausalLM.forward plus images: `pixel_values` [B, N, 3, 224, 224] ([B, 3, 224, 224]
        means N = 1) or precomputed CLIP `image_features` [B, N, 196, 768]. Output has `.logits`,
        `.loss` (cross-entropy + MoE aux loss) and `.aux_loss`."""
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                               pixel_values=pixel_values, image_features=image_features, **kwargs)
