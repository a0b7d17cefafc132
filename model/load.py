"""Model selection shared by every inference entry point (eval_vlm.py, web_demo.py, the API server).

`--load_from model` strictly loads the native weight file `{save_dir}/{weight}_{hidden}{_moe}.pth`
into a MiniMindVLM whose sizes are read from the file itself (the size flags only pick the file and, when
given, are checked against it). Any other value is a transformers-format folder written by
`scripts/convert_vlm.py` (or downloaded): our own model type is built from this repository's classes and
LLaVA / Llama exports from stock transformers classes, so no code shipped in the folder runs unless
`--trust_remote_code` is given. The CLIP vision tower is never part of the weights: it always comes from
`--vision_model_path`.
"""
from __future__ import annotations

import argparse
import inspect
import logging
from pathlib import Path

import torch

from . import DEFAULT_CLIP, DEFAULT_TOKENIZER, resolve
from .argtypes import port_int, positive_int
from .model_minimind import MiniMindConfig
from .model_vlm import MiniMindVLM, VLMConfig
from .processor import TokenizerNotFoundError, load_tokenizer, tower_geometry_or_published
from .stock_export import StockExportError, read_config, stock_state
from .weights import (
    SHAPE_FLAGS,
    VISION_PREFIX,
    WeightError,
    check_shape,
    folder_weight_file,
    infer_shape,
    load_state,
    read_state_dict,
    weight_path,
)

log = logging.getLogger("minimind")


class ModelLoadError(RuntimeError):
    """A user-fixable problem (missing file, wrong sizes); entry points print it without a traceback."""


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model")
    g.add_argument("--load_from", default="model",
                   help="'model': native .pth chosen by --save_dir/--weight/--hidden_size/--use_moe; otherwise a "
                        "transformers-format folder (scripts/convert_vlm.py)")
    g.add_argument("--trust_remote_code", action="store_true",
                   help="let transformers run the Python code of a --load_from folder (only for folders you "
                        "trust; never needed for folders written by scripts/convert_vlm.py)")
    g.add_argument("--save_dir", default="out", help="folder of .pth weights (relative: cwd, else repo root)")
    g.add_argument("--weight", default="sft_vlm", help="weight name prefix, e.g. sft_vlm, pretrain_vlm")
    g.add_argument("--hidden_size", type=positive_int, default=None,
                   help="picks {weight}_{hidden}.pth (default: 512 if that file exists, else the only "
                        "{weight}_*.pth); the model's sizes always come from the file")
    g.add_argument("--num_hidden_layers", type=positive_int, default=None,
                   help="default: from the weight file (given: checked against it)")
    g.add_argument("--use_moe", type=int, default=None, choices=[0, 1],
                   help="default: from the weight file (given: picks {weight}_{hidden}_moe.pth and is checked)")
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
    parser.add_argument("--port", type=port_int, default=port)
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


def choose_weight_file(save_dir: str | Path, weight: str, hidden_size: int | None = None,
                       use_moe: int | None = None) -> Path:
    """The native file the flags name: `{save_dir}/{weight}_{hidden}{_moe}.pth`. Without --hidden_size: 512
    when that file exists, otherwise the only `{weight}_*.pth` there; without --use_moe: the dense file
    when both exist."""
    folder = resolve(save_dir)
    hidden = 512 if hidden_size is None else hidden_size
    for moe in ([0, 1] if use_moe is None else [use_moe]):
        path = weight_path(folder, weight, hidden, bool(moe))
        if path.is_file():
            return path
    found = sorted((p for p in list_weight_files(folder) if (spec := parse_weight_name(p)).get("weight") == weight
                    and use_moe in (None, spec["use_moe"])), key=lambda p: p.name)
    if hidden_size is None and len(found) == 1:
        return found[0]
    if hidden_size is None and found:
        raise ModelLoadError(f"{folder} holds several {weight} weight files ({', '.join(p.name for p in found)}) "
                             f"and none is hidden 512: pass --hidden_size (and --use_moe) to pick one")
    others = ", ".join(p.name for p in list_weight_files(folder)) or "none"
    raise ModelLoadError(f"weight file not found: {weight_path(folder, weight, hidden, bool(use_moe))} (weight "
                         f"files in {folder}: {others}); download the published ones with `python "
                         f"scripts/download.py`, train your own, or pick another with "
                         f"--save_dir/--weight/--hidden_size/--use_moe")


def read_native(args: argparse.Namespace) -> tuple[Path, VLMConfig, dict[str, torch.Tensor]]:
    """(weight file, config with the file's sizes, state dict) for the add_model_args flags. Size flags
    that were given must agree with the file; those left at None are filled in on `args` from it."""
    path = choose_weight_file(args.save_dir, args.weight, args.hidden_size, args.use_moe)
    try:
        state = read_state_dict(path)
        shape = infer_shape(state, path)
        check_shape(shape, {k: getattr(args, k) for k in SHAPE_FLAGS}, path)
    except WeightError as e:
        raise ModelLoadError(str(e)) from None
    for k in SHAPE_FLAGS:
        setattr(args, k, int(shape[k]))
    # A .pth has no config: the image geometry is the vision tower's own (the published one without a tower).
    return path, VLMConfig(**shape, **tower_geometry_or_published(resolve(args.vision_model_path))), state


# Everything our config.json may carry that our config classes take (the rest, e.g. auto_map, is ignored).
CONFIG_KEYS = {*inspect.signature(MiniMindConfig.__init__).parameters, *inspect.signature(VLMConfig.__init__).parameters,
               "tie_word_embeddings"} - {"self", "kwargs"}
OWN_TYPES = (VLMConfig.model_type, MiniMindConfig.model_type)  # a MiniMind-V folder; a MiniMind (LM) folder


def read_folder(folder: Path) -> tuple[VLMConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) from a transformers folder, running none of its code: our own model type
    (scripts/convert_vlm.py to_hf, or a MiniMind LM folder) is read directly, a LLaVA / Llama export with the
    stock transformers classes. Anything else needs the folder's own code: ModelLoadError."""
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"--load_from {folder}: no transformers model folder there (no config.json; use "
                             f"'model' for a .pth, or write a folder with scripts/convert_vlm.py)")
    cfg = read_config(folder)
    kind = cfg.get("model_type")
    if kind in OWN_TYPES:
        return VLMConfig(**{k: v for k, v in cfg.items() if k in CONFIG_KEYS}), read_state_dict(folder_weight_file(folder))
    if kind in ("llava", "llama"):
        return stock_state(folder, cfg)
    if cfg.get("auto_map") or any(folder.glob("*.py")):
        raise ModelLoadError(f"--load_from {folder}: model type {kind!r} needs the Python code shipped in the folder, "
                             f"which runs only with --trust_remote_code: pass it if you trust the folder")
    raise ModelLoadError(f"--load_from {folder}: a {kind!r} model, not MiniMind-V (its own folder, or a LLaVA / "
                         f"Llama export of it from scripts/convert_vlm.py)")


def load_folder(folder: Path, args: argparse.Namespace) -> MiniMindVLM:
    """A MiniMindVLM (fp32, CPU) from a --load_from folder; the folder's own code runs only with
    --trust_remote_code."""
    wanted = {k: getattr(args, k, None) for k in SHAPE_FLAGS}
    if getattr(args, "trust_remote_code", False):
        log.warning("--trust_remote_code: transformers may run the Python code in %s", folder)
        from transformers import AutoModelForCausalLM
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError) as e:
            raise ModelLoadError(f"--load_from {folder}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                from None
        config = model.config
    else:
        try:
            config, state = read_folder(folder)
            model = MiniMindVLM(config)
            load_state(model, state, folder)
        except (WeightError, StockExportError) as e:
            raise ModelLoadError(str(e)) from None
    shape = {k: getattr(config, k, None) for k in SHAPE_FLAGS}
    try:
        check_shape({**shape, "n_routed_experts": getattr(config, "n_routed_experts", None)}, wanted, folder)
    except WeightError as e:
        raise ModelLoadError(str(e)) from None
    for k in SHAPE_FLAGS:
        if hasattr(args, k) and shape[k] is not None:
            setattr(args, k, int(shape[k]))
    return model


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


def tokenizer_or_error(path: str | Path):
    """The tokenizer at `path` (repo-root relative works too), or a ModelLoadError saying where to get one."""
    try:
        return load_tokenizer(resolve(path))
    except TokenizerNotFoundError as e:
        raise ModelLoadError(str(e)) from None


def load_model(args: argparse.Namespace) -> tuple[MiniMindVLM, object]:
    """(model in eval mode on args.device, tokenizer) as selected by the add_model_args flags. The size
    flags left at None are filled in on `args` from the weights."""
    device = torch.device(args.device)
    dtype = pick_dtype(device, getattr(args, "dtype", "auto"))
    if args.load_from == "model":
        path, config, state = read_native(args)
        model = MiniMindVLM(config)
        try:
            load_state(model, state, path)
        except WeightError as e:
            raise ModelLoadError(str(e)) from None
        tokenizer = tokenizer_or_error(args.tokenizer_path)
    else:
        folder = resolve(args.load_from)
        model = load_folder(folder, args)
        has_tok = (folder / "tokenizer.json").exists()
        tokenizer = tokenizer_or_error(folder if has_tok else args.tokenizer_path)
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
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(VISION_PREFIX))
    log.info("model: %.2fM parameters (vision tower excluded) on %s, %s", n_params / 1e6, device, dtype)
    return model, tokenizer
