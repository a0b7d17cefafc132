"""Talk to a MiniMind-V model from the command line, or score it on a Q&A file.

    python eval_vlm.py --image cat.jpg --prompt "What is in the picture?"    # one answer
    python eval_vlm.py --image a.png --image b.png --prompt "Compare <image> and <image>."
    python eval_vlm.py --image_dir photos/              # every image, default description prompt
    python eval_vlm.py [--chat --image cat.jpg]         # interactive chat (images join the first turn)
    python eval_vlm.py --bench dataset/synthetic/eval.parquet --bench_out out/bench.json
    python eval_vlm.py --bench dataset/bench/mmstar --bench_out out/mmstar.json    # a public benchmark

Model selection (--load_from, --save_dir, --weight, ...) is shared with web_demo.py and
scripts/serve_openai_api.py (model/load.py).

--bench scores by generation with the benchmark's standard prompt (the answer extracted by its
documented rule) and by option log-likelihood, with the images and with every image blanked, beside
the chance level (benchmarks/). Q&A files: an answer is correct when, after normalisation (lower case,
punctuation and extra spaces removed), it equals the reference answer, or it contains the reference
as whole words and no other reference answer of the same kind (so listing every colour earns nothing).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from benchmarks.extract import is_correct, normalise  # noqa: F401  (the Q&A rule, kept importable from here)
from benchmarks.readers import FORMATS
from benchmarks.run import METHOD_CHOICES
from model import resolve
from model.argtypes import (
    float_range,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed_int,
)
from model.chat import DEFAULT_PROMPT, ChatInputError, answer, open_image, with_image_markers
from model.engine import Engine
from model.load import ModelLoadError, add_model_args, load_model

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def print_answer(engine: Engine, messages: list[dict], images: list, args: argparse.Namespace) -> str:
    """Stream one reply to stdout, then a speed line; returns the reply."""
    stats: dict = {}
    parts = []
    pieces = answer(engine, messages, images, args.max_new_tokens, args.temperature, args.top_p,
                    args.repetition_penalty, stats=stats, seed=args.seed)
    print("🤖: ", end="", flush=True)
    for piece in pieces:
        parts.append(piece)
        print(piece, end="", flush=True)
    n, secs = stats.get("new_tokens", 0), stats.get("seconds", 0.0)
    print(f"\n[{n} tokens in {secs:.2f}s, {n / max(secs, 1e-9):.1f} tokens/s, "
          f"first token after {stats.get('ttft_s', secs):.2f}s]\n", flush=True)
    return "".join(parts)


def run_images(engine: Engine, args: argparse.Namespace) -> None:
    if args.image_dir:
        folder = resolve(args.image_dir)
        if not folder.is_dir():
            raise ChatInputError(f"--image_dir {args.image_dir}: not a folder")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ChatInputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
        skipped = 0
        for p in paths:  # every image on its own, with the prompt (the original's behaviour)
            try:
                image = open_image(str(p), p.name)
            except ChatInputError as e:  # one bad file (not an image, truncated, too large) does not end the run
                print(f"[skipped] {e}", file=sys.stderr, flush=True)
                skipped += 1
                continue
            print(f"[image] {p.name}\n👶: {args.prompt or DEFAULT_PROMPT}")
            print_answer(engine, [{"role": "user", "content": with_image_markers(
                args.prompt or DEFAULT_PROMPT, 1)}], [image], args)
        if skipped == len(paths):
            raise ChatInputError(f"no image in {folder} could be read ({skipped} skipped)")
        print(f"{len(paths) - skipped} image(s) answered, {skipped} skipped")
        return
    images = [open_image(str(resolve(p)), p) for p in args.image]
    prompt = with_image_markers(args.prompt or DEFAULT_PROMPT, len(images))
    print(f"👶: {prompt}")
    print_answer(engine, [{"role": "user", "content": prompt}], images, args)


def chat(engine: Engine, args: argparse.Namespace) -> None:
    """Interactive multi-turn chat; images given with --image join the first question."""
    images = [open_image(str(resolve(p)), p) for p in args.image]
    messages: list[dict] = []
    print(f"chat with the model ({len(images)} image(s) attached); empty line or Ctrl-D to quit")
    while True:
        try:
            prompt = input("👶: ").strip()
        except EOFError:
            break
        if not prompt or prompt in ("exit", "quit"):
            break
        if not messages:
            prompt = with_image_markers(prompt, len(images))
        messages.append({"role": "user", "content": prompt})
        try:
            reply = print_answer(engine, messages, images, args)
        except ChatInputError as e:
            print(f"error: {e}")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


# ---------------------------------------------------------------------------------------- --bench

def bench(model, tokenizer, args: argparse.Namespace) -> dict:
    """Score a benchmark file: the work is done by benchmarks/ (readers, both methods, the report)."""
    from benchmarks.run import evaluate
    out = None
    if args.bench_out:
        out = Path(args.bench_out) if Path(args.bench_out).is_absolute() else resolve(args.bench_out)
    return evaluate(model, tokenizer, resolve(args.bench), args.bench_format, args.bench_limit, args.bench_method,
                    bool(args.bench_baseline), args.blank_image, args.batch_size, args.bench_max_new_tokens, out=out)


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    g = ap.add_argument_group("input")
    g.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    g.add_argument("--prompt", default=None, help=f"question; default {DEFAULT_PROMPT!r}")
    g.add_argument("--image_dir", default=None, help="describe every image in this folder")
    g.add_argument("--chat", action="store_true", help="chat about the --image files (default without images)")
    g = ap.add_argument_group("sampling")
    g.add_argument("--max_new_tokens", type=positive_int, default=512)
    g.add_argument("--temperature", type=non_negative_float, default=0.65, help="0 = greedy")
    g.add_argument("--top_p", type=float_range(0, 1, low_open=True), default=0.85, help="in (0, 1]")
    g.add_argument("--repetition_penalty", type=positive_float, default=1.0, help="> 0; 1 = off")
    g.add_argument("--seed", type=seed_int, default=None)
    g = ap.add_argument_group("benchmark")
    g.add_argument("--bench", default=None, help="score on a benchmark file or folder of shards: MMStar, ScienceQA-IMG, "
                   "POPE, MMBench (scripts/download.py bench NAME) or a Q&A parquet (dataset/synthetic/eval.parquet)")
    g.add_argument("--bench_format", default=None, choices=FORMATS, help="the file's layout (default: from its columns)")
    g.add_argument("--bench_method", default="both", choices=METHOD_CHOICES,
                   help="generation with the benchmark's prompt, option log-likelihood, or both")
    g.add_argument("--bench_baseline", type=int, default=1, choices=[0, 1],
                   help="1: also score every item with its images blanked (the no-image line)")
    g.add_argument("--bench_out", default=None, help="write the scores and every item's prediction as JSON here")
    g.add_argument("--blank_image", action="store_true", help="score only with every image replaced by a grey one")
    g.add_argument("--bench_limit", type=non_negative_int, default=0, help="score only the first N rows (0: all)")
    g.add_argument("--bench_max_new_tokens", type=positive_int, default=24, help="answers are a letter or a few words")
    g.add_argument("--batch_size", type=positive_int, default=16)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    engine = None
    try:
        model, tokenizer = load_model(args)
        if args.bench:  # benchmarks/ batches its own rows (generation and option log-likelihood)
            bench(model, tokenizer, args)
            return 0
        engine = Engine(model, tokenizer, max_batch=1, max_queue=1)
        if args.image_dir or (args.image and not args.chat):
            run_images(engine, args)
        else:
            chat(engine, args)
    except (ModelLoadError, ChatInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if engine is not None:
            engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
