"""Sequence packing is an exact re-layout of a batch: every row computes what it computes alone."""
import random

import pytest
import torch

from dataset.lm_dataset import PAD_ID, VLMDataset, collate_fn, collate_packed, first_fit_packs
from model import PROJECT_TOKENIZER
from model.model_minimind import segment_attention_mask
from model.model_vlm import MiniMindVLM, VLMConfig
from model.processor import IGNORE_INDEX, load_tokenizer
from tests.train_helpers import make_data
from trainer.train_loop import batch_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("packdata"), n=16)


@pytest.fixture(scope="module")
def items(data):
    """SFT rows (one or two images, one or two turns) and pretrain rows: lengths from ~220 to ~470."""
    tok = load_tokenizer(PROJECT_TOKENIZER)
    sft = VLMDataset(data / "sft.parquet", tok, max_length=640)
    pre = VLMDataset(data / "pretrain.parquet", tok, max_length=640)
    return [sft[i] for i in range(8)] + [pre[i] for i in range(4)]


def test_first_fit_packs_every_row_once_within_capacity():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 20))]
        packs = first_fit_packs(lengths, 100)
        assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in p) <= 100 for p in packs)
        # first fit: no two packs could be merged into one
        loads = sorted(sum(lengths[i] for i in p) for p in packs)
        assert len(loads) < 2 or loads[0] + loads[1] > 100
    assert first_fit_packs([60, 50, 40, 30], 100) == [[0, 2], [1, 3]]


def test_packed_layout_holds_each_row_intact(items):
    padded = collate_fn(items)
    packed = collate_packed(items, capacity=640)
    B = len(items)
    assert packed["input_ids"].shape[0] < B  # rows really share sequences
    assert packed["input_ids"].shape[1] <= 640
    for key in ("pixel_values", "num_images", "index"):
        assert torch.equal(packed[key], padded[key])  # per row, untouched
    seen = []
    for b, it in enumerate(items):
        where = (packed["segment_ids"] == b + 1).nonzero()
        p = int(where[0, 0])
        assert (where[:, 0] == p).all()  # one pack
        cols = where[:, 1]
        assert torch.equal(cols, torch.arange(int(cols[0]), int(cols[0]) + len(cols)))  # contiguous
        assert torch.equal(packed["input_ids"][p, cols], it["input_ids"])
        assert torch.equal(packed["labels"][p, cols[1:]], it["labels"][1:])
        assert packed["labels"][p, cols[0]] == IGNORE_INDEX and it["labels"][0] == IGNORE_INDEX
        assert torch.equal(packed["position_ids"][p, cols], torch.arange(len(cols)))
        seen.append((p, int(cols[0]), b))
    pads = packed["segment_ids"] == 0
    assert (packed["input_ids"][pads] == PAD_ID).all() and (packed["labels"][pads] == IGNORE_INDEX).all()
    assert torch.equal(packed["attention_mask"].bool(), ~pads)
    # a pack's images are its rows' images, in the order its rows (and so its image slots) come
    for p in range(packed["input_ids"].shape[0]):
        rows = [b for q, _, b in sorted(seen) if q == p]
        expect = [(b, j) for b in rows for j in range(int(padded["num_images"][b]))]
        got = list(zip(packed["image_row"][p].tolist(), packed["image_pos"][p].tolist()))[:len(expect)]
        assert got == expect


def test_segment_mask_is_causal_within_rows_only():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    m = segment_attention_mask(seg)[0, 0].int()
    assert m.tolist() == [[1, 0, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0, 0],
                          [0, 0, 1, 0, 0, 0],
                          [0, 0, 1, 1, 0, 0],
                          [0, 0, 1, 1, 1, 0],
                          [0, 0, 0, 0, 0, 1]]


def test_packed_rows_compute_what_they_compute_alone(items, tiny_clip):
    """Logits of every row inside the packed batch equal that row run alone (fp32, 1e-5)."""
    torch.manual_seed(0)
    model = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=2), vision_model_path=tiny_clip).eval()
    packed = collate_packed(items, capacity=640)
    with torch.no_grad():
        feats = model.encode_images(packed["pixel_values"], packed["num_images"])
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                       attention_mask=segment_attention_mask(packed["segment_ids"]),
                       image_features=feats[packed["image_row"], packed["image_pos"]],
                       num_images=packed["pack_num_images"]).logits
        for b, it in enumerate(items):
            alone = model(input_ids=it["input_ids"][None], pixel_values=it["pixel_values"][None]).logits[0]
            p, cols = (packed["segment_ids"] == b + 1).nonzero(as_tuple=True)
            torch.testing.assert_close(logits[p, cols], alone, atol=1e-5, rtol=1e-5)


def test_packed_batch_loss_and_gradients_equal_padded(items, tiny_clip):
    torch.manual_seed(0)
    model = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=2), vision_model_path=tiny_clip)
    model.train()
    grads = {}
    for name, batch in (("padded", collate_fn(items)), ("packed", collate_packed(items, capacity=640))):
        model.zero_grad()
        loss = batch_loss(model, model, batch, torch.device("cpu"), torch.autocast("cpu", enabled=False))
        loss.backward()
        grads[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (l1, g1), (l2, g2) = grads["padded"], grads["packed"]
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-5, rtol=1e-4, msg=n)
