"""scripts/bench.py's training part runs every mode on the same rows (speed itself is not tested)."""
import pytest

from scripts.bench import MODES, bench_train, parse_args
from tests.train_helpers import make_data

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_train_small(tiny_clip, tmp_path):
    data = make_data(tmp_path, n=16) / "sft.parquet"  # one- and two-image rows: lengths vary
    args = parse_args(["--parts", "train", "--hidden_size", "64", "--num_hidden_layers", "2", "--batch_size", "6",
                       "--steps", "1", "--warmup", "1", "--clip", str(tiny_clip), "--data", str(data)])
    rows = {r["mode"]: r for r in bench_train(args)}
    assert tuple(rows) == MODES
    assert all(r["samples_per_s"] > 0 and r["gflop_per_step"] > 0 for r in rows.values())
    # the same rows every way: packing computes the fewest padding positions, the original the most
    assert rows["packed"]["pad_share"] < rows["padded"]["pad_share"] < rows["original"]["pad_share"]
    assert rows["packed"]["sequences"] < rows["padded"]["sequences"] == 6
    assert rows["original"]["gflop_per_step"] > rows["padded"]["gflop_per_step"]


def test_bench_train_sft_shape_and_precision_flags(tiny_clip, tmp_path):
    """--freeze_llm 0 (SFT) backpropagates through the whole LM: more FLOPs than pretraining's 1; --dtype
    bfloat16 is the trainer's CUDA autocast, so the CPU still runs float32, and there is no MFU without a GPU."""
    data = make_data(tmp_path, n=16) / "sft.parquet"
    base = ["--parts", "train", "--hidden_size", "64", "--num_hidden_layers", "2", "--batch_size", "4", "--steps", "1",
            "--warmup", "1", "--clip", str(tiny_clip), "--data", str(data), "--dtype", "bfloat16"]
    flops = {}
    for freeze in ("0", "1"):
        rows = {r["mode"]: r for r in bench_train(parse_args([*base, "--freeze_llm", freeze]))}
        flops[freeze] = rows["padded"]["gflop_per_step"]
        assert all(r["mfu"] is None for r in rows.values())
    assert flops["0"] > flops["1"]
