"""Shared bits of the training tests: tiny synthetic data and the flags of a tiny, fast run."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAINER = ROOT / "trainer"


def make_data(out: Path, n: int = 24) -> Path:
    from scripts.make_synthetic_data import make_dataset
    make_dataset(out, seed=0, n_pretrain=n, n_sft=n, n_eval=4)
    return out


def tiny_flags(data: Path, clip: Path, save_dir: Path, **over) -> list[str]:
    """A 64-wide, 2-layer model on the CPU: a few seconds of training."""
    flags = dict(data_path=data, vision_model_path=clip, tokenizer_path=ROOT / "model" / "tokenizer",
                 save_dir=save_dir, hidden_size=64, num_hidden_layers=2, batch_size=2, num_workers=0,
                 log_interval=1, save_interval=2, seed=0, device="cpu", from_weight="none", learning_rate=1e-3)
    flags |= over
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def metrics(path: Path) -> tuple[list[dict], dict]:
    """(step records, final summary) of a metrics log."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "summary" not in r], [r for r in records if "summary" in r][-1]


def subprocess_env() -> dict[str, str]:
    """One thread per process (the tests share two cores), offline, importable from anywhere."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": str(ROOT)}


PYTHON = sys.executable
