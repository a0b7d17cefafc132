"""--eval_data on the trainer scripts: scores of the current weights in the metrics log, on rank 0."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import bench_fixtures as fx
from tests.train_helpers import make_data, metrics, tiny_flags
from trainer.train_loop import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scores_are_logged_during_training(tiny_clip, tmp_path):
    data = make_data(tmp_path / "data", n=8)
    main("sft", tiny_flags(data / "sft.parquet", tiny_clip, tmp_path, max_steps=3, eval_data=data / "eval.parquet",
                           eval_interval=2, eval_limit=3, log_interval=2))
    records, summary = metrics(tmp_path / "sft_vlm_64_metrics.jsonl")
    scores = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in scores] == [2, 3]  # every --eval_interval steps and at the end
    for r in scores:
        assert r["eval_format"] == "qa" and r["eval_method"] == "loglik_mean" and r["eval_rows"] == 3
        assert 0 <= r["eval_accuracy"] <= 1 and 0 <= r["eval_blank_accuracy"] <= 1 and 0 < r["eval_chance"] <= 1
    assert [r["step"] for r in records if "loss" in r] == [2, 3] and summary["steps"] == 3


def test_a_public_benchmark_during_pretraining_and_a_bad_file(tiny_clip, tmp_path):
    data = make_data(tmp_path / "data", n=4)
    pope = fx.pope(tmp_path / "pope" / "test-00000-of-00001.parquet", n=4).parent
    main("pretrain", tiny_flags(data / "pretrain.parquet", tiny_clip, tmp_path, max_steps=1, eval_data=pope))
    records, _ = metrics(tmp_path / "pretrain_vlm_64_metrics.jsonl")
    assert [(r["step"], r["eval_format"], r["eval_chance"]) for r in records if "eval_accuracy" in r] == [(1, "pope", 0.5)]
    odd = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"label": [1]}), odd)
    with pytest.raises(ValueError, match=r"odd.parquet: its columns \(label\) match no benchmark layout"):
        main("pretrain", tiny_flags(data / "pretrain.parquet", tiny_clip, tmp_path / "x", max_steps=1,
                                    eval_data=odd))  # before any training step
    assert not (tmp_path / "x" / "pretrain_vlm_64.pth").exists()
