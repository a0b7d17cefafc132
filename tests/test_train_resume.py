"""A run SIGKILLed at an arbitrary moment and resumed ends bitwise where an uninterrupted run ends."""
import random
import signal
import subprocess
import time

import torch

from tests.train_helpers import PYTHON, TRAINER, make_data, metrics, subprocess_env, tiny_flags


def run(flags, **kw):
    return subprocess.Popen([PYTHON, str(TRAINER / "train_pretrain_vlm.py"), *flags], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def finish(proc) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def test_kill_and_resume_is_bitwise_identical(tiny_clip, tmp_path):
    data = make_data(tmp_path / "data", n=12) / "pretrain.parquet"
    # Everything trains, a save after every step, two epochs (6 steps each): kills land in saves too.
    flags = dict(freeze_llm=0, epochs=2, save_interval=1)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    second = run(tiny_flags(data, tiny_clip, broken, **flags), cwd=tmp_path)  # any working directory works
    resume = broken / "pretrain_vlm_64_resume.pth"
    deadline = time.time() + 120
    while not resume.exists() and second.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.5))
    assert second.poll() is None, "the run ended before it could be killed"
    second.send_signal(signal.SIGKILL)
    second.wait()
    assert second.returncode == -signal.SIGKILL
    # Whatever the kill interrupted, the files there are complete (a partial save is only a temporary).
    for f in broken.glob("*.pth"):
        torch.load(f, weights_only=True)
    finish(run(tiny_flags(data, tiny_clip, whole, **flags)))
    killed_at = torch.load(resume, weights_only=True)["step"]
    assert 1 <= killed_at < 12

    out = finish(run(tiny_flags(data, tiny_clip, broken, from_resume=1, **flags)))
    assert "resumed from" in out and not list(broken.glob(".*.tmp"))

    for name in ("pretrain_vlm_64.pth", "pretrain_vlm_64_resume.pth"):
        a, b = torch.load(whole / name, weights_only=True), torch.load(broken / name, weights_only=True)
        a, b = (a["model"], b["model"]) if "model" in a else (a, b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    steps, summary = metrics(broken / "pretrain_vlm_64_metrics.jsonl")
    assert [r["step"] for r in steps] == list(range(1, 13))  # the log continues without repeats
    assert [r["loss"] for r in steps] == [r["loss"] for r in metrics(whole / "pretrain_vlm_64_metrics.jsonl")[0]]
    assert summary["steps"] == 12 and summary["samples"] == 2 * (12 - killed_at)
