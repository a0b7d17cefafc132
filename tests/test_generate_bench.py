"""scripts/bench_decode.py runs and both loops produce the same tokens (speed itself is not tested)."""
from scripts.bench_decode import bench_decode, get_parser


def test_bench_decode_small(tiny_clip):
    r = bench_decode(get_parser().parse_args(["--hidden_size", "64", "--num_hidden_layers", "2",
                                              "--new_tokens", "6", "--repeats", "1", "--prompt_tokens", "10"]))
    assert r["same_tokens"] and r["new_tokens"] == 6 and r["prompt_tokens"] == 206
    assert r["stock_decode_tok_s"] > 0 and r["ours_decode_tok_s"] > 0 and r["ours_ttft_s"] > 0
