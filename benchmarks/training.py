"""Scores during training: `--eval_data FILE [--eval_interval STEPS --eval_limit N --eval_method M]` on both
trainer scripts. Rank 0 scores the current weights on the first N items of a benchmark (or Q&A) file,
with the images and with them blanked, and the trainer writes the numbers into its metrics log (and
wandb/swanlab) as a record {"step", "eval_accuracy", "eval_blank_accuracy", "eval_chance", ...}."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from model import resolve
from model.argtypes import non_negative_int
from model.chat import ChatInputError

from .readers import detect_format
from .run import evaluate


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("scores during training")
    g.add_argument("--eval_data", default=None, help="benchmark or Q&A file (or folder of shards) to score the "
                   "current weights on, on rank 0 (see eval_vlm.py --bench)")
    g.add_argument("--eval_interval", type=non_negative_int, default=500, help="optimizer steps between scores (and at the end)")
    g.add_argument("--eval_limit", type=non_negative_int, default=200, help="score the first N items (0: all)")
    g.add_argument("--eval_method", default="loglik", choices=["loglik", "generate", "both"],
                   help="option log-likelihood (fast, meaningful early), generation, or both")


def check_eval_data(args: argparse.Namespace) -> str | None:
    """Fail before training, not at the first score, when --eval_data cannot be read."""
    return detect_format(resolve(args.eval_data)) if args.eval_data else None


def due(args: argparse.Namespace, step: int, finished: bool) -> bool:
    return bool(args.eval_data) and (finished or (args.eval_interval > 0 and step % args.eval_interval == 0))


def score_record(model: Any, tokenizer: Any, args: argparse.Namespace, step: int, autocast: Any) -> dict[str, Any]:
    """Score the model (in eval mode, restored afterwards) and return the metrics-log record."""
    t0 = time.perf_counter()
    try:
        with autocast:
            report = evaluate(model, tokenizer, resolve(args.eval_data), limit=args.eval_limit,
                              methods=args.eval_method, show_progress=False, echo=False)
    except ChatInputError as e:  # e.g. no row could be scored: report it, never stop a training run for it
        return {"step": step, "eval_file": Path(args.eval_data).name, "eval_error": str(e)}
    return {"step": step, "eval_file": Path(args.eval_data).name, "eval_format": report["format"],
            "eval_method": report["method"], "eval_accuracy": report["accuracy"],
            "eval_blank_accuracy": report["blank_accuracy"], "eval_chance": report["chance"],
            "eval_rows": report["rows"], "eval_seconds": round(time.perf_counter() - t0, 2)}
