"""The one-page summary of scripts/gpu_measure.sh: every figure its steps wrote, read back from their files.

    python scripts/gpu_summary.py LOG_DIR WORK_DIR     # prints it; gpu_measure.sh saves it as LOG_DIR/summary.txt

A step that failed or ran out of time shows as missing figures, never as an error here.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from scripts.plot_metrics import read_metrics
from scripts.quickstart import HIDDEN

# The published recipe's data and epochs (rows of the caption and instruction files).
RECIPE = {"pretrain": dict(rows=595_000, epochs=4), "sft": dict(rows=300_000, epochs=2)}
# The same quickstart on a CPU (torch 2.13, uniform order + packing), seeds 0 1 2: score, and the mean
# loss over each stage's last 50 steps.
CPU_REFERENCE = {0: (0.910, 0.111, 0.103), 1: (0.910, 0.071, 0.109), 2: (0.915, 0.080, 0.102)}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage_metrics(path: Path) -> tuple[float | None, float | None]:
    """(mean loss over the last 50 steps, seconds) of a trainer metrics file; None where absent. A run killed
    by its time limit may leave a torn last line: read_metrics skips it, and so does the summary lookup."""
    try:
        steps, losses = read_metrics(path)
        lines = path.read_text().splitlines()
    except OSError:
        return None, None
    tail = [loss for step, loss in zip(steps, losses) if step > steps[-1] - 50] if steps else []
    seconds = None
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "summary" in rec:
            seconds = rec.get("time_s")
    return (sum(tail) / len(tail) if tail else None), seconds


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def quickstart_section(logs: Path, work: Path, seeds: list[int]) -> list[str]:
    lines = ["## 1. Quickstart on the GPU (bf16 autocast training, bf16 scoring), seeds run concurrently",
             "seed | GPU score | per kind (colour/horizontal/two_images/vertical) | blanked | same weights on CPU fp32 "
             "| pretrain last-50 loss | SFT last-50 loss | pretrain s | SFT s | CPU run: score, pretrain, SFT loss"]
    for seed in seeds:
        qs = work / f"qs{seed}"
        real, blank = read_json(qs / "eval.json"), read_json(qs / "eval_blank.json")
        cpu = read_json(logs / f"qs{seed}_cpu_eval.json")
        (pl, pt), (sl, st) = (stage_metrics(qs / f"{stage}_vlm_{HIDDEN}_metrics.jsonl") for stage in ("pretrain", "sft"))
        kinds = "/".join(f"{v['accuracy']:.2f}" for _, v in sorted(real["per_kind"].items())) if real else "-"
        ref = CPU_REFERENCE.get(seed)
        lines.append(" | ".join([str(seed), fmt(real and real["accuracy"]), kinds, fmt(blank and blank["accuracy"]),
                                 fmt(cpu and cpu["accuracy"]), fmt(pl), fmt(sl), fmt(pt, ".0f"), fmt(st, ".0f"),
                                 ", ".join(fmt(x) for x in ref) if ref else "-"]))
    return lines


def compare_section(logs: Path) -> list[str]:
    report = read_json(logs / "compare.json")
    if report is None:
        return ["## 2. CPU vs GPU, the same batches: no result (see compare.log)"]
    from scripts.compare_devices import table
    return [f"## 2. CPU fp32 vs {report['device_name']}, the same start and {report['steps']} SFT batches "
            f"(reference losses {report['reference_losses'][0]:.4f} .. {report['reference_losses'][-1]:.4f})",
            table(report["rows"])]


def hours(modes: dict[str, dict], rows: int, epochs: int) -> dict[str, float]:
    """Hours of `epochs` over `rows` rows at each way's samples/s; ours caches the frozen encoder's
    features from epoch 2 on (the first epoch packed, the rest packed_cached)."""
    sps = {m: r["samples_per_s"] for m, r in modes.items()}
    return {"original": rows * epochs / sps["original"] / 3600,
            "ours": rows * (1 / sps["packed"] + (epochs - 1) / sps["packed_cached"]) / 3600}


def bench_section(logs: Path) -> list[str]:
    from scripts.bench import table
    lines = ["## 3. Training throughput, full-geometry CLIP stand-in (random ViT-B/16)"]
    for stage in ("pretrain", "sft"):
        report = read_json(logs / f"bench_{stage}.json")
        if report is None or "train" not in report:
            lines.append(f"{stage}: no result (see bench_{stage}.log)")
            continue
        cfg, rows = report["config"], {r["mode"]: r for r in report["train"]["rows"]}
        h = hours(rows, **RECIPE[stage])
        lines += [f"{stage} shape: hidden {cfg['hidden_size']} x {cfg['num_hidden_layers']}, batch {cfg['batch_size']}, "
                  f"max_seq_len {cfg['max_seq_len']}, --freeze_llm {cfg['freeze_llm']}, {cfg['dtype']}"
                  f"{', compiled' if cfg.get('use_compile') else ''}; {report.get('mfu_assumption', '')}",
                  table(report["train"]["rows"]),
                  f"published {stage} ({RECIPE[stage]['rows']:,} rows x {RECIPE[stage]['epochs']} epochs) on this GPU, "
                  f"at these synthetic rows' lengths: original {h['original']:.1f} h, ours {h['ours']:.1f} h "
                  f"(epoch 1 packed, later epochs from the feature cache)"]
    return lines


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] in ("-h", "--help"):
        raise SystemExit("usage: python scripts/gpu_summary.py LOG_DIR WORK_DIR [SEEDS, e.g. 0,1,2] "
                         "(gpu_measure.sh runs it; it prints the summary)")
    logs, work = Path(args[0]), Path(args[1])
    seeds = [int(s) for s in (args[2] if len(args) > 2 else "0,1,2").split(",")]
    device = (logs / "device.txt").read_text().strip() if (logs / "device.txt").exists() else "unknown device"
    steps = (logs / "steps.tsv").read_text().strip() if (logs / "steps.tsv").exists() else ""
    print(f"# gpu_measure.sh on {device}\n## steps (name, exit status: 124 = out of time, seconds)\n{steps}")
    for section in (lambda: quickstart_section(logs, work, seeds), lambda: compare_section(logs),
                    lambda: bench_section(logs)):
        try:  # one section's unreadable files must not cost the others
            print("\n" + "\n".join(section()))
        except Exception as e:  # noqa: BLE001 -- reported in the summary itself
            print(f"\n(a section failed: {type(e).__name__}: {e})")


if __name__ == "__main__":
    main()
