"""scripts/bench_serve.py's client side against an in-process server (speed itself is not tested)."""
import pytest

from tests.infer_helpers import model_args, running_server, tiny_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_run_level_counts_every_request(tmp_path, tiny_clip):
    from model.engine import Engine
    from model.load import load_model
    from scripts.bench_serve import run_level
    from scripts.serve_openai_api import create_app
    tiny_weights(tmp_path)
    with running_server(create_app(Engine(*load_model(model_args(tmp_path, tiny_clip)), max_batch=4), "t")) as url:
        for workload in ("text", "image"):
            r = run_level(url, workload, 3, 5)
            assert r["finished"] == 3 and 0 < r["tokens"] <= 15 and r["tokens_per_s"] > 0
            assert r["ttft_p50"] <= r["ttft_p95"] and len(r["answers"]) == 3


def test_summary_takes_the_speed_up_round_by_round():
    from scripts.bench_serve import summarize

    def row(mode, clients, rnd, tps, finished=None):
        return {"mode": mode, "workload": "text", "clients": clients, "round": rnd, "tokens_per_s": tps,
                "finished": clients if finished is None else finished, "ttft_p50": 0.1, "ttft_p95": 0.2,
                "itl_p50": 0.01, "itl_p95": 0.02}
    rows = [row("batched", 16, 0, 600.0), row("one at a time", 16, 0, 100.0),
            row("batched", 16, 1, 300.0), row("one at a time", 16, 1, 100.0),   # a slow round for both
            row("batched", 16, 2, 800.0, finished=15), row("one at a time", 16, 2, 200.0),
            row("batched", 4, 0, 350.0)]  # no one-at-a-time level of 4: the largest one of its round counts
    lines = {(r["clients"], r["mode"]): r for r in summarize(rows)}
    b16 = lines[(16, "batched")]
    assert b16["speedups"] == [6.0, 3.0, 4.0] and b16["speedup"] == 4.0
    assert (b16["speedup_min"], b16["speedup_max"]) == (3.0, 6.0)
    assert b16["tokens_per_s"] == 600.0 and b16["requests"] == 48 and b16["finished"] == 47
    assert lines[(4, "batched")]["speedups"] == [3.5]
    assert "speedup" not in lines[(16, "one at a time")]


def test_a_level_whose_requests_all_fail_is_reported_not_raised(capsys):
    import math

    from scripts.bench_serve import free_port, run_level
    r = run_level(f"http://127.0.0.1:{free_port()}", "text", 2, 4)  # nobody listens there
    assert r["finished"] == 0 and r["tokens"] == 0 and math.isnan(r["tokens_per_s"])
    assert "2 of 2 requests failed" in capsys.readouterr().out
