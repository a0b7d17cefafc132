"""int8 against fp32 on the CPU: decode speed at batch 1 and 16, and how often the answers differ.

    python scripts/bench_quantize.py                                   # speed: random 512 x 8 model
    python scripts/bench_quantize.py --answers out/quickstart/sft_vlm_128.pth --hidden_size 128 \\
        --num_hidden_layers 4 --bench dataset/synthetic/eval.parquet  # + answers on the quickstart's eval file

Speed: the serving engine (model/engine.py) decodes `--new_tokens` greedy tokens for 1 and for 16
requests at once (EOS suppressed so every row runs the whole length); decode tokens/s counts every
token after the first of each row over the time from the first to the last token. Each method is timed
`--repeats` times alternating with the others; the median is reported. Answers: every row of the eval
file answered greedily with fp32 and with each int8 method; reported are the share of answers that
differ from fp32's and each method's accuracy (eval_vlm.py's rule).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from model import PROJECT_TOKENIZER, ROOT, TINY_CLIP
from model.argtypes import model_width, non_negative_int, positive_int
from model.engine import Engine, GenRequest
from model.load import QUANTIZE, quantize

METHODS = list(QUANTIZE)  # "none" = fp32


def decode_speed(engine: Engine, rows: int, new_tokens: int) -> float:
    g = torch.Generator().manual_seed(rows)
    reqs = [GenRequest(torch.randint(40, 6400, (24,), generator=g).tolist(), None, new_tokens) for _ in range(rows)]
    import threading
    handles = [engine.submit(r) for r in reqs]
    stamps: list[list[float]] = [[] for _ in handles]

    def read(i: int) -> None:  # one reader per request, so every token is stamped when it arrives
        stamps[i] = [time.perf_counter() for ev in handles[i] if ev.token is not None]
    readers = [threading.Thread(target=read, args=(i,)) for i in range(rows)]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    first, last = max(s[0] for s in stamps), max(s[-1] for s in stamps)
    return sum(len(s) - 1 for s in stamps) / (last - first)


def build(args: argparse.Namespace, method: str, weights: Path | None):
    from model.model_vlm import MiniMindVLM, VLMConfig
    from model.processor import load_tokenizer
    from model.weights import load_weights
    torch.manual_seed(0)
    model = MiniMindVLM(VLMConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers),
                        vision_model_path=TINY_CLIP).eval()
    if weights is not None:
        load_weights(model, weights)
    quantize(model, method)
    return Engine(model, load_tokenizer(PROJECT_TOKENIZER), max_batch=16)


def no_eos(engine: Engine):
    eos = engine.eos
    return engine.model.lm_head.register_forward_hook(lambda m, i, out: out.index_fill(-1, torch.tensor([eos]), -1e9))


def answers(engine: Engine, path: Path) -> tuple[list[str], float]:
    import eval_vlm
    from model.chat import encode_chat, open_image
    rows = eval_vlm.read_bench(path)
    choices: dict = {}
    for r in rows:
        choices.setdefault(r["kind"], set()).add(eval_vlm.normalise(r["answer"]))
    preds, correct = [], 0
    for start in range(0, len(rows), 16):
        batch = rows[start:start + 16]
        handles = [engine.submit(GenRequest(*encode_chat(engine, r["messages"], [open_image(b) for b in r["images"]]),
                                            max_new_tokens=24)) for r in batch]
        for r, h in zip(batch, handles):
            pred = "".join(ev.text for ev in h).strip()
            preds.append(pred)
            correct += eval_vlm.is_correct(pred, r["answer"], choices[r["kind"]])
    return preds, correct / len(rows)


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden_size", type=model_width, default=512)
    ap.add_argument("--num_hidden_layers", type=positive_int, default=8)
    ap.add_argument("--new_tokens", type=positive_int, default=64)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--answers", default=None, help="a weight file: also compare answers on --bench")
    ap.add_argument("--bench", default=str(ROOT / "dataset" / "synthetic" / "eval.parquet"))
    ap.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=str(ROOT / "bench_results" / "quantize.json"))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from scripts.make_tiny_clip import make_clip
    make_clip(TINY_CLIP)
    result: dict = {"model": f"{args.hidden_size} x {args.num_hidden_layers}, random weights",
                    "threads": torch.get_num_threads(), "new_tokens": args.new_tokens, "speed": {}}
    engines = {m: build(args, m, None) for m in args.methods}
    times: dict = {(m, b): [] for m in args.methods for b in (1, 16)}
    for m, e in engines.items():  # warm-up
        decode_speed(e, 2, 4)
    hooks = [no_eos(e) for e in engines.values()]
    for _ in range(args.repeats):
        for b in (1, 16):
            for m, e in engines.items():
                times[(m, b)].append(decode_speed(e, b, args.new_tokens))
    for h in hooks:
        h.remove()
    for e in engines.values():
        e.close()
    print(f"decode tokens/s, {result['model']}, {result['threads']} threads, {args.new_tokens} tokens, "
          f"median of {args.repeats}")
    print("| method | batch 1 | batch 16 (all rows) |\n|---|---|---|")
    for m in args.methods:
        s1, s16 = statistics.median(times[(m, 1)]), statistics.median(times[(m, 16)])
        result["speed"][m] = {"batch_1": round(s1, 1), "batch_16": round(s16, 1)}
        print(f"| {'fp32' if m == 'none' else m} | {s1:.1f} | {s16:.1f} |")
    if args.answers:
        weights = Path(args.answers)
        result["answers"] = {}
        preds = {}
        for m in args.methods:
            e = build(args, m, weights)
            try:
                preds[m], acc = answers(e, Path(args.bench))
            finally:
                e.close()
            differ = sum(a != b for a, b in zip(preds[m], preds.get("none", preds[m]))) / len(preds[m])
            result["answers"][m] = {"accuracy": round(acc, 4), "differs_from_fp32": round(differ, 4)}
            print(f"{'fp32' if m == 'none' else m}: accuracy {acc:.4f}, answers differing from fp32 {differ:.2%}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
