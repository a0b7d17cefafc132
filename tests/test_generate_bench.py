"""scripts/bench_decode.py runs and both loops produce the same tokens (speed itself is not tested)."""
from scripts.bench_decode import bench_decode, get_parser


def test_bench_decode_small(tiny_clip):
    r = bench_decode(get_parser().parse_args(["--hidden_size", "64", "--num_hidden_layers", "2",
                                              "--new_tokens", "6", "--repeats", "1", "--prompt_tokens", "10"]))
    assert r["same_tokens"] and r["new_tokens"] == 6 and r["prompt_tokens"] == 206
    assert r["stock_decode_tok_s"] > 0 and r["ours_decode_tok_s"] > 0 and r["ours_ttft_s"] > 0


def test_runs_with_scripts_bench_flags(tiny_clip):
    """scripts/bench.py passes its own args (a CLIP folder as --vision_model_path) plus add_arguments'."""
    import argparse

    from scripts.bench_decode import add_arguments
    ap = argparse.ArgumentParser()
    for flag, default in [("--hidden_size", 64), ("--num_hidden_layers", 2), ("--threads", 0)]:
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--vision_model_path", default=str(tiny_clip))
    ap.add_argument("--device", default="cpu")
    args = add_arguments(ap).parse_args(["--new_tokens", "4", "--repeats", "1", "--prompt_tokens", "8"])
    r = bench_decode(args)
    assert r["clip"] == tiny_clip.name and r["same_tokens"]
