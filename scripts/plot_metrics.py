"""Draw loss curves from the trainer's metrics logs (JSON lines with at least `step` and `loss`), with the
benchmark scores of `--eval_data` runs (records with `eval_accuracy`) on a second axis beside them.

    python scripts/plot_metrics.py out/pretrain_vlm_512_metrics.jsonl out/sft_vlm_512_metrics.jsonl -o loss.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from model import resolve
from model.argtypes import positive_int


def read_metrics(path: str | Path) -> tuple[list[float], list[float]]:
    """(steps, losses) from a JSON-lines log; lines without a loss (summaries) and torn last lines are skipped."""
    steps, losses = [], []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves a partial last line
        if isinstance(rec, dict) and "loss" in rec and "step" in rec:
            steps.append(float(rec["step"]))
            losses.append(float(rec["loss"]))
    return steps, losses


def read_scores(path: str | Path) -> dict[str, list[float]]:
    """The `--eval_data` records of a log: steps, accuracy, blank-image accuracy and chance (empty lists if none)."""
    out: dict[str, list[float]] = {"step": [], "accuracy": [], "blank": [], "chance": []}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "eval_accuracy" in rec and "step" in rec:
            out["step"].append(float(rec["step"]))
            out["accuracy"].append(float(rec["eval_accuracy"]))
            out["blank"].append(float("nan") if rec.get("eval_blank_accuracy") is None else rec["eval_blank_accuracy"])
            out["chance"].append(float(rec.get("eval_chance") or float("nan")))
    return out


def draw_scores(ax, scores: dict[str, list[float]]) -> list:
    """The scores on a twin axis of a loss panel; returns its lines for the legend."""
    twin = ax.twinx()
    lines = twin.plot(scores["step"], scores["accuracy"], "o-", color="tab:red", label="score")
    lines += twin.plot(scores["step"], scores["blank"], "s--", color="tab:gray", label="score, images blanked")
    lines += twin.plot(scores["step"], scores["chance"], ":", color="black", label="chance")
    twin.set(ylabel="score", ylim=(0, 1))
    return lines


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average over up to `window // 2` points on each side (window 1 = raw).

    Centred, not trailing (a trailing mean lags a falling loss by half a window), and symmetric at the
    ends too: near an end the window narrows on both sides, so the first and last points are raw."""
    csum = [0.0]
    for v in values:
        csum.append(csum[-1] + v)
    n, out = len(values), []
    for i in range(n):
        h = min(window // 2, i, n - 1 - i)
        out.append((csum[i + h + 1] - csum[i - h]) / (2 * h + 1))
    return out


def plot(logs: list[Path], out: Path, labels: list[str] | None = None, window: int = 10) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(5 * len(logs), 3.6), squeeze=False)
    for ax, log, label in zip(axes[0], logs, labels or [p.stem.removesuffix("_metrics") for p in logs]):
        steps, losses = read_metrics(log)
        if not steps:
            raise ValueError(f"{log} holds no step/loss records: is it a trainer metrics log?")
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
        ax.plot(steps, smooth(losses, window), color="tab:blue", linewidth=1.8,
                label=f"centred mean of {2 * (window // 2) + 1}")
        ax.set(title=label, xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        handles = ax.get_lines()
        scores = read_scores(log)
        if scores["step"]:
            handles += draw_scores(ax, scores)
        ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="metrics .jsonl files, one panel each")
    ap.add_argument("-o", "--out", default="loss.png", help="output PNG")
    ap.add_argument("--labels", nargs="*", default=None, help="panel titles (default: file names)")
    ap.add_argument("--window", type=positive_int, default=10, help="moving-average window (1: none)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    print(plot([resolve(p) for p in args.logs], Path(args.out), args.labels, args.window))


if __name__ == "__main__":
    main()
