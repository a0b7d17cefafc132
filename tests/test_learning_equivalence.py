"""Every speed trick of the trainer is an exact transformation of a plain training loop.

The plain loop below is the original's step written out: rows padded to the batch's longest, the
frozen encoder run on the padded image tensor, logits over the whole vocabulary at every position,
cross-entropy averaged over the supervised tokens, AdamW with clipping at the cosine schedule. Our
trainer (dynamic padding or packing, logits only at supervised positions, the feature cache) must
give the same loss at every step, within fp32 noise, on the same rows in the same order.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataset.lm_dataset import VLMDataset
from model import PROJECT_TOKENIZER
from model.model_vlm import MiniMindVLM, VLMConfig
from model.processor import load_tokenizer
from model.weights import load_weights, save_weights
from tests.train_helpers import make_data, metrics, tiny_flags
from trainer.data import RankSampler
from trainer.recipe import get_lr, set_trainable
from trainer.train_loop import main

HIDDEN, LAYERS, BATCH, EPOCHS, LR = 64, 2, 4, 3, 2e-3
TOLERANCE = 1e-4  # on losses of 5-9 (measured: ~5e-7); a changed batch or a wrong mask moves them by 1e-2 or more

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("equiv")
    data = make_data(root / "data", n=30) / "sft.parquet"  # one and two images, one and two turns
    torch.manual_seed(0)
    save_weights(MiniMindVLM(VLMConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS)), root / "init_64.pth")
    return root, data


def plain_loop(data, clip, init, fp16_features: bool = False) -> list[float]:
    """The reference: per-step losses of the simplest correct loop over the trainer's row order."""
    tok = load_tokenizer(PROJECT_TOKENIZER)
    ds = VLMDataset(data, tok, max_length=640)
    model = MiniMindVLM(VLMConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS), vision_model_path=clip)
    load_weights(model, init)
    trainable = set(set_trainable(model, 0))
    params = [p for n, p in model.named_parameters() if n in trainable]
    opt = torch.optim.AdamW(params, lr=LR)
    sampler = RankSampler(ds.lengths(show_progress=False), BATCH, 0, 1, seed=0)
    total = EPOCHS * sampler.num_batches
    model.train()
    losses, step = [], 0
    for epoch in range(EPOCHS):
        sampler.order.set_epoch(epoch)
        for rows in sampler.order.global_order():
            items = [ds[int(i)] for i in rows]
            T = max(len(it["input_ids"]) for it in items)
            N = max(len(it["pixel_values"]) for it in items)
            ids = torch.zeros(len(items), T, dtype=torch.long)
            labels = torch.full((len(items), T), -100, dtype=torch.long)
            pixels = torch.zeros(len(items), N, 3, 224, 224)
            for b, it in enumerate(items):
                ids[b, :len(it["input_ids"])] = it["input_ids"]
                labels[b, :len(it["labels"])] = it["labels"]
                pixels[b, :len(it["pixel_values"])] = it["pixel_values"]
            feats = model.encode_images(pixels)
            if fp16_features:
                feats = feats.half().float()
            num_images = torch.tensor([len(it["pixel_values"]) for it in items])  # the rest is padding
            logits = model(input_ids=ids, image_features=feats, num_images=num_images).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
            loss.backward()
            for g in opt.param_groups:
                g["lr"] = get_lr(step, total, LR)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            step += 1
    return losses


def trainer_losses(data, clip, root, name, **flags) -> list[float]:
    main("sft", tiny_flags(data, clip, root / name, from_weight=root / "init_64.pth", freeze_llm=0, epochs=EPOCHS,
                           batch_size=BATCH, learning_rate=LR, save_interval=1000, max_seq_len=640, **flags))
    steps, _ = metrics(root / name / "sft_vlm_64_metrics.jsonl")
    return [r["loss"] for r in steps]


@pytest.fixture(scope="module")
def reference(setup, tiny_clip):
    root, data = setup
    return plain_loop(data, tiny_clip, root / "init_64.pth")


@pytest.mark.parametrize("mode, flags", [("padded", dict(packing=0)), ("packed", dict(packing=1))])
def test_trainer_steps_equal_plain_loop(setup, tiny_clip, reference, mode, flags):
    root, data = setup
    ours = trainer_losses(data, tiny_clip, root, mode, **flags)
    assert len(ours) == len(reference) >= 20
    diff = np.abs(np.array(ours) - np.array(reference))
    print(f"{mode}: worst per-step loss difference {diff.max():.2e} over {len(ours)} steps")
    assert diff.max() < TOLERANCE, (ours, reference)
    assert reference[-1] < 0.75 * reference[0]  # it learns: the comparison is not between two flat lines


def test_feature_cache_equals_plain_loop_on_fp16_features(setup, tiny_clip):
    """The cache stores features in fp16 (and rounds fresh ones alike): exact against a plain loop
    that rounds its features the same way, in every epoch (the first fills it, the next read it)."""
    root, data = setup
    ours = trainer_losses(data, tiny_clip, root, "cached", packing=1, feature_cache=root / "features")
    ref = plain_loop(data, tiny_clip, root / "init_64.pth", fp16_features=True)
    diff = np.abs(np.array(ours) - np.array(ref))
    print(f"packed + feature cache: worst per-step loss difference {diff.max():.2e} over {len(ours)} steps")
    assert len(ours) == len(ref) >= 20 and diff.max() < TOLERANCE, (ours, ref)


def test_a_changed_batch_is_caught(setup, tiny_clip, reference):
    """The tolerance is tight enough to see a different sample order (the test can fail)."""
    root, data = setup
    ours = trainer_losses(data, tiny_clip, root, "other_order", seed=1)
    assert np.abs(np.array(ours) - np.array(reference)).max() > 50 * TOLERANCE
