"""Every numeric flag of the inference entry points and scripts is checked by argparse: a bad value is
argparse's one-line usage error (exit 2, the flag named), never a traceback from deep in the model."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser_of(module: str):
    import importlib
    mod = importlib.import_module(module)
    return mod.get_parser()


# (module whose get_parser() builds the parser, arguments every call needs, flag, bad value)
BAD = [
    ("eval_vlm", [], "--max_new_tokens", "-5"),
    ("eval_vlm", [], "--max_new_tokens", "0"),
    ("eval_vlm", [], "--temperature", "nan"),
    ("eval_vlm", [], "--temperature", "-0.5"),
    ("eval_vlm", [], "--temperature", "inf"),
    ("eval_vlm", [], "--top_p", "-1"),
    ("eval_vlm", [], "--top_p", "0"),
    ("eval_vlm", [], "--top_p", "1.5"),
    ("eval_vlm", [], "--repetition_penalty", "0"),
    ("eval_vlm", [], "--seed", "-1"),
    ("eval_vlm", [], "--batch_size", "0"),
    ("eval_vlm", [], "--bench_limit", "-1"),
    ("eval_vlm", [], "--bench_max_new_tokens", "0"),
    ("eval_vlm", [], "--hidden_size", "0"),
    ("eval_vlm", [], "--num_hidden_layers", "two"),
    ("eval_vlm", [], "--use_moe", "2"),
    ("web_demo", [], "--port", "0"),
    ("web_demo", [], "--port", "70000"),
    ("web_demo", [], "--max_batch", "0"),
    ("scripts.serve_openai_api", [], "--port", "-1"),
    ("scripts.serve_openai_api", [], "--max_batch", "0"),
    ("scripts.serve_openai_api", [], "--threads", "-1"),
    ("scripts.serve_openai_api", [], "--image_cache", "-1"),
    ("scripts.serve_openai_api", [], "--max_queue", "-1"),
    ("scripts.serve_openai_api", [], "--max_context", "1"),
    ("scripts.serve_openai_api", [], "--max_connections", "0"),
    ("scripts.serve_openai_api", [], "--max_body_mb", "0"),
    ("scripts.serve_openai_api", [], "--max_body_mb", "nan"),
    ("scripts.serve_openai_api", [], "--max_images", "-1"),
    ("scripts.serve_openai_api", [], "--max_image_mb", "-2"),
    ("scripts.serve_openai_api", [], "--max_image_pixels", "0"),
    ("scripts.serve_openai_api", [], "--max_n", "0"),
    ("scripts.serve_openai_api", [], "--default_max_tokens", "0"),
    ("scripts.convert_vlm", ["to_hf"], "--hidden_size", "-1"),
    ("scripts.convert_vlm", ["to_hf"], "--num_hidden_layers", "0"),
    ("scripts.convert_vlm", ["to_hf"], "--inference_rope_scaling", "3"),
    ("scripts.bench", [], "--hidden_size", "100"),
    ("scripts.bench", [], "--num_hidden_layers", "0"),
    ("scripts.bench", [], "--batch_size", "0"),
    ("scripts.bench", [], "--max_seq_len", "10"),
    ("scripts.bench", [], "--steps", "0"),
    ("scripts.bench", [], "--warmup", "-1"),
    ("scripts.bench", [], "--threads", "-1"),
    ("scripts.bench", [], "--seed", "-3"),
    ("scripts.bench", [], "--new_tokens", "0"),
    ("scripts.bench_decode", [], "--new_tokens", "0"),
    ("scripts.bench_decode", [], "--prompt_tokens", "-1"),
    ("scripts.bench_decode", [], "--repeats", "0"),
    ("scripts.bench_decode", [], "--hidden_size", "8"),
    ("scripts.bench_quantize", [], "--new_tokens", "0"),
    ("scripts.bench_quantize", [], "--repeats", "0"),
    ("scripts.bench_quantize", [], "--threads", "-1"),
    ("scripts.bench_quantize", [], "--num_hidden_layers", "0"),
    ("scripts.bench_serve", [], "--clients", "0"),
    ("scripts.bench_serve", [], "--baseline_clients", "-1"),
    ("scripts.bench_serve", [], "--max_tokens", "0"),
    ("scripts.bench_serve", [], "--max_batch", "0"),
    ("scripts.check_llamacpp", [], "--new_tokens", "0"),
    ("scripts.check_llamacpp", [], "--bench_tokens", "-1"),
    ("scripts.check_llamacpp", [], "--repeats", "0"),
    ("scripts.check_llamacpp", [], "--threads", "0"),
    ("scripts.make_synthetic_data", [], "--n_eval", "0"),
    ("scripts.make_synthetic_data", [], "--n_pretrain", "x"),
    ("scripts.make_synthetic_data", [], "--seed", "-1"),
    ("scripts.make_tiny_clip", [], "--seed", "-1"),
    ("scripts.plot_metrics", ["m.jsonl"], "--window", "0"),
    ("scripts.quickstart", [], "--seed", "-1"),
]


@pytest.mark.parametrize("module, base, flag, value", BAD, ids=[f"{m.split('.')[-1]}{f}={v}" for m, _, f, v in BAD])
def test_bad_value_is_a_usage_error(module, base, flag, value, capsys):
    parser = parser_of(module)
    with pytest.raises(SystemExit) as info:
        parser.parse_args([*base, flag, value])
    err = capsys.readouterr().err
    assert info.value.code == 2
    last = err.strip().splitlines()[-1]
    assert f"argument {flag}" in last and "Traceback" not in err


@pytest.mark.parametrize("module, argv", [
    ("eval_vlm", ["--temperature", "0", "--top_p", "1", "--repetition_penalty", "1.2", "--seed", "0",
                  "--max_new_tokens", "1", "--bench_limit", "0"]),
    ("scripts.serve_openai_api", ["--port", "65535", "--max_queue", "0", "--max_images", "0", "--max_body_mb", "0.5"]),
    ("scripts.bench", ["--hidden_size", "64", "--warmup", "0", "--threads", "0"]),
    ("scripts.check_llamacpp", ["--bench_tokens", "0"]),
])
def test_edge_values_are_accepted(module, argv):
    parser_of(module).parse_args(argv)


def test_download_refuses_other_sizes(capsys):
    from scripts.download import main
    with pytest.raises(SystemExit) as info:
        main(["--hidden_size", "100"])
    assert info.value.code == 2 and "argument --hidden_size" in capsys.readouterr().err


def test_command_line_shows_one_line_not_a_traceback():
    r = subprocess.run([sys.executable, "eval_vlm.py", "--top_p", "-1"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "eval_vlm.py: error: argument --top_p: must be in (0, 1], got -1"
