"""The training loop in-process on a tiny model: loss falls, weight files, what trains in each stage."""
import pytest
import torch

from model.model_vlm import MiniMindVLM, VLMConfig
from model.weights import load_weights, read_state_dict, save_weights
from tests.train_helpers import make_data, metrics, tiny_flags
from trainer.train_loop import main

TINY = dict(hidden_size=64, num_hidden_layers=2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), n=16)


def test_loss_falls_and_feature_cache_fills(data, tiny_clip, tmp_path):
    cache = tmp_path / "features"
    main("pretrain", tiny_flags(data / "pretrain.parquet", tiny_clip, tmp_path, freeze_llm=0, epochs=5,
                                batch_size=4, learning_rate=3e-3, save_interval=100, feature_cache=cache))
    steps, summary = metrics(tmp_path / "pretrain_vlm_64_metrics.jsonl")
    losses = [r["loss"] for r in steps]
    assert len(losses) == 20 and summary["steps"] == 20
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses  # 8.7 -> ~5.1
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["lr"] > 0 for r in steps)
    assert summary["samples"] == 80 and summary["tokens"] > 80 * 100 and summary["peak_memory_mb"] > 0
    assert len(list(cache.glob("*/*.npy"))) == 16  # every row's features, computed once


def test_weight_file_contents(data, tiny_clip, tmp_path):
    main("pretrain", tiny_flags(data / "pretrain.parquet", tiny_clip, tmp_path, max_steps=2))
    state = torch.load(tmp_path / "pretrain_vlm_64.pth", weights_only=True)
    model = MiniMindVLM(VLMConfig(**TINY))
    assert set(state) == set(model.state_dict())  # no vision encoder here, nothing else missing
    assert not any(k.startswith("vision_encoder.") for k in state)
    assert all(v.dtype == torch.float16 for v in state.values())
    assert state["vision_proj.vision_proj.0.weight"].shape == (64, 768)
    assert load_weights(MiniMindVLM(VLMConfig(**TINY), vision_model_path=tiny_clip),
                        tmp_path / "pretrain_vlm_64.pth")["missing"] == [
        k for k in MiniMindVLM(VLMConfig(**TINY), vision_model_path=tiny_clip).state_dict() if k.startswith("vision_encoder.")]
    resume = torch.load(tmp_path / "pretrain_vlm_64_resume.pth", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "samples", "step", "world_size", "rng"} <= set(resume)
    assert resume["step"] == 2 and resume["world_size"] == 1
    assert all(v.dtype == torch.float32 for v in resume["model"].values())
    assert not any(k.startswith("vision_encoder.") for k in resume["model"])
    assert not list(tmp_path.glob(".*.tmp"))  # no temporaries left behind


def test_what_trains_in_each_stage(data, tiny_clip, tmp_path):
    torch.manual_seed(0)
    save_weights(MiniMindVLM(VLMConfig(**TINY)), tmp_path / "start_64.pth")
    start = read_state_dict(tmp_path / "start_64.pth")
    main("pretrain", tiny_flags(data / "pretrain.parquet", tiny_clip, tmp_path, from_weight="start", max_steps=2,
                                save_weight="stage1"))
    stage1 = read_state_dict(tmp_path / "stage1_64.pth")
    changed = {k for k in start if not torch.equal(start[k], stage1[k])}
    assert changed == {k for k in start if k.startswith(("vision_proj.", "model.layers.1."))}
    # --from_weight NAME is looked up in --save_dir
    main("sft", tiny_flags(data / "sft.parquet", tiny_clip, tmp_path, from_weight="stage1", max_steps=2,
                           save_weight="stage2"))
    stage2 = read_state_dict(tmp_path / "stage2_64.pth")
    assert {k for k in stage1 if torch.equal(stage1[k], stage2[k])} == set()
    with pytest.raises(FileNotFoundError, match="--from_weight none"):
        main("sft", tiny_flags(data / "sft.parquet", tiny_clip, tmp_path, from_weight="nothing_here"))
