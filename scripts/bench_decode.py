"""Decode speed: transformers' stock `generate` vs our static-cache loop (model/generate.py).

    python scripts/bench_decode.py                 # hidden 512 x 8, 128 new tokens, greedy, batch 1, CPU
    python scripts/bench_decode.py --clip          # real CLIP geometry (random weights) for time to first token

Same random model, same prompt (one image + text), greedy, EOS off so both make exactly
--new_tokens tokens (and must make the same ones). Both loops are timed the same way, by a callback
on every new token: time to first token (TTFT = vision encoder + prefill + first token) and decode
tokens/s over the remaining tokens. Runs alternate stock / ours --repeats times and the median of each
is reported (the machine may be shared). Only timing lives here; tests check behaviour.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from model import RANDOM_CLIP, TINY_CLIP
from model.argtypes import model_width, non_negative_int, positive_int
from model.generate import generate
from model.model_vlm import MiniMindVLM, VLMConfig
from model.processor import vision_geometry


class TokenClock:
    """Timestamps every new token; usable as a transformers streamer (put/end) and as on_token."""

    def __init__(self, skip_prompt: bool):
        self.skip, self.times = skip_prompt, []

    def put(self, value: torch.Tensor) -> None:
        if self.skip:  # transformers first puts the prompt
            self.skip = False
            return
        if value.is_cuda:  # a CUDA token is only queued work until the device has computed it
            torch.cuda.synchronize(value.device)
        self.times.append(time.perf_counter())

    __call__ = put

    def end(self) -> None:
        pass


def timed(run, skip_prompt: bool) -> tuple[torch.Tensor, float, float]:
    """(tokens, ttft seconds, decode tokens/s) of one generation."""
    clock = TokenClock(skip_prompt)
    start = time.perf_counter()
    tokens = run(clock)
    t = clock.times
    return tokens, t[0] - start, (len(t) - 1) / (t[-1] - t[0])


def bench_decode(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    # scripts/bench.py passes its CLIP folder (--vision_model_path); our own --clip picks a stand-in.
    folder = getattr(args, "vision_model_path", None)
    clip = Path(folder) if folder else RANDOM_CLIP if args.clip else TINY_CLIP
    if not (clip / "config.json").exists() and clip in (RANDOM_CLIP, TINY_CLIP):
        from scripts.make_tiny_clip import make_clip
        make_clip(clip, full=clip == RANDOM_CLIP)
    torch.manual_seed(0)
    config = VLMConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers, **vision_geometry(clip))
    model = MiniMindVLM(config, vision_model_path=clip).to(args.device).eval()
    g = torch.Generator().manual_seed(0)
    text = torch.randint(40, config.vocab_size, (args.prompt_tokens,), generator=g)
    ids = torch.cat([text[:8], torch.tensor(config.image_ids), text[8:]])[None].to(args.device)
    px = torch.randn(1, 1, 3, config.image_size, config.image_size, generator=g).to(args.device)
    n = args.new_tokens

    def stock(clock):
        with torch.inference_mode():
            out = model.generate(ids, pixel_values=px, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, streamer=clock)
        return out[:, ids.shape[1]:].cpu()

    def ours(clock):
        return generate(model, ids, pixel_values=px, max_new_tokens=n, eos_token_id=None, on_token=clock)

    timed(stock, True)  # warm-up: first calls pay one-off allocations
    timed(ours, False)
    runs = {"stock": [], "ours": []}
    same = True
    for _ in range(args.repeats):
        a = timed(stock, True)
        b = timed(ours, False)
        runs["stock"].append(a[1:])
        runs["ours"].append(b[1:])
        same &= torch.equal(a[0], b[0])
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in runs.items()}
    result = {
        "device": str(args.device), "threads": torch.get_num_threads(),
        "model": f"hidden {args.hidden_size} x {args.num_hidden_layers}, random weights, fp32" if args.device == "cpu"
                 else f"hidden {args.hidden_size} x {args.num_hidden_layers}",
        "clip": clip.name, "prompt_tokens": ids.shape[1], "new_tokens": n, "repeats": args.repeats,
        "stock_decode_tok_s": round(med["stock"][1], 1), "ours_decode_tok_s": round(med["ours"][1], 1),
        "speedup": round(med["ours"][1] / med["stock"][1], 2),
        "stock_ttft_s": round(med["stock"][0], 4), "ours_ttft_s": round(med["ours"][0], 4),
        "same_tokens": bool(same),
        "all_runs": {k: [[round(t, 4), round(r, 1)] for t, r in v] for k, v in runs.items()},
    }
    return result


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The decode-only flags (scripts/bench.py adds these to its own, which cover the shared ones)."""
    ap.add_argument("--new_tokens", type=positive_int, default=128)
    ap.add_argument("--prompt_tokens", type=non_negative_int, default=32, help="text tokens around the image slot")
    ap.add_argument("--repeats", type=positive_int, default=3, help="alternating stock/ours runs (median reported)")
    return ap


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden_size", type=model_width, default=512)
    ap.add_argument("--num_hidden_layers", type=positive_int, default=8)
    ap.add_argument("--clip", action="store_true",
                    help=f"use the real CLIP geometry ({RANDOM_CLIP.name}, random) instead of the tiny stand-in")
    ap.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the result here")
    return add_arguments(ap)


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    r = bench_decode(args)
    print(f"{r['model']}, {r['device']} ({r['threads']} threads), prompt {r['prompt_tokens']} tokens "
          f"(1 image, {r['clip']}), {r['new_tokens']} new tokens greedy, median of {r['repeats']}")
    print(f"  stock generate : {r['stock_decode_tok_s']:7.1f} tokens/s   TTFT {r['stock_ttft_s'] * 1000:7.1f} ms")
    print(f"  ours           : {r['ours_decode_tok_s']:7.1f} tokens/s   TTFT {r['ours_ttft_s'] * 1000:7.1f} ms")
    print(f"  speedup {r['speedup']}x, same tokens: {r['same_tokens']}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
