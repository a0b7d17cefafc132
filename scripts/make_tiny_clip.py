"""Write randomly initialised CLIP vision towers, loadable offline with `from_pretrained`.

They stand in for the real `openai/clip-vit-base-patch16` (which `scripts/download.py` fetches)
where the hub is out of reach: tests and the offline quickstart use them.

    python scripts/make_tiny_clip.py            # tiny: the published geometry (224 px, 16 px patches, 768 wide), 1 layer
    python scripts/make_tiny_clip.py --full     # the real ViT-B/16 geometry (12 layers), random weights
    python scripts/make_tiny_clip.py --image_size 112 --width 384 --out model/vision_model/clip-112
                                                # another geometry: MiniMind-V trains and runs on it unchanged
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

from model import RANDOM_CLIP, TINY_CLIP, resolve
from model.argtypes import positive_int, seed_int
from model.processor import DEFAULT_IMAGE_SIZE, DEFAULT_PATCH_SIZE, DEFAULT_VISION_WIDTH

HEADS = 12


def clip_config(full: bool, image_size: int = DEFAULT_IMAGE_SIZE, patch_size: int = DEFAULT_PATCH_SIZE,
                width: int = DEFAULT_VISION_WIDTH) -> CLIPVisionConfig:
    """ViT-B/16 geometry by default; the tiny variant keeps the input, patch and output sizes so every
    shape downstream is the real one, with one narrow-MLP layer (the quickstart's CPU budget goes to the
    LM, not to a random encoder)."""
    geometry = dict(hidden_size=width, num_attention_heads=HEADS, image_size=image_size, patch_size=patch_size,
                    projection_dim=512)
    if full:
        return CLIPVisionConfig(intermediate_size=4 * width, num_hidden_layers=12, **geometry)
    return CLIPVisionConfig(intermediate_size=256, num_hidden_layers=1, **geometry)


# Bumped whenever the stand-in changes, so stale copies are rewritten rather than reused.
STANDIN_VERSION = "3"


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] fixed 2-D sine-cosine position codes (half the dims for the row, half for the
    column), in raster order like ViT's patches. Wavelengths run from 2 to 2*grid patches, so every
    dimension varies across the image (the usual 1..10000 range leaves most of them constant)."""
    quarter = dim // 4
    freq = torch.exp(torch.linspace(math.log(math.pi), math.log(math.pi / grid), quarter))
    rows, cols = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")
    parts = [f(c.reshape(-1, 1) * freq) for c in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)


def make_clip(out_dir: str | Path, full: bool = False, seed: int = 0, overwrite: bool = False,
              image_size: int = DEFAULT_IMAGE_SIZE, patch_size: int = DEFAULT_PATCH_SIZE,
              width: int = DEFAULT_VISION_WIDTH) -> Path:
    out_dir = Path(out_dir)
    if width % HEADS or width % 4 or image_size % patch_size:
        raise ValueError(f"--width must be a multiple of {HEADS} and 4, --image_size a multiple of --patch_size")
    marker = out_dir / "STANDIN_VERSION"
    stamp = STANDIN_VERSION if (image_size, patch_size, width) == (
        DEFAULT_IMAGE_SIZE, DEFAULT_PATCH_SIZE, DEFAULT_VISION_WIDTH) else f"{STANDIN_VERSION} {image_size}/{patch_size}/{width}"
    if (out_dir / "config.json").exists() and not overwrite and marker.exists() and marker.read_text() == stamp:
        return out_dir
    torch.manual_seed(seed)
    model = CLIPVisionModel(clip_config(full, image_size, patch_size, width)).eval()
    # A trained ViT's position embeddings carry a smooth 2-D layout as strong as the patch content;
    # random ones (std 0.02 against ~0.5 for the patch projection) carry almost none, which would make
    # "where is it" questions far harder for the stand-in than for the real CLIP.
    emb = model.embeddings
    grid = emb.image_size // emb.patch_size
    with torch.no_grad():
        emb.position_embedding.weight[1:] = sincos_2d(grid, emb.embed_dim) * 0.5
    model.save_pretrained(out_dir)
    marker.write_text(stamp)
    # The real checkpoint ships its preprocessing config; so does the stand-in.
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
    kind = "full ViT-B/16 layers" if full else "tiny"
    (out_dir / "README.md").write_text(
        "Randomly initialised CLIP vision tower (a stand-in for openai/clip-vit-base-patch16; patch position "
        "embeddings are fixed 2-D sine-cosine codes), "
        f"written by scripts/make_tiny_clip.py ({kind}, {image_size} px, {patch_size} px patches, {width} wide, "
        f"seed {seed}).\n")
    return out_dir


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="12 layers (ViT-B/16 depth) instead of the tiny one")
    ap.add_argument("--out", default=None, help="output folder (default model/vision_model/clip-tiny-random "
                    "or clip-vit-base-patch16-random)")
    ap.add_argument("--image_size", type=positive_int, default=DEFAULT_IMAGE_SIZE, help="input size in pixels")
    ap.add_argument("--patch_size", type=positive_int, default=DEFAULT_PATCH_SIZE, help="patch size in pixels")
    ap.add_argument("--width", type=positive_int, default=DEFAULT_VISION_WIDTH, help="hidden size (features per patch)")
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    out = resolve(args.out) if args.out else (RANDOM_CLIP if args.full else TINY_CLIP)
    try:
        path = make_clip(out, args.full, args.seed, args.overwrite, args.image_size, args.patch_size, args.width)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"CLIP stand-in at {path}")


if __name__ == "__main__":
    main()
