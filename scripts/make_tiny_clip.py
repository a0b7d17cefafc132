"""Write randomly initialised CLIP vision towers, loadable offline with `from_pretrained`.

They stand in for the real `openai/clip-vit-base-patch16` (which `scripts/download.py` fetches)
where the hub is out of reach: tests and the offline quickstart use them.

    python scripts/make_tiny_clip.py            # tiny: 224 px, 16 px patches, 768-wide, 2 layers
    python scripts/make_tiny_clip.py --full     # the real ViT-B/16 geometry (12 layers), random weights
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

from model import RANDOM_CLIP, TINY_CLIP, resolve


def clip_config(full: bool) -> CLIPVisionConfig:
    """ViT-B/16 geometry; the tiny variant keeps the input, patch and output sizes (224, 16, 768)
    so every shape downstream is the real one, with few, narrow-MLP layers."""
    if full:
        return CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, image_size=224, patch_size=16, projection_dim=512)
    return CLIPVisionConfig(hidden_size=768, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=12, image_size=224, patch_size=16, projection_dim=512)


def make_clip(out_dir: str | Path, full: bool = False, seed: int = 0, overwrite: bool = False) -> Path:
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and not overwrite:
        return out_dir
    torch.manual_seed(seed)
    model = CLIPVisionModel(clip_config(full)).eval()
    model.save_pretrained(out_dir)
    # The real checkpoint ships its preprocessing config; so does the stand-in.
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(out_dir)
    (out_dir / "README.md").write_text(
        "Randomly initialised CLIP vision tower (a stand-in for openai/clip-vit-base-patch16), "
        f"written by scripts/make_tiny_clip.py ({'full ViT-B/16 geometry' if full else 'tiny'}, seed {seed}).\n")
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="real ViT-B/16 geometry (12 layers) instead of the tiny one")
    ap.add_argument("--out", default=None, help="output folder (default model/vision_model/clip-tiny-random "
                    "or clip-vit-base-patch16-random)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    out = resolve(args.out) if args.out else (RANDOM_CLIP if args.full else TINY_CLIP)
    print(f"CLIP stand-in at {make_clip(out, args.full, args.seed, args.overwrite)}")


if __name__ == "__main__":
    main()
