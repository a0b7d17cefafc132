"""Model selection shared by every inference entry point (eval_vlm.py, web_demo.py, the API server).

`--load_from model` builds a MiniMindVLM and strictly loads the native weight file
`{save_dir}/{weight}_{hidden}{_moe}.pth`; any other value is a transformers-format folder written by
`scripts/convert_vlm.py` (or downloaded). The CLIP vision tower is never part of the weights: it
always comes from `--vision_model_path`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from . import DEFAULT_CLIP, DEFAULT_TOKENIZER, resolve
from .model_vlm import MiniMindVLM, VLMConfig
from .processor import TokenizerNotFoundError, load_tokenizer, vision_geometry
from .weights import load_weights, weight_path

log = logging.getLogger("minimind")


class ModelLoadError(RuntimeError):
    """A user-fixable problem (missing file, wrong sizes); entry points print it without a traceback."""


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model")
    g.add_argument("--load_from", default="model",
                   help="'model': native .pth chosen by --save_dir/--weight/--hidden_size/--num_hidden_layers/"
                        "--use_moe; otherwise a transformers-format folder (scripts/convert_vlm.py)")
    g.add_argument("--save_dir", default="out", help="folder of .pth weights (relative: cwd, else repo root)")
    g.add_argument("--weight", default="sft_vlm", help="weight name prefix, e.g. sft_vlm, pretrain_vlm")
    g.add_argument("--hidden_size", type=int, default=512)
    g.add_argument("--num_hidden_layers", type=int, default=8)
    g.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    g.add_argument("--vision_model_path", default=str(DEFAULT_CLIP),
                   help="vision tower folder (the published models use CLIP ViT-B/16)")
    g.add_argument("--tokenizer_path", default=str(DEFAULT_TOKENIZER),
                   help="tokenizer folder (for a transformers folder its own tokenizer is used when present)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights and activations: auto = float32 on CPU, bfloat16 on CUDA (float16 without bf16)")
    g.add_argument("--quantize", default="none", choices=QUANTIZE,
                   help="CPU only: int8 = weight-only int8 linear layers (torchao); int8_dynamic = torch's own "
                        "dynamic int8 quantization (int8 weights and activations); the vision tower stays fp32")
    return parser


def add_serve_args(parser: argparse.ArgumentParser, port: int) -> argparse.ArgumentParser:
    """--host / --port of the web demo and the API server: loopback unless the user opens it up
    (the original web demo bound 0.0.0.0)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=port)
    return parser


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE = ["none", "int8", "int8_dynamic"]


def quantize(model: MiniMindVLM, method: str) -> MiniMindVLM:
    """Replace the language model's linear layers (decoder and lm_head) by int8 ones, in place.

    lm_head shares its weight with the token embeddings: it gets its own copy first, so the embedding
    lookup keeps the fp32 table. The CLIP tower and the projection stay in fp32 (they run once per image).
    """
    if method == "none":
        return model
    from torch import nn
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    if method == "int8":
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError:
            raise ModelLoadError("--quantize int8 needs torchao: pip install torchao "
                                 "(or use --quantize int8_dynamic, built into torch)") from None
        quantize_(model, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, name: isinstance(m, nn.Linear) and name.startswith(("model.", "lm_head")))
    elif method == "int8_dynamic":
        from torch.ao.quantization import quantize_dynamic
        model.model = quantize_dynamic(model.model, {nn.Linear}, dtype=torch.qint8)
        model.lm_head = quantize_dynamic(nn.Sequential(model.lm_head), {nn.Linear}, dtype=torch.qint8)[0]
    else:
        raise ModelLoadError(f"unknown --quantize {method!r} (choose from {', '.join(QUANTIZE)})")
    return model


def pick_dtype(device: str | torch.device, requested: str = "auto") -> torch.dtype:
    """`requested` unless "auto": then fp32 on CPU (the original's unconditional .half() broke CPU),
    bf16 on CUDA where supported, else fp16."""
    if requested != "auto":
        return DTYPES[requested]
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def native_weight_file(args: argparse.Namespace) -> Path:
    return resolve(weight_path(args.save_dir, args.weight, args.hidden_size, bool(args.use_moe)))


def list_weight_files(save_dir: str | Path) -> list[Path]:
    """Every `.pth` weight file directly in save_dir, newest first (resume files excluded)."""
    folder = resolve(save_dir)
    if not folder.is_dir():
        return []
    files = [p for p in folder.glob("*.pth") if "resume" not in p.name]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def parse_weight_name(path: str | Path) -> dict:
    """`sft_vlm_512_moe.pth` -> {"weight": "sft_vlm", "hidden_size": 512, "use_moe": 1}, or {} when the
    name does not follow the published naming."""
    parts = Path(path).stem.split("_")
    use_moe = parts[-1] == "moe"
    if use_moe:
        parts = parts[:-1]
    if len(parts) < 2 or not parts[-1].isdigit():
        return {}
    return {"weight": "_".join(parts[:-1]), "hidden_size": int(parts[-1]), "use_moe": int(use_moe)}


def _tokenizer(path: str | Path):
    try:
        return load_tokenizer(resolve(path))
    except TokenizerNotFoundError as e:
        raise ModelLoadError(str(e)) from None


def load_model(args: argparse.Namespace) -> tuple[MiniMindVLM, object]:
    """(model in eval mode on args.device, tokenizer) as selected by the add_model_args flags."""
    device = torch.device(args.device)
    dtype = pick_dtype(device, getattr(args, "dtype", "auto"))
    if args.load_from == "model":
        path = native_weight_file(args)
        if not path.is_file():
            found = ", ".join(p.name for p in list_weight_files(args.save_dir)) or "none"
            raise ModelLoadError(
                f"weight file not found: {path} (weight files in {resolve(args.save_dir)}: {found}).\n"
                f"  Download the published ones with `python scripts/download.py`, train your own, or pick "
                f"another with --save_dir/--weight/--hidden_size/--use_moe.")
        try:  # a .pth has no config: the image geometry is the vision tower's own
            geometry = vision_geometry(resolve(args.vision_model_path))
        except FileNotFoundError as e:  # its message says which script downloads / makes one
            raise ModelLoadError(str(e)) from None
        config = VLMConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                           use_moe=bool(args.use_moe), **geometry)
        model = MiniMindVLM(config)
        try:
            load_weights(model, path)
        except RuntimeError as e:  # WeightMismatchError: wrong sizes for this file
            raise ModelLoadError(str(e)) from None
        tokenizer = _tokenizer(args.tokenizer_path)
    else:
        folder = resolve(args.load_from)
        if not (folder / "config.json").exists():
            raise ModelLoadError(f"--load_from {args.load_from}: no transformers model folder at {folder} "
                                 f"(use 'model' for a .pth, or write a folder with scripts/convert_vlm.py)")
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32)
        has_tok = (folder / "tokenizer.json").exists()
        tokenizer = _tokenizer(folder if has_tok else args.tokenizer_path)
    # The vision tower is attached separately: it is never part of a MiniMind-V checkpoint.
    try:
        model.attach_vision_encoder(resolve(args.vision_model_path))
    except (FileNotFoundError, ValueError) as e:  # a missing tower says how to get one; a misfit, what differs
        raise ModelLoadError(str(e)) from None
    model = model.to(device=device, dtype=dtype).eval()
    method = getattr(args, "quantize", "none")
    if method != "none":
        if device.type != "cpu" or dtype != torch.float32:
            raise ModelLoadError("--quantize is for the CPU in float32 (on a GPU use --dtype bfloat16)")
        quantize(model, method)
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vision_encoder."))
    log.info("model: %.2fM parameters (vision tower excluded) on %s, %s", n_params / 1e6, device, dtype)
    return model, tokenizer
