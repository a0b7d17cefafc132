"""MiniMind-V: MiniMind plus a frozen vision tower (CLIP ViT-B/16 as published) and one linear projection.

    image [B, N, 3, S, S]                                  S = config.image_size
      -> vision transformer (frozen, no grad), its last P hidden states    [B*N, P, W]
         (P = config patches, (S / patch_size)^2; W = config.vision_hidden_size; a leading CLS is dropped)
      -> VisionProj: Linear(W, H)                                          [B, N, P, H]
      -> splice: the k-th run of P placeholder ids (config.image_token_id, '@') in a sample
         is replaced, position by position, by that sample's k-th image   [B, T, H]
      -> MiniMind decoder -> lm_head                                     [B, T, vocab]

The image/text contract (marker, placeholder, geometry defaults, preprocessing) lives in processor.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionModel

from .model_minimind import MiniMindConfig, MiniMindForCausalLM
from .processor import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_IMAGE_TOKEN_ID,
    DEFAULT_PATCH_SIZE,
    DEFAULT_VISION_WIDTH,
    IMAGE_PLACEHOLDER,
    check_geometry,
    image_slots,
    missing_tower_message,
    num_patches,
    vision_geometry,
)

VISION_TOWER = CLIPVisionModel  # the class that loads a vision tower folder (a full CLIPModel folder too)


class VLMConfig(MiniMindConfig):
    """MiniMindConfig plus the image geometry: image_size, patch_size and vision_hidden_size of the vision
    tower, its normalisation (image_mean / image_std), and the image token id. `image_ids` (the slot: one
    id per patch) and `image_special_token` (the slot's text) are derived from them; when given (the
    published config.json has them) they must agree."""

    model_type = "minimind-v"

    def __init__(self, image_size: int = DEFAULT_IMAGE_SIZE, patch_size: int = DEFAULT_PATCH_SIZE,
                 vision_hidden_size: int = DEFAULT_VISION_WIDTH, image_token_id: int | None = None,
                 image_mean: list[float] | None = None, image_std: list[float] | None = None,
                 image_special_token: str | None = None, image_ids: list[int] | None = None, **kwargs: Any):
        if image_size % patch_size:
            raise ValueError(f"VLMConfig: image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size, self.vision_hidden_size = image_size, patch_size, vision_hidden_size
        self.image_mean = list(image_mean if image_mean is not None else CLIP_MEAN)
        self.image_std = list(image_std if image_std is not None else CLIP_STD)
        if image_token_id is None:
            image_token_id = image_ids[0] if image_ids else DEFAULT_IMAGE_TOKEN_ID
        self.image_token_id = image_token_id
        n = num_patches(image_size, patch_size)
        self.image_ids = [image_token_id] * n
        self.image_special_token = IMAGE_PLACEHOLDER * n
        if image_ids is not None and list(image_ids) != self.image_ids:
            raise ValueError(f"VLMConfig: image_ids ({len(image_ids)} x id {image_ids[0] if image_ids else None}) "
                             f"disagree with {n} patches of id {image_token_id} (image_size / patch_size)")
        if image_special_token is not None and image_special_token != self.image_special_token:
            raise ValueError(f"VLMConfig: image_special_token is not {n} x {IMAGE_PLACEHOLDER!r}")
        super().__init__(**kwargs)


class VisionProj(nn.Module):
    def __init__(self, vision_dim: int = DEFAULT_VISION_WIDTH, hidden_size: int = 512):
        super().__init__()
        self.vision_proj = nn.Sequential(nn.Linear(vision_dim, hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.vision_proj(features)


def load_vision_encoder(path: str | Path) -> CLIPVisionModel:
    """Load only the vision tower (from a full CLIPModel folder or a vision-only one), frozen."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(missing_tower_message(path))
    encoder = VISION_TOWER.from_pretrained(str(path))
    encoder.requires_grad_(False)
    return encoder.eval()


class MiniMindVLM(MiniMindForCausalLM):
    config_class = VLMConfig

    def __init__(self, config: VLMConfig | None = None, vision_model_path: str | Path | None = None):
        config = config or VLMConfig()
        super().__init__(config)
        self.vision_encoder = None
        if vision_model_path:
            self.attach_vision_encoder(vision_model_path)
        self.vision_proj = VisionProj(config.vision_hidden_size, config.hidden_size)

    @classmethod
    def from_pretrained(cls, *args: Any, vision_model_path: str | Path | None = None, **kwargs: Any) -> MiniMindVLM:
        """transformers' from_pretrained, then the frozen vision tower from `vision_model_path` (a MiniMind-V
        folder never holds it; handing the path to __init__ would load it on transformers' meta device)."""
        model = super().from_pretrained(*args, **kwargs)
        if vision_model_path is not None:
            model.attach_vision_encoder(vision_model_path)
        return model

    def attach_vision_encoder(self, path: str | Path) -> None:
        """Load the frozen tower at `path` after checking that its geometry (image size, patch size, width,
        normalisation) is this model's; a one-line ValueError names what differs."""
        check_geometry(self.config, vision_geometry(path), path)
        encoder = load_vision_encoder(path)
        self.vision_encoder = encoder.to(self.device) if self.device.type != "meta" else encoder

    def train(self, mode: bool = True) -> MiniMindVLM:
        super().train(mode)
        if self.vision_encoder is not None:
            self.vision_encoder.eval()  # frozen: dropout/etc. stay off even while training
        return self

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, num_images: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, 3, S, S] (or [B, 3, S, S]) -> frozen patch features [B, N, P, W], all images in one call.
        With `num_images` [B], only each sample's first num_images[b] images are encoded (zero padding is
        neither moved nor encoded) and the rest of the output is zeros."""
        if self.vision_encoder is None:
            raise ValueError("images were given but this MiniMindVLM has no vision encoder: "
                             "construct it with vision_model_path=... (its vision tower folder)")
        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(1)
        B, N = pixel_values.shape[:2]
        enc = self.vision_encoder
        P = len(self.config.image_ids)
        if num_images is None:
            out = enc(pixel_values=pixel_values.flatten(0, 1).to(enc.device, enc.dtype))
            return out.last_hidden_state[:, -P:].reshape(B, N, P, -1)
        real = torch.arange(N, device=num_images.device)[None, :] < num_images[:, None]  # [B, N]
        real = real.to(pixel_values.device)
        feats = enc(pixel_values=pixel_values[real].to(enc.device, enc.dtype, non_blocking=True)).last_hidden_state[:, -P:]
        if bool(real.all()):
            return feats.view(B, N, P, -1)
        out = feats.new_zeros(B, N, P, feats.shape[-1])
        out[real.to(out.device)] = feats
        return out

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None, num_images: torch.Tensor | None = None,
              **kwargs: Any) -> torch.Tensor:
        """Token embeddings with every image slot replaced by its image's projected patches.

        `image_features` ([B, N, P, W], e.g. from a feature cache) may stand in for `pixel_values`; both
        absent means a text-only batch. `num_images` [B]: sample b's images are its first num_images[b]
        (the rest is batch padding); without it every given image counts. Each sample must have exactly
        as many slots as images: a ValueError names the first sample that does not.
        """
        h = self.model.embed_tokens(input_ids)
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values, num_images)
        if input_ids.shape[1] == 1 and image_features is None:
            return h  # a decode step: one new text token
        in_slot, image_idx, patch_idx = image_slots(input_ids, self.config.image_token_id, len(self.config.image_ids))
        n_slots = (in_slot & (patch_idx == 0)).sum(dim=1)  # count_slots, from the same pass
        given = self._images_given(image_features, num_images, input_ids)
        if bool((n_slots != given).any()):
            bad = int((n_slots != given).nonzero()[0, 0])
            raise ValueError(f"sample {bad} has {int(n_slots[bad])} image slot(s) but {int(given[bad])} image(s) "
                             f"were given")
        if image_features is None:
            if self.training:  # DDP needs every trainable parameter in the graph, images or not
                h = h + 0.0 * self.vision_proj(h.new_zeros(1, self.config.vision_hidden_size)).sum()
            return h
        proj = self.vision_proj(image_features.to(h.dtype))  # [B, N, P, H]
        b, t = in_slot.nonzero(as_tuple=True)
        return h.index_put((b, t), proj[b, image_idx[b, t], patch_idx[b, t]].to(h.dtype))

    @staticmethod
    def _images_given(image_features: torch.Tensor | None, num_images: torch.Tensor | None,
                      input_ids: torch.Tensor) -> torch.Tensor:
        """Images each sample brings: LongTensor [B] on input_ids' device."""
        B, dev = input_ids.shape[0], input_ids.device
        if image_features is None:
            return torch.zeros(B, dtype=torch.long, device=dev)
        N = image_features.shape[1]
        if num_images is None:
            return torch.full((B,), N, dtype=torch.long, device=dev)
        num_images = num_images.to(dev)
        if num_images.shape != (B,) or bool((num_images > N).any()) or bool((num_images < 0).any()):
            raise ValueError(f"num_images must be [{B}] counts between 0 and {N} (the images given per sample)")
        return num_images

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, num_images: torch.Tensor | None = None, **kwargs: Any):
        """MiniMindForCausalLM.forward plus images: `pixel_values` [B, N, 3, S, S] ([B, 3, S, S] means
        N = 1) or precomputed `image_features` [B, N, P, W], and optionally `num_images` [B] when the
        image axis is zero-padded. Output has `.logits`, `.loss` (cross-entropy + MoE aux loss) and `.aux_loss`."""
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                               pixel_values=pixel_values, image_features=image_features, num_images=num_images,
                               **kwargs)
