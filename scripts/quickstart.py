"""Offline quickstart: from nothing to a trained MiniMind-V that reads images, on a CPU, in one command.

    python scripts/quickstart.py

1. writes a randomly initialised CLIP stand-in (scripts/make_tiny_clip.py) and the seeded synthetic
   task (scripts/make_synthetic_data.py): coloured shapes, questions about colour and position;
2. pretrains, then fine-tunes, a small MiniMind-V with the real trainer scripts (trainer/);
3. scores the held-out eval file with `eval_vlm.py --bench`, once with the images and once with
   every image blanked (text-only guessing: near chance by construction);
4. draws both stages' loss curves (scripts/plot_metrics.py) and prints a table ending in `accuracy: X`.

Everything lands in out/quickstart/ and dataset/synthetic/; a rerun reuses what exists (--force redoes it).
No network is needed: the tokenizer is the project's own (model/tokenizer).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from model import PROJECT_TOKENIZER, ROOT, TINY_CLIP, resolve
from model.argtypes import seed_int

# A small model and a short schedule that fit the synthetic task into 12-15 minutes on two CPU cores
# (hidden 128 learns as much per step as 256 here, at about half the cost).
HIDDEN, LAYERS = 128, 4
STAGES = {
    # The LM starts from random weights (there is no llm_128.pth), so both stages train it all
    # (--freeze_llm 0). Stage 1's file holds only left/right questions (about one image, or about the
    # first/second of two): a model that first learns colour by averaging the image never learns to
    # find the shape (scripts/make_synthetic_data.py has the measurements).
    "pretrain": dict(script="trainer/train_pretrain_vlm.py", data="pretrain.parquet", from_weight="none",
                     lr=1e-3, batch_size=16, max_seq_len=640, max_steps=0),  # one epoch: 250 steps
    "sft": dict(script="trainer/train_sft_vlm.py", data="sft.parquet", from_weight="pretrain_vlm",
                lr=1e-3, batch_size=16, max_seq_len=640, max_steps=0),  # 0: one full epoch (375 steps)
}
DATA_SIZES = dict(n_pretrain=4000, n_sft=6000, n_eval=400, eval_kinds="colour,horizontal,vertical,two_images")


def run(cmd: list[str], log: Path | None = None) -> None:
    """Run a step as its own process (the real scripts, as a user would), output streaming through."""
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"quickstart: step failed (exit {result.returncode}): {' '.join(map(str, cmd))}")


def model_flags(out_dir: Path) -> list[str]:
    return ["--hidden_size", HIDDEN, "--num_hidden_layers", LAYERS, "--save_dir", out_dir,
            "--tokenizer_path", PROJECT_TOKENIZER, "--vision_model_path", TINY_CLIP]


# --smoke: the same steps, cut to a few training steps and eval questions (checks the plumbing; scores mean nothing).
SMOKE_STEPS, SMOKE_QUESTIONS = 3, 16


def train(stage: str, data_dir: Path, out_dir: Path, force: bool, seed: int, smoke: bool = False) -> float:
    cfg = STAGES[stage]
    weights = out_dir / f"{stage}_vlm_{HIDDEN}.pth"
    if weights.exists() and not force:
        print(f"[{stage}] reusing {weights}")
        return 0.0
    (out_dir / f"{stage}_vlm_{HIDDEN}_metrics.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()
    run([cfg["script"], *model_flags(out_dir), "--data_path", data_dir / cfg["data"],
         "--from_weight", cfg["from_weight"], "--freeze_llm", 0, "--learning_rate", cfg["lr"],
         "--batch_size", cfg["batch_size"], "--max_seq_len", cfg["max_seq_len"], "--epochs", 1,
         "--max_steps", SMOKE_STEPS if smoke else cfg["max_steps"], "--num_workers", 1, "--log_interval", 5,
         "--save_interval", 50, "--seed", seed])
    return time.perf_counter() - t0


def score(data_dir: Path, out_dir: Path, blank: bool, force: bool, smoke: bool = False) -> dict:
    report = out_dir / f"eval{'_blank' if blank else ''}.json"
    if not report.exists() or force:
        run(["eval_vlm.py", *model_flags(out_dir), "--weight", "sft_vlm", "--bench", data_dir / "eval.parquet",
             "--bench_out", report, "--temperature", 0, "--bench_method", "generate", "--bench_baseline", 0,
             *(["--blank_image"] if blank else []),  # its own blank run: the two reports as before
             *(["--bench_limit", SMOKE_QUESTIONS] if smoke else [])])
    return json.loads(report.read_text())


def table(real: dict, blank: dict) -> str:
    kinds = sorted(real["per_kind"])
    head = f"{'model':32s}" + "".join(f"{k:>12s}" for k in kinds) + f"{'all':>10s}"
    rows = [head, "-" * len(head)]
    for name, rep in (("trained, with its images", real), ("same model, images blanked", blank)):
        rows.append(f"{name:32s}" + "".join(f"{rep['per_kind'][k]['accuracy']:12.3f}" for k in kinds)
                    + f"{rep['accuracy']:10.3f}")
    return "\n".join(rows)


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=seed_int, default=0, help="seed of both training runs (model init and data order); "
                    "the synthetic task itself is always seed 0, so every seed is scored on the same questions")
    ap.add_argument("--out", default=None, help="weights, logs, scores and the loss plot "
                    "(default: out/quickstart, or out/quickstart_seedN for --seed N > 0)")
    ap.add_argument("--data", default="dataset/synthetic", help="where the synthetic task is written")
    ap.add_argument("--force", action="store_true", help="redo every step even if its output exists")
    ap.add_argument("--smoke", action="store_true", help=f"a plumbing check: {SMOKE_STEPS} steps per stage, "
                    f"{SMOKE_QUESTIONS} eval questions (the score means nothing)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    out_dir = resolve(args.out or ("out/quickstart" if args.seed == 0 else f"out/quickstart_seed{args.seed}"))
    data_dir = resolve(args.data)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    from scripts.make_tiny_clip import make_clip
    print(f"[clip] stand-in at {make_clip(TINY_CLIP)}")
    run(["scripts/make_synthetic_data.py", "--out", data_dir, "--seed", 0,
         *[a for k, v in DATA_SIZES.items() for a in (f"--{k}", v)], *(["--overwrite"] if args.force else [])])
    times = {stage: train(stage, data_dir, out_dir, args.force, args.seed, args.smoke) for stage in STAGES}
    redo = args.force or any(times.values())
    real = score(data_dir, out_dir, blank=False, force=redo, smoke=args.smoke)
    blank = score(data_dir, out_dir, blank=True, force=redo, smoke=args.smoke)

    from scripts.plot_metrics import plot
    png = plot([out_dir / f"{s}_vlm_{HIDDEN}_metrics.jsonl" for s in STAGES], out_dir / "loss.png",
               labels=[f"{s} (hidden {HIDDEN} x {LAYERS})" for s in STAGES])
    print(f"\nloss curves: {png}")
    print(f"weights: {out_dir / f'sft_vlm_{HIDDEN}.pth'}   total time: {(time.perf_counter() - t0) / 60:.1f} min")
    print("chance level: colour 1/6, horizontal (left/right) 1/2, vertical (top/bottom) 1/2, two_images 1/6\n")
    print(table(real, blank))
    print(f"accuracy: {real['accuracy']:.4f}")


if __name__ == "__main__":
    main()
