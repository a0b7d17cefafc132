"""What a run reports (rank 0 only): a tqdm bar, a JSON-lines metrics log next to the weights,
wandb or swanlab when installed and asked for, and a closing summary."""
from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model.files import atomic_write

log = logging.getLogger("minimind.train")


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch, or this process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def open_tracker(use: bool, project: str, run_name: str, config: dict[str, Any], run_id: str | None) -> Any:
    """A wandb (or else swanlab) run, or None when not asked for or neither is installed."""
    if not use:
        return None
    for name in ("wandb", "swanlab"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        kwargs = dict(project=project, name=run_name, config=config)
        if run_id:
            kwargs |= dict(id=run_id, resume="must" if name == "wandb" else "allow")
        return module.init(**kwargs)
    log.warning("--use_wandb: neither wandb nor swanlab is installed (pip install wandb); not tracking")
    return None


class Progress:
    def __init__(self, enabled: bool, total_steps: int, start_step: int, metrics_path: Path, resumed: bool,
                 tracker: Any = None):
        self.enabled, self.tracker, self.metrics_path = enabled, tracker, metrics_path
        self.bar = None
        if not enabled:
            return
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if resumed and metrics_path.exists():
            # Steps after the resume point will be logged again: drop their earlier records.
            kept = []
            for line in metrics_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the torn last line of a killed run
                if "summary" not in rec and rec.get("step", -1) <= start_step:
                    kept.append(line)
            with atomic_write(metrics_path) as f:  # a kill now must not lose the records kept
                f.write("".join(line + "\n" for line in kept).encode())
        elif not resumed:
            metrics_path.write_text("")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, disable=None)  # disable=None: no bar when stderr is not a terminal

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics record: shown on the bar, appended to the log, sent to the tracker."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 samples_s=f"{record['samples_per_s']:.1f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                 refresh=False)
            if self.bar.disable:  # no terminal (a log file, CI): print the record instead
                print(json.dumps(record), flush=True)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def record(self, record: dict[str, Any]) -> None:
        """A record other than a loss (e.g. benchmark scores): appended to the log, sent to the tracker, shown."""
        if not self.enabled:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                             step=record["step"])
        self.message(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None and not self.bar.disable else print)(text)

    def close(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"summary": True, **summary}) + "\n")
        print("training done: " + ", ".join(f"{k} {v}" for k, v in summary.items()), flush=True)
        if self.tracker is not None:
            self.tracker.finish()
