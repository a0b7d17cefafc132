"""Talk to a MiniMind-V model from the command line, or score it on a Q&A file.

    python eval_vlm.py --image cat.jpg --prompt "What is in the picture?"    # one answer
    python eval_vlm.py --image a.png --image b.png --prompt "Compare <image> and <image>."
    python eval_vlm.py --image_dir photos/              # every image, default description prompt
    python eval_vlm.py [--chat --image cat.jpg]         # interactive chat (images join the first turn)
    python eval_vlm.py --bench dataset/synthetic/eval.parquet --bench_out out/bench.json

Model selection (--load_from, --save_dir, --weight, ...) is shared with web_demo.py and
scripts/serve_openai_api.py (model/load.py).

--bench scoring rule: an answer is correct when, after normalisation (lower case, punctuation and
extra spaces removed), it equals the reference answer, or it contains the reference as whole words
and no other reference answer of the same kind (so listing every colour earns nothing).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from model import resolve
from model.chat import DEFAULT_PROMPT, ChatInputError, answer, encode_chat, open_image, with_image_markers
from model.engine import Engine, GenRequest
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
        for p in paths:  # every image on its own, with the prompt (the original's behaviour)
            print(f"[image] {p.name}\n👶: {args.prompt or DEFAULT_PROMPT}")
            print_answer(engine, [{"role": "user", "content": with_image_markers(
                args.prompt or DEFAULT_PROMPT, 1)}], [open_image(str(p), p.name)], args)
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

def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def is_correct(prediction: str, reference: str, choices: set[str]) -> bool:
    """The documented rule: normalised equality, or the reference as whole words and no rival answer."""
    p, r = normalise(prediction), normalise(reference)
    if p == r:
        return True

    def has(word: str) -> bool:
        return bool(word) and f" {word} " in f" {p} "
    return has(r) and not any(has(c) for c in choices if c != r)


def read_bench(path: Path) -> list[dict]:
    """Rows of a Q&A parquet: conversations (JSON, ending with the reference answer), image_bytes
    (one binary or a list), kind (optional), answer (optional: else the last assistant message)."""
    import pyarrow.parquet as pq
    if not path.is_file():
        raise ChatInputError(f"--bench {path}: file not found (make the synthetic one with "
                             f"`python scripts/make_synthetic_data.py --out dataset/synthetic`)")
    table = pq.read_table(path).to_pylist()
    rows = []
    for i, r in enumerate(table):
        conv = json.loads(r["conversations"]) if isinstance(r["conversations"], str) else r["conversations"]
        if not conv or conv[-1]["role"] != "assistant":
            raise ChatInputError(f"{path} row {i}: conversations must end with the reference assistant answer")
        imgs = r.get("image_bytes")
        imgs = [] if imgs is None else (imgs if isinstance(imgs, list) else [imgs])
        rows.append({"messages": conv[:-1], "images": imgs, "kind": r.get("kind") or "all",
                     "answer": r.get("answer") or conv[-1]["content"]})
    return rows


def bench(engine: Engine, args: argparse.Namespace) -> dict:
    """Greedy answers through the engine, args.batch_size rows at a time (continuous batching)."""
    from PIL import Image
    from tqdm import tqdm
    path = resolve(args.bench)
    rows = read_bench(path)
    if args.bench_limit:
        rows = rows[:args.bench_limit]
    choices = defaultdict(set)
    for r in rows:
        choices[r["kind"]].add(normalise(r["answer"]))
    blank = Image.new("RGB", (224, 224), (128, 128, 128))
    results, t0 = [], time.perf_counter()
    with tqdm(total=len(rows), desc=f"bench {path.name}", unit="row") as bar:
        for start in range(0, len(rows), args.batch_size):
            batch = rows[start:start + args.batch_size]
            handles = []
            for i, r in enumerate(batch):
                name = f"{path} row {start + i}"
                images = [blank if args.blank_image else open_image(b, f"{name} image {j}")
                          for j, b in enumerate(r["images"])]
                try:
                    ids, pixel_values = encode_chat(engine, r["messages"], images)
                except ChatInputError as e:
                    raise ChatInputError(f"{name}: {e}") from None
                handles.append(engine.submit(GenRequest(ids, pixel_values, args.bench_max_new_tokens)))
            for r, h in zip(batch, handles):
                pred = "".join(ev.text for ev in h).strip()
                results.append({"kind": r["kind"], "answer": r["answer"], "prediction": pred,
                                "correct": is_correct(pred, r["answer"], choices[r["kind"]])})
            bar.update(len(batch))
    per_kind = {}
    for kind in sorted(choices):
        got = [x["correct"] for x in results if x["kind"] == kind]
        per_kind[kind] = {"n": len(got), "correct": sum(got), "accuracy": sum(got) / len(got)}
    acc = sum(x["correct"] for x in results) / max(len(results), 1)
    report = {"file": str(args.bench), "rows": len(results), "blank_image": bool(args.blank_image),
              "accuracy": acc, "per_kind": per_kind, "seconds": round(time.perf_counter() - t0, 2),
              "rule": "normalised exact match, or reference contained as whole words with no other "
                      "reference answer of the same kind",
              "examples": results[:20]}
    for kind, v in per_kind.items():
        print(f"{kind:14s} {v['correct']:5d}/{v['n']:<5d} {v['accuracy']:.3f}")
    if args.bench_out:
        out_path = resolve(args.bench_out) if not Path(args.bench_out).is_absolute() else Path(args.bench_out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
        print(f"results written to {out_path}")
    print(f"accuracy: {acc:.4f}")
    return report


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    g = ap.add_argument_group("input")
    g.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    g.add_argument("--prompt", default=None, help=f"question; default {DEFAULT_PROMPT!r}")
    g.add_argument("--image_dir", default=None, help="describe every image in this folder")
    g.add_argument("--chat", action="store_true", help="chat about the --image files (default without images)")
    g = ap.add_argument_group("sampling")
    g.add_argument("--max_new_tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=0.65, help="0 = greedy")
    g.add_argument("--top_p", type=float, default=0.85)
    g.add_argument("--repetition_penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g = ap.add_argument_group("benchmark")
    g.add_argument("--bench", default=None, help="score on a Q&A parquet (e.g. dataset/synthetic/eval.parquet)")
    g.add_argument("--bench_out", default=None, help="write the scores as JSON here")
    g.add_argument("--blank_image", action="store_true", help="replace every image by a grey one (text-only baseline)")
    g.add_argument("--bench_limit", type=int, default=0, help="score only the first N rows")
    g.add_argument("--bench_max_new_tokens", type=int, default=24)
    g.add_argument("--batch_size", type=int, default=16)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    engine = None
    try:
        model, tokenizer = load_model(args)
        engine = Engine(model, tokenizer, max_batch=args.batch_size if args.bench else 1,
                        max_queue=max(args.batch_size, 1))
        if args.bench:
            bench(engine, args)
        elif args.image_dir or (args.image and not args.chat):
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
