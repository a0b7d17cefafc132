"""scripts/gpu_summary.py: the recipe's hours from a bench report, and a summary even when steps left nothing."""
import json

import pytest

from scripts.gpu_summary import hours, main


def test_hours_cache_the_later_epochs():
    modes = {"original": {"samples_per_s": 100.0}, "packed": {"samples_per_s": 200.0},
             "packed_cached": {"samples_per_s": 400.0}}
    h = hours(modes, rows=360_000, epochs=4)
    assert h["original"] == pytest.approx(360_000 * 4 / 100 / 3600)  # 4 h
    assert h["ours"] == pytest.approx((360_000 / 200 + 3 * 360_000 / 400) / 3600)  # 0.5 h + 0.75 h


def test_summary_of_missing_and_partial_results(tmp_path, capsys):
    logs, work = tmp_path / "logs", tmp_path / "work"
    (work / "qs0").mkdir(parents=True)
    logs.mkdir()
    (logs / "steps.tsv").write_text("qs0\t124\t300\n")
    (work / "qs0" / "eval.json").write_text(json.dumps(
        {"accuracy": 0.8, "per_kind": {"colour": {"accuracy": 1.0}, "vertical": {"accuracy": 0.6}}}))
    main([str(logs), str(work), "0"])
    out = capsys.readouterr().out
    assert "qs0\t124\t300" in out
    assert "0 | 0.800 | 1.00/0.60 | - | - |" in out  # what is there; the rest marked missing
    assert "no result (see compare.log)" in out and "no result (see bench_pretrain.log)" in out


def test_stage_metrics_survive_a_torn_last_line(tmp_path):
    from scripts.gpu_summary import stage_metrics
    log = tmp_path / "sft_vlm_128_metrics.jsonl"
    records = [{"step": s, "loss": float(s)} for s in (10, 40, 60, 100)] + [{"summary": True, "time_s": 12.5}]
    log.write_text("\n".join(json.dumps(r) for r in records) + '\n{"step": 110, "lo')  # killed mid-write
    loss, seconds = stage_metrics(log)
    assert loss == pytest.approx((60 + 100) / 2) and seconds == 12.5  # steps after 100 - 50
    assert stage_metrics(tmp_path / "absent.jsonl") == (None, None)
