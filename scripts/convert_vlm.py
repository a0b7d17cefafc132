"""Convert MiniMind-V weights between the native `.pth` file and a transformers model folder.

    # .pth -> folder (config.json with auto_map, model.safetensors, the model code, tokenizer files)
    python scripts/convert_vlm.py to_hf --save_dir out --weight sft_vlm --hidden_size 512 --out_dir out/MiniMind2-V
    # folder -> .pth (written as {save_dir}/{weight}_{hidden}{_moe}.pth unless --out says otherwise)
    python scripts/convert_vlm.py to_pth --load_from out/MiniMind2-V --save_dir out --weight sft_vlm

The folder loads offline with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
and with `eval_vlm.py --load_from FOLDER`. Like the `.pth`, it holds no CLIP vision tower: the entry
points attach it from `--vision_model_path`; in your own code pass `vision_model_path=clip_folder` to
from_pretrained (or set `model.vision_encoder = load_vision_encoder(clip_folder)` afterwards). config.json names the
expected encoder under `vision_model`, for reference only. The tied lm_head is saved once
(transformers re-ties it on load); weights are saved in fp16 like the `.pth` files, so a round trip
is exact.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from model import resolve
from model.load import ModelLoadError, add_model_args, native_weight_file
from model.model_vlm import MiniMindVLM, VLMConfig
from model.weights import WeightMismatchError, load_weights, save_weights, weight_path

log = logging.getLogger("minimind")
CLIP_HUB_ID = "openai/clip-vit-base-patch16"


def to_hf(args: argparse.Namespace) -> Path:
    src = native_weight_file(args)
    if not src.is_file():
        raise ModelLoadError(f"weight file not found: {src} (download with `python scripts/download.py` or train one)")
    config = VLMConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                       use_moe=bool(args.use_moe))
    model = MiniMindVLM(config)
    load_weights(model, src)
    config.vision_model = CLIP_HUB_ID  # informational: the tower is not in the folder
    # Registering makes save_pretrained copy model_vlm.py (+ its import model_minimind.py) and write auto_map.
    VLMConfig.register_for_auto_class()
    MiniMindVLM.register_for_auto_class("AutoModelForCausalLM")
    out = resolve(args.out_dir) if args.out_dir else src.with_suffix("")
    model.to(torch.float16).save_pretrained(str(out))
    tok_dir = resolve(args.tokenizer_path)
    if (tok_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(str(out))
    else:
        log.warning("no tokenizer at %s: the folder has none (pass --tokenizer_path when loading it)", tok_dir)
    print(f"wrote {out} from {src}")
    return out


def folder_weight_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return folder / name
    raise ModelLoadError(f"{folder}: no model.safetensors or pytorch_model.bin (sharded folders are not supported)")


def to_pth(args: argparse.Namespace) -> Path:
    """Read config.json and the weights directly (no remote code runs), strictly load them into our
    MiniMindVLM, and save the native fp16 file."""
    folder = resolve(args.load_from)
    if args.load_from == "model" or not (folder / "config.json").exists():
        raise ModelLoadError(f"--load_from must name a transformers model folder (got {args.load_from!r})")
    cfg = json.loads((folder / "config.json").read_text())
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "use_moe", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "rope_theta",
            "max_position_embeddings", "intermediate_size", "rms_norm_eps")
    config = VLMConfig(**{k: cfg[k] for k in keys if k in cfg})
    model = MiniMindVLM(config)
    load_weights(model, folder_weight_file(folder))  # strict; re-ties lm_head if only one side was saved
    out = Path(args.out) if args.out else resolve(weight_path(args.save_dir, args.weight, config.hidden_size, config.use_moe))
    save_weights(model, out)
    print(f"wrote {out} from {folder}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("direction", choices=["to_hf", "to_pth"])
    add_model_args(ap)
    ap.add_argument("--out_dir", default=None, help="to_hf: output folder (default: the .pth path without suffix)")
    ap.add_argument("--out", default=None, help="to_pth: output file (default: {save_dir}/{weight}_{hidden}.pth)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        (to_hf if args.direction == "to_hf" else to_pth)(args)
    except (ModelLoadError, WeightMismatchError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
