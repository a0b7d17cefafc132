"""The trainer's pure pieces: schedule, freezing, resume arithmetic, world-size-free data order, feature cache."""
import math

import numpy as np
import pytest
import torch

from model.model_vlm import MiniMindVLM, VLMConfig
from trainer.data import RankSampler
from trainer.feature_cache import FeatureCache
from trainer.recipe import Position, get_lr, resume_position, set_trainable, steps_per_epoch
from trainer.train_loop import build_parser

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
            max_position_embeddings=256)


def test_lr_schedule_is_the_published_cosine():
    assert get_lr(0, 100, 4e-4) == pytest.approx(4e-4)
    assert get_lr(50, 100, 4e-4) == pytest.approx(4e-4 * 0.55)
    assert get_lr(100, 100, 4e-4) == pytest.approx(4e-5)
    lrs = [get_lr(t, 100, 1.0) for t in range(101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # no warm-up, monotone decay


def test_stage_defaults_follow_spec():
    pre, sft = build_parser("pretrain").parse_args([]), build_parser("sft").parse_args([])
    assert (pre.epochs, pre.batch_size, pre.learning_rate, pre.max_seq_len) == (4, 16, 4e-4, 640)
    assert (sft.epochs, sft.batch_size, sft.learning_rate, sft.max_seq_len) == (2, 4, 1e-6, 1536)
    assert (pre.from_weight, pre.save_weight, sft.from_weight, sft.save_weight) == (
        "llm", "pretrain_vlm", "pretrain_vlm", "sft_vlm")
    assert pre.data_path.endswith("pretrain_data.parquet") and sft.data_path.endswith("sft_data.parquet")
    assert (pre.freeze_llm, sft.freeze_llm, pre.grad_clip, pre.accumulation_steps) == (1, 0, 1.0, 1)


def test_which_parameters_train(tiny_clip):
    model = MiniMindVLM(VLMConfig(**TINY), vision_model_path=tiny_clip)
    everything = {n for n, _ in model.named_parameters() if not n.startswith("vision_encoder.")}
    pretrain = set(set_trainable(model, 1))
    assert pretrain == {n for n in everything if n.startswith(("vision_proj.", "model.layers.2."))}
    assert set(set_trainable(model, 2)) == {n for n in everything if n.startswith("vision_proj.")}
    sft = set(set_trainable(model, 0))
    # tied head: named_parameters lists the shared tensor once, as the embedding
    assert sft == everything and model.lm_head.weight.requires_grad
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    with pytest.raises(ValueError):
        set_trainable(model, 3)


def test_resume_position_same_and_changed_world_size():
    # 10 batches of 4 per epoch; saved after 3 steps of 2 ranks x 4 rows
    assert resume_position(0, 24, 40, 4, 2, 1, 5) == Position(0, 24, 3)
    # the same samples on 4 ranks: same sample, step recomputed for 3 batches per rank
    assert resume_position(0, 24, 40, 4, 4, 1, 3) == Position(0, 24, 2)
    # a finished epoch continues with the next one
    assert resume_position(1, 40, 40, 4, 2, 1, 5) == Position(2, 0, 10)
    assert steps_per_epoch(5, 2) == 3


def rows_in_step_order(lengths, batch, world, seed, epoch, skip=0):
    """Rows of an epoch in the order the ranks consume them, step by step."""
    per_rank = []
    for r in range(world):
        s = RankSampler(lengths, batch, r, world, seed)
        s.set_epoch(epoch, skip)
        per_rank.append(np.array(list(s)).reshape(-1, batch))
    assert len({len(p) for p in per_rank}) == 1  # every rank takes the same number of steps
    return np.stack(per_rank, axis=1).reshape(-1)


def test_data_order_is_world_size_free_and_resumes_at_the_right_sample():
    lengths = np.random.default_rng(0).integers(10, 100, size=50)
    one = rows_in_step_order(lengths, 4, 1, seed=3, epoch=1)
    assert set(one) == set(range(50))  # 13 batches of 4: every row, two of them twice
    two = rows_in_step_order(lengths, 4, 2, seed=3, epoch=1)
    three = rows_in_step_order(lengths, 4, 3, seed=3, epoch=1)
    n = 13 * 4  # 13 batches; the wrapped tail differs with the world size
    assert (two[:n] == one[:n]).all() and (three[:n] == one[:n]).all()
    # 2 ranks consumed 3 steps (24 samples); resumed on 3 ranks, it continues at sample 24
    resumed = rows_in_step_order(lengths, 4, 3, seed=3, epoch=1, skip=24)
    assert (resumed[:n - 24] == one[24:n]).all()
    # another epoch, another order
    assert not (rows_in_step_order(lengths, 4, 1, seed=3, epoch=2)[:n] == one[:n]).all()


def test_default_order_is_a_uniform_shuffle_grouping_is_opt_in():
    """Where the kind of row sets its length, the default order still mixes kinds in every batch;
    length grouping (opt-in) makes nearly every batch one kind."""
    lengths = np.array([220] * 400 + [420] * 400)  # e.g. one-image vs two-image questions
    def mixed_share(group: bool) -> float:
        s = RankSampler(lengths, 16, 0, 1, seed=0, group_by_length=group)
        s.set_epoch(0)
        batches = lengths[np.array(list(s)).reshape(-1, 16)]
        return float(np.mean(batches.min(axis=1) != batches.max(axis=1)))
    assert mixed_share(False) > 0.95 and mixed_share(True) < 0.1
    s = RankSampler(lengths, 16, 0, 1, seed=0)
    s.set_epoch(0)
    order = np.array(list(s))
    assert sorted(order) == list(range(800))  # a permutation of the epoch, no wrapping needed
    # no correlation between position in the epoch and row length
    assert abs(np.corrcoef(np.arange(800), lengths[order])[0, 1]) < 0.1


def test_feature_cache_hits_equal_misses(tmp_path):
    fp = {"data": "x"}
    cache = FeatureCache(tmp_path, fp)
    calls = []

    def encode(pv, n):
        calls.append(len(pv))
        return pv.mean(dim=(2, 3, 4), keepdim=True)[..., 0].expand(-1, -1, 196, 8) * 1.0001

    pv = torch.randn(3, 2, 3, 4, 4)
    num = torch.tensor([2, 0, 1])
    first = cache.features([5, 6, 7], num, pv, encode)
    again = cache.features([5, 6, 7], num, pv, encode)
    assert calls == [2]  # the image-less row is never encoded; the second call is all hits
    assert first.dtype == torch.float16 and torch.equal(first, again)
    assert (first[1] == 0).all() and (first[2, 1] == 0).all()
    assert cache.features([6], torch.tensor([0]), None, encode) is None
    with pytest.raises(RuntimeError, match="delete it"):
        FeatureCache(tmp_path, {"data": "y"})
    assert math.isfinite(float(first.float().sum()))


def test_published_flag_names_are_kept():
    published = ("epochs batch_size learning_rate device dtype num_workers accumulation_steps grad_clip log_interval "
                 "save_interval hidden_size num_hidden_layers max_seq_len use_moe data_path from_weight save_weight "
                 "save_dir from_resume freeze_llm use_compile use_wandb vision_model_path tokenizer_path").split()
    for stage in ("pretrain", "sft"):
        options = {a.dest for a in build_parser(stage)._actions}
        assert set(published) <= options, set(published) - options
