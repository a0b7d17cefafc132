"""scripts/plot_metrics.py: reading trainer logs (torn lines, summaries) and drawing a PNG."""
import json

import pytest

from scripts.plot_metrics import plot, read_metrics, read_scores, smooth


def write_log(path, n=30):
    lines = [json.dumps({"step": i, "loss": 5.0 - 0.1 * i, "lr": 1e-3}) for i in range(1, n + 1)]
    lines.append(json.dumps({"summary": True, "seconds": 12.0}))
    path.write_text("\n".join(lines) + '\n{"step": 31, "lo')  # killed mid-write
    return path


def test_read_metrics_skips_summaries_and_torn_lines(tmp_path):
    steps, losses = read_metrics(write_log(tmp_path / "a.jsonl"))
    assert steps == list(range(1, 31)) and losses[0] == pytest.approx(4.9)


def test_smooth_is_a_centred_mean():
    assert smooth([1, 2, 3, 4], 2) == [1, 2, 3, 4]  # one point each side: a straight line is unchanged
    assert smooth([1, 2, 9, 4, 5], 4) == [1, 4, 4.2, 6, 5]  # two each side, narrower near the ends
    assert smooth([5, 1, 0, 0, 0, 0, 0], 2) == [5, 2, 1 / 3, 0, 0, 0, 0]  # no lag behind a fall
    assert smooth([3, 1], 1) == [3, 1]
    assert smooth([], 10) == []


def test_plot_writes_png(tmp_path):
    out = plot([write_log(tmp_path / "pretrain.jsonl"), write_log(tmp_path / "sft.jsonl")], tmp_path / "p" / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no step/loss records"):
        plot([tmp_path / "empty.jsonl"], tmp_path / "x.png")


def test_scores_are_read_and_drawn_beside_the_loss(tmp_path):
    log = write_log(tmp_path / "sft.jsonl")
    scores = [{"step": s, "eval_file": "eval.parquet", "eval_accuracy": a, "eval_blank_accuracy": b, "eval_chance": 0.25}
              for s, a, b in ((10, 0.3, 0.25), (20, 0.6, None))]
    text = log.read_text().replace("\n", "\n" + json.dumps(scores[0]) + "\n", 1) + "\n" + json.dumps(scores[1])
    log.write_text(text)
    got = read_scores(log)
    assert got["step"] == [10, 20] and got["accuracy"] == [0.3, 0.6] and got["chance"] == [0.25, 0.25]
    assert got["blank"][0] == 0.25 and got["blank"][1] != got["blank"][1]  # a missing baseline is NaN
    assert read_metrics(log)[0] == list(range(1, 31))  # score records are not losses
    assert plot([log], tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
