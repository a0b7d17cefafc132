"""The project's benchmark: the real training step against the original's way of running it.

    python scripts/bench.py --parts train --threads 1    # published pretrain config, CPU, fp32: ~4 minutes
    python scripts/bench.py --steps 5 --vision_model_path model/vision_model/clip-vit-base-patch16

On a machine shared with other work, --threads 1 gives stable numbers: with every core's worth of
threads, each of the step's ~1000 parallel ops waits for a thread the OS gave to someone else,
which costs the short ops of our step far more than the original's long ones.

`train` measures one optimizer step of pretraining (hidden 512 x 8, batch 16, max_seq_len 640,
fp32, --freeze_llm 1) on the synthetic captions (--dtype bfloat16: the trainer's CUDA autocast;
--freeze_llm 0 --max_seq_len 1536 --batch_size 4 --data_path dataset/synthetic/sft.parquet: SFT's shape):
the same rows (the trainer's default uniformly shuffled order) stepped four ways:
  original  every row padded to max_seq_len, full-vocabulary logits at every position, the loss
            masked afterwards (the published scripts' behaviour; our vectorised model underneath,
            so if anything this baseline is faster than the real original);
  padded    trainer/train_loop.py's step with --packing 0: rows padded to the batch's longest,
            lm_head and the loss only at supervised positions, the frozen encoder once per step;
  packed    the same with --packing 1 (the default): the batch's rows packed into sequences of at
            most max_seq_len tokens, attention kept inside each row;
  packed_cached  packed, reading the encoder's features from --feature_cache (what epochs 2+ of a
            multi-epoch run do; the cache is filled during the warm-up).
All four compute the same loss on the same rows (tests/test_learning_equivalence.py); they differ
only in how much padding they compute (pad_share: the share of computed positions that are padding)
and in what they skip. Warm-up steps per mode, then timed steps alternating between the modes (a
busy machine slows all alike); reported are samples/s and tokens/s (real tokens) at the fastest
step time (the least disturbed by other work; the median is in the JSON), the vision encoder's
share of a step, FLOPs per step (torch's FlopCounterMode) and the achieved FLOP/s, and peak memory.
On a GPU whose dense peak is known (`PEAK_TFLOPS`), also the model FLOP utilisation (MFU): the
achieved FLOP/s over that peak at the step's precision.

`decode`: scripts/bench_decode.py's `bench_decode(args) -> dict` runs too and its rows are added (its
`add_arguments(parser)` adds its own flags).

Results: a table on stdout and JSON in --out (default bench_results/bench.json, git-ignored).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from model import PROJECT_TOKENIZER, ROOT, TINY_CLIP, resolve
from model.argtypes import int_range, model_width, non_negative_int, positive_int, seed_int
from model.processor import DEFAULT_PATCHES, IGNORE_INDEX

MODES = ("original", "padded", "packed", "packed_cached")
# Dense (no sparsity) peak TFLOP/s of the SXM parts by device-name fragment, for MFU; "float32" is
# the non-tensor-core rate (TF32 is off by default for matrix products).
PEAK_TFLOPS = {"H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
               "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
               "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}}


def peak_tflops(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """(dense peak TFLOP/s at `dtype`, the assumption in words); None where unknown (the CPU, other GPUs)."""
    if device.type != "cuda":
        return None, "no MFU on the CPU"
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[dtype], f"MFU against {peaks[dtype]:.0f} TFLOP/s, the dense {dtype} peak of an {key} SXM ({name})"
    return None, f"no MFU: the peak of {name} is not in scripts/bench.py's PEAK_TFLOPS"


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="train,decode", help="comma-separated: train, decode")
    ap.add_argument("--hidden_size", type=model_width, default=512)
    ap.add_argument("--num_hidden_layers", type=positive_int, default=8)
    ap.add_argument("--batch_size", type=positive_int, default=16)
    ap.add_argument("--max_seq_len", type=int_range(DEFAULT_PATCHES + 8), default=640,
                    help="room for one image (of the default geometry) and some text")
    ap.add_argument("--steps", type=positive_int, default=3, help="timed steps per mode")
    ap.add_argument("--warmup", type=non_negative_int, default=1, help="untimed steps first")
    ap.add_argument("--vision_model_path", default=str(TINY_CLIP), help="CLIP folder (default: the tiny random stand-in)")
    ap.add_argument("--data_path", default=None, help="caption data (default: synthetic captions, generated once)")
    ap.add_argument("--clip", dest="vision_model_path", help=argparse.SUPPRESS)  # earlier names, still accepted
    ap.add_argument("--data", dest="data_path", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer_path", default=str(PROJECT_TOKENIZER))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="CUDA autocast dtype, as the trainer's --dtype (float16 adds a GradScaler); the CPU runs float32")
    ap.add_argument("--use_compile", type=int, default=0, choices=[0, 1],
                    help="1: torch.compile the decoder stack, as the trainer's --use_compile (compiles in the warm-up)")
    ap.add_argument("--freeze_llm", type=int, default=1, choices=[0, 1, 2],
                    help="as the trainer's: 1 = pretrain (projection + last layer), 0 = SFT (the whole LM)")
    ap.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench_results" / "bench.json"))
    from scripts import bench_decode
    bench_decode.add_arguments(ap)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return get_parser().parse_args(argv)


# ---------------------------------------------------------------------------------------------
def original_step_loss(model, batch: dict, max_seq_len: int, device: torch.device) -> torch.Tensor:
    """The published scripts' step: rows padded to max_seq_len, logits everywhere, masked CE."""
    B, T = batch["input_ids"].shape
    ids = F.pad(batch["input_ids"], (0, max_seq_len - T), value=0).to(device)
    labels = F.pad(batch["labels"], (0, max_seq_len - T), value=IGNORE_INDEX).to(device)
    feats = None
    if batch["pixel_values"] is not None:
        with torch.no_grad():
            feats = model.encode_images(batch["pixel_values"].to(device))
    out = model(input_ids=ids, image_features=feats, num_images=batch["num_images"])
    x, y = out.logits[:, :-1], labels[:, 1:]
    mask = (y != IGNORE_INDEX).float()
    loss = F.cross_entropy(x.reshape(-1, x.shape[-1]), y.clamp(min=0).reshape(-1), reduction="none")
    return (loss * mask.reshape(-1)).sum() / mask.sum() + out.aux_loss


def synthetic_captions(n: int = 256) -> Path:
    from scripts.make_synthetic_data import write_captions
    path = ROOT / "bench_results" / "data" / f"captions_{n}.parquet"
    return path if path.exists() else write_captions(path, n, seed=0)


def bench_train(args: argparse.Namespace) -> list[dict]:
    """Every mode on the same model and rows, in this process. Timed steps alternate between
    the modes, so a machine shared with other work slows both alike and the ratio stays fair.
    Peak memory: each mode's warm-up runs alone, smallest first (on CPU the process high-water
    mark only grows)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dataset.lm_dataset import VLMDataset, collate_fn, collate_packed
    from model.model_vlm import MiniMindVLM, VLMConfig
    from model.processor import MiniMindVLMProcessor, load_tokenizer, vision_geometry
    from trainer.data import RankSampler
    from trainer.feature_cache import FeatureCache
    from trainer.progress import peak_memory_mb
    from trainer.recipe import set_trainable
    from trainer.train_loop import batch_loss, encode_images, optimizer_step, precision

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    config = VLMConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                       **vision_geometry(resolve(args.vision_model_path)))
    model = MiniMindVLM(config, vision_model_path=resolve(args.vision_model_path)).to(device)
    set_trainable(model, args.freeze_llm)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=4e-4)
    autocast, scaler = precision(args.dtype, device)
    if args.use_compile:
        model.model.compile()  # the decoder stack, as the trainer does
    peak_tf, _ = peak_tflops(device, "float32" if isinstance(autocast, nullcontext) else args.dtype)
    processor = MiniMindVLMProcessor.from_config(config, load_tokenizer(resolve(args.tokenizer_path)))
    dataset = VLMDataset(resolve(args.data_path), processor, max_length=args.max_seq_len)
    sampler = RankSampler(dataset.lengths(show_progress=False), args.batch_size, 0, 1, args.seed)
    rows = sampler.order.global_order()[:args.warmup + args.steps]
    items = [[dataset[int(i)] for i in r] for r in rows]  # loaded up front: the step alone is timed
    layouts = {"padded": [collate_fn(it) for it in items],
               "packed": [collate_packed(it, args.max_seq_len) for it in items]}
    layouts["original"] = layouts["padded"]
    layouts["packed_cached"] = layouts["packed"]
    warm, timed = range(args.warmup), range(args.warmup, args.warmup + args.steps)
    model.train()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    cache = FeatureCache(Path(tempfile.mkdtemp(prefix="bench_features_")), {"bench": args.data_path})

    def step(mode: str, i: int) -> float:
        batch = layouts[mode][i]
        sync()
        t = time.perf_counter()
        if mode == "original":
            with autocast:
                loss = original_step_loss(model, batch, args.max_seq_len, device)
        else:
            loss = batch_loss(model, model, batch, device, autocast, cache if mode == "packed_cached" else None)
        scaler.scale(loss).backward()
        optimizer_step(optimizer, scaler, params, 1.0, 4e-4)
        sync()
        return time.perf_counter() - t

    peak = {}
    for mode in ("packed_cached", "packed", "padded", "original"):  # growing peaks (the CPU high-water mark only grows)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warm_s = [step(mode, i) for i in (warm if mode != "packed_cached" else range(len(rows)))]  # fill the cache
        peak[mode] = peak_memory_mb(device)
        print(f"  warm-up {mode}: {peak[mode]:.0f} MB peak, " + " ".join(f"{t:.2f}s" for t in warm_s), flush=True)
    times = {m: [] for m in MODES}
    for k, i in enumerate(timed):
        for mode in (MODES if k % 2 == 0 else tuple(reversed(MODES))):  # alternate who goes first
            times[mode].append(step(mode, i))
        print(f"  step {k + 1}/{len(timed)}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in MODES), flush=True)
    enc = []
    for i in timed:
        batch = layouts["padded"][i]
        sync()
        t = time.perf_counter()
        with autocast:  # as the training step runs it
            encode_images(model, batch["pixel_values"], batch["num_images"])
        sync()
        enc.append(time.perf_counter() - t)
    samples = sum(len(layouts["padded"][i]["index"]) for i in timed)
    tokens = sum(int(layouts["padded"][i]["attention_mask"].sum()) for i in timed)
    result = []
    for mode in MODES:
        # Counted eagerly: a compiled graph would hide its ops from the counter (same ops, same FLOPs).
        with torch.compiler.set_stance("force_eager") if args.use_compile else nullcontext(), \
                FlopCounterMode(display=False) as counter:
            step(mode, timed[0])
        step_s = min(times[mode])  # the least disturbed step: other work on the machine only adds time
        flops = counter.get_total_flops()  # of the first timed batch (the batches are alike in length)
        shapes = [layouts[mode][i]["input_ids"].shape for i in timed]
        computed = sum(len(layouts[mode][i]["index"]) * args.max_seq_len if mode == "original" else s[0] * s[1]
                       for i, s in zip(timed, shapes))
        result.append(dict(mode=mode, step_s=step_s, step_s_median=statistics.median(times[mode]),
                           samples_per_s=samples / len(timed) / step_s, tokens_per_s=tokens / len(timed) / step_s,
                           sequences=statistics.mean(s[0] for s in shapes),
                           seq_len=args.max_seq_len if mode == "original" else statistics.mean(s[1] for s in shapes),
                           pad_share=1 - tokens / computed,
                           vision_share=0.0 if mode == "packed_cached" else min(enc) / step_s,
                           gflop_per_step=flops / 1e9,
                           gflop_per_s=flops / 1e9 / step_s, mfu=flops / step_s / (peak_tf * 1e12) if peak_tf else None,
                           peak_memory_mb=peak[mode], steps=len(times[mode])))
    return result


def table(rows: list[dict]) -> str:
    cols = [("mode", "{}"), ("sequences", "{:.1f}"), ("seq_len", "{:.0f}"), ("pad_share", "{:.1%}"),
            ("step_s", "{:.2f}"), ("step_s_median", "{:.2f}"), ("samples_per_s", "{:.2f}"),
            ("tokens_per_s", "{:.0f}"), ("vision_share", "{:.1%}"), ("gflop_per_step", "{:.0f}"),
            ("gflop_per_s", "{:.1f}"), ("mfu", "{:.1%}"), ("peak_memory_mb", "{:.0f}")]
    lines = [" | ".join(c for c, _ in cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join("-" if r[c] is None else f.format(r[c]) for c, f in cols) for r in rows]
    return "\n".join("| " + line + " |" for line in lines)


def main() -> None:
    args = parse_args()
    if args.data_path is None:
        args.data_path = str(synthetic_captions())
    parts = set(args.parts.split(","))
    result = dict(config=vars(args),
                  machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                               threads=args.threads or torch.get_num_threads(),
                               device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"),
                  time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if "train" in parts:
        device = torch.device(args.device)
        dtype = args.dtype if device.type == "cuda" else "float32"
        result["mfu_assumption"] = peak_tflops(device, dtype)[1]
        print(f"train step: hidden {args.hidden_size} x {args.num_hidden_layers}, batch {args.batch_size}, "
              f"max_seq_len {args.max_seq_len}, --freeze_llm {args.freeze_llm}, {args.device}, "
              f"{dtype if dtype == 'float32' else dtype + ' autocast'}{', compiled' if args.use_compile else ''}, "
              f"{args.steps} timed steps; {result['mfu_assumption']}", flush=True)
        rows = bench_train(args)
        by = {r["mode"]: r for r in rows}
        base = by["original"]
        result["train"] = dict(rows=rows, speedup={m: by[m]["samples_per_s"] / base["samples_per_s"] for m in MODES[1:]},
                               flop_ratio={m: base["gflop_per_step"] / by[m]["gflop_per_step"] for m in MODES[1:]})
        print(table(rows))
        for m in MODES[1:]:
            print(f"speed-up {m} / original: {result['train']['speedup'][m]:.2f}x samples/s, "
                  f"{result['train']['flop_ratio'][m]:.2f}x fewer FLOPs per step")
    if "decode" in parts:
        from scripts.bench_decode import bench_decode
        result["decode"] = bench_decode(args)
        print("decode: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in result["decode"].items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
