"""Convert MiniMind-V weights between the native `.pth` file and transformers model folders.

    # .pth -> folder (config.json with auto_map, model.safetensors, the model code, tokenizer files)
    python scripts/convert_vlm.py to_hf --save_dir out --weight sft_vlm --hidden_size 512 --out_dir out/MiniMind2-V
    # .pth -> stock LlavaForConditionalGeneration + LlavaProcessor folder (CLIP tower included, no custom code)
    python scripts/convert_vlm.py to_llava --weight sft_vlm \
        --vision_model_path model/vision_model/clip-vit-base-patch16 --out_dir out/MiniMind2-V-llava
    # .pth -> stock LlamaForCausalLM folder (the LM alone, for text; llama.cpp's converter reads it)
    python scripts/convert_vlm.py to_llama --weight sft_vlm --out_dir out/MiniMind2-V-llama
    # any of the three folders -> .pth (written as {save_dir}/{weight}_{hidden}{_moe}.pth unless --out says otherwise)
    python scripts/convert_vlm.py to_pth --load_from out/MiniMind2-V --save_dir out --weight sft_vlm

The model's sizes (hidden size, layers, MoE) are read from the weight file: --hidden_size / --use_moe only
pick the file, and a size flag that disagrees with the file is an error.

The folder loads with `eval_vlm.py --load_from FOLDER` (built from this repository's classes: none of the
folder's code runs) and offline with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
`AutoProcessor.from_pretrained(folder, trust_remote_code=True)` gives its MiniMindVLMProcessor (tokenizer +
image preprocessing + `<image>` expansion; the tokenizer alone loads with the stock AutoTokenizer). Like the
`.pth`, it holds no vision tower: the entry points attach it from `--vision_model_path`; in your own code pass
`vision_model_path=clip_folder` to from_pretrained (or call `model.attach_vision_encoder(clip_folder)`
afterwards). config.json holds the image geometry the tower must have and names the expected encoder under
`vision_model`, for reference. The tied lm_head is saved once (transformers re-ties it on load); weights are
saved in fp16 like the `.pth` files, so a round trip is exact. The image geometry of a `.pth` (which has no
config) is read from `--vision_model_path` when that folder exists, else the published one (CLIP ViT-B/16 at
224 px).

to_llava and to_llama folders load with the stock classes (`LlavaForConditionalGeneration`,
`AutoProcessor`, `LlamaForCausalLM`) and no trust_remote_code; see model/stock_export.py for why they
compute exactly what MiniMind-V computes, and the README section "Use elsewhere" for what works where.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from model import resolve
from model.load import ModelLoadError, add_model_args, read_folder, read_native, tokenizer_or_error
from model.model_minimind import MiniMindForCausalLM
from model.model_vlm import MiniMindVLM, VLMConfig, load_vision_encoder
from model.processor import MiniMindVLMImageProcessor, MiniMindVLMProcessor, TokenizerNotFoundError, load_tokenizer
from model.stock_export import StockExportError, build_llama, build_llava, build_processor, check_dense, check_moe
from model.weights import PROJ_PREFIX, SHAPE_FLAGS, VISION_PREFIX, WeightError, check_shape, load_state, save_weights, weight_path

log = logging.getLogger("minimind")
CLIP_HUB_ID = "openai/clip-vit-base-patch16"


def to_hf(args: argparse.Namespace) -> Path:
    src, config, model = load_native(args, "to_hf")
    config.vision_model = CLIP_HUB_ID  # informational: the tower is not in the folder
    # Registering makes save_pretrained copy model_vlm.py (+ its imports model_minimind.py, processor.py)
    # and write auto_map; the processor's own auto_map points at processor.py.
    VLMConfig.register_for_auto_class()
    MiniMindVLM.register_for_auto_class("AutoModelForCausalLM")
    MiniMindVLMProcessor.register_for_auto_class("AutoProcessor")
    MiniMindVLMImageProcessor.register_for_auto_class("AutoImageProcessor")
    out = resolve(args.out_dir) if args.out_dir else src.with_suffix("")
    model.to(torch.float16).save_pretrained(str(out))
    try:
        MiniMindVLMProcessor.from_config(config, load_tokenizer(resolve(args.tokenizer_path))).save_pretrained(str(out))
    except TokenizerNotFoundError as e:
        log.warning("%s; the folder has no tokenizer or processor (pass --tokenizer_path when loading it)", e)
    print(f"wrote {out} from {src}")
    return out


def load_native(args: argparse.Namespace, direction: str) -> tuple[Path, VLMConfig, MiniMindVLM]:
    """(weight file, config, strictly loaded model) for the file the flags select; its sizes come from the file."""
    if direction == "to_llama" and args.use_moe:  # before reading anything: the same message for every MoE file
        check_dense(VLMConfig(use_moe=True), direction)
    src, config, state = read_native(args)
    config.inference_rope_scaling = bool(args.inference_rope_scaling)
    if direction == "to_llama":
        check_dense(config, direction)
    if direction != "to_hf":
        check_moe(config)
    model = MiniMindVLM(config)
    load_state(model, state, src)
    return src, config, model


def lm_and_proj_state(model: MiniMindVLM) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(VISION_PREFIX)}


def prepare_out_dir(out_dir: str | None, src: Path, suffix: str) -> Path:
    """The output folder: new, empty, or an earlier export (it has a config.json) that is overwritten."""
    out = resolve(out_dir) if out_dir else src.with_name(src.stem + suffix)
    if out.exists() and not out.is_dir():
        raise ModelLoadError(f"--out_dir {out} is a file: name a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").exists():
        raise ModelLoadError(f"--out_dir {out} is a non-empty folder that is not a model folder: name a new one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create --out_dir {out}: {e.strerror}") from None
    return out


def to_llava(args: argparse.Namespace) -> Path:
    src, config, model = load_native(args, "to_llava")
    state = lm_and_proj_state(model)
    try:
        encoder = load_vision_encoder(resolve(args.vision_model_path))
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ModelLoadError(f"--vision_model_path: {e}") from None
    tokenizer = tokenizer_or_error(args.tokenizer_path)
    processor = build_processor(tokenizer, config)
    model = build_llava(config, state, encoder)
    out = prepare_out_dir(args.out_dir, src, "-llava")
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    (out / "README.md").write_text(model_card("llava", src, config, args.vision_model_path))
    print(f"wrote {out} from {src} (+ vision tower from {args.vision_model_path})")
    return out


def to_llama(args: argparse.Namespace) -> Path:
    src, config, model = load_native(args, "to_llama")
    state = lm_and_proj_state(model)
    tokenizer = tokenizer_or_error(args.tokenizer_path)
    model = build_llama(config, state)
    out = prepare_out_dir(args.out_dir, src, "-llama")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "README.md").write_text(model_card("llama", src, config))
    print(f"wrote {out} from {src}")
    return out


def model_card(kind: str, src: Path, config: VLMConfig, vision: str | None = None) -> str:
    size = f"hidden {config.hidden_size} x {config.num_hidden_layers} layers"
    rope = "YaRN (factor 16 over 2048 positions)" if config.inference_rope_scaling else "plain RoPE (theta 1e6)"
    head = ["---", "license: apache-2.0", "library_name: transformers",
            f"pipeline_tag: {'image-text-to-text' if kind == 'llava' else 'text-generation'}", "---", ""]
    if kind == "llava":
        body = f"""# MiniMind-V ({size}) as a stock LLaVA model

Converted from `{src.name}` by `scripts/convert_vlm.py to_llava` (MiniMind-V, Apache-2.0). Stock transformers
classes hold it exactly: a `LlamaForCausalLM`-shaped language model ({rope}), the CLIP ViT-B/16 vision tower
(from `{vision}`), and a projector that is MiniMind-V's single linear map (`linear_1`; `act` is the identity and
`linear_2` an identity matrix with zero bias). No `trust_remote_code`.

```python
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

model = LlavaForConditionalGeneration.from_pretrained("THIS_FOLDER", dtype=torch.float32)
processor = AutoProcessor.from_pretrained("THIS_FOLDER")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe the image."}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open("photo.jpg")], text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=100, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Images: each image becomes {len(config.image_ids)} tokens of id {config.image_token_id} (the character `@`).
In the chat template, `<image>` in text or an `{{"type": "image"}}` item marks an image; in raw text given to
the processor, `@` is the marker. So a prompt with images cannot contain `@` as ordinary text (the processor
and the model would count it as an image token).
"""
    else:
        body = f"""# MiniMind ({size}) as a stock Llama model

The language model of `{src.name}`, converted by `scripts/convert_vlm.py to_llama` (MiniMind-V, Apache-2.0):
MiniMind's LM is a Llama ({rope}, grouped-query attention, SwiGLU, tied embeddings), so `LlamaForCausalLM`
computes exactly what it computes. Text only: the vision projection is not in this folder (use `to_llava`).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")
tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")
ids = tokenizer.apply_chat_template([{{"role": "user", "content": "Hello"}}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
print(tokenizer.decode(model.generate(**ids, max_new_tokens=50)[0]))
```

llama.cpp: `scripts/check_llamacpp.py` in the MiniMind-V repository converts this folder to GGUF with llama.cpp's
own `convert_hf_to_gguf.py` and checks the tokens against MiniMind's.
"""
    return "\n".join(head) + body


def to_pth(args: argparse.Namespace) -> Path:
    """Read config.json and the weights without running any code from the folder (our own type directly, LLaVA /
    Llama exports with the stock classes), strictly load them into our classes, and save the native fp16 file.
    A Llama folder holds the LM alone: it becomes an LM-only file (like llm_512.pth), not a random projection."""
    folder = resolve(args.load_from)
    if args.load_from == "model" or not (folder / "config.json").exists():
        raise ModelLoadError(f"--load_from must name a transformers model folder (got {args.load_from!r})")
    config, state = read_folder(folder)
    check_shape({k: getattr(config, k) for k in SHAPE_FLAGS}, {k: getattr(args, k) for k in SHAPE_FLAGS}, folder)
    lm_only = not any(k.startswith(PROJ_PREFIX) for k in state)
    model = MiniMindForCausalLM(config) if lm_only else MiniMindVLM(config)
    load_state(model, state, folder)  # strict; re-ties lm_head if only one side was saved
    out = Path(args.out) if args.out else resolve(weight_path(args.save_dir, args.weight, config.hidden_size,
                                                              config.use_moe))
    save_weights(model, out)
    print(f"wrote {out} from {folder}")
    return out


DIRECTIONS = {"to_hf": to_hf, "to_pth": to_pth, "to_llava": to_llava, "to_llama": to_llama}


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("direction", choices=list(DIRECTIONS))
    add_model_args(ap)
    ap.add_argument("--inference_rope_scaling", type=int, default=0, choices=[0, 1],
                    help="1: YaRN (factor 16 over 2048 positions) in the written config")
    ap.add_argument("--out_dir", default=None, help="to_hf / to_llava / to_llama: output folder (default: the .pth "
                    "path without suffix, + '-llava' / '-llama')")
    ap.add_argument("--out", default=None, help="to_pth: output file (default: {save_dir}/{weight}_{hidden}.pth)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        DIRECTIONS[args.direction](args)
    except (ModelLoadError, WeightError, StockExportError, OSError) as e:  # OSError: unreadable or unwritable files
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
