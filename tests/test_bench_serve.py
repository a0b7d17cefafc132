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
