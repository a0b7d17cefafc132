"""VLMDataset: rendering, labels (assistant replies only), truncation, bad rows, collate, sampler, both file formats."""
import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dataset.lm_dataset import BadRowStats, LengthGroupedSampler, VLMDataset, collate_fn
from model import PROJECT_TOKENIZER
from model.processor import IGNORE_INDEX, load_tokenizer, render_conversation

SLOT = [34] * 196


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(PROJECT_TOKENIZER)


@pytest.fixture(scope="module")
def fixture_tok(fixture_tokenizer_path):
    return load_tokenizer(fixture_tokenizer_path)


def png(colour=(200, 30, 30), size=(32, 24), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(buf, format="PNG")
    return buf.getvalue()


# 1 x 20000 grey: ~120 bytes that pass a pixel-count limit, but resizing the short side to the model's
# input size would ask ~18 GB. The decoder refuses it from the header (aspect ratio over 20:1).
TALL = png((128, 128, 128), (1, 20000), mode="L")


def conv(*turns: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def write_parquet(path, rows, list_images=False):
    """rows: (conversations (list or raw string), image bytes list)."""
    convs = [c if isinstance(c, str) else json.dumps(c) for c, _ in rows]
    if list_images:
        images = pa.array([imgs for _, imgs in rows], pa.list_(pa.binary()))
    else:
        images = pa.array([imgs[0] if imgs else None for _, imgs in rows], pa.binary())
    pq.write_table(pa.table({"conversations": convs, "image_bytes": images}), path)
    return path


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---- labels, checked by hand ---------------------------------------------------------------
def test_single_turn_labels_by_hand(tok, tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [(conv("<image>\nWhat colour?", "red"), [png()])])
    item = VLMDataset(path, tok)[0]
    # special tokens split the text, so the pieces tokenize independently
    prefix = (ids_of(tok, "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n") + SLOT
              + ids_of(tok, "\nWhat colour?<|im_end|>\n<|im_start|>assistant\n"))
    reply = ids_of(tok, "red<|im_end|>\n")
    assert item["input_ids"].tolist() == prefix + reply
    assert item["labels"].tolist() == [IGNORE_INDEX] * len(prefix) + reply
    assert reply[-2:] == [2, ids_of(tok, "\n")[0]]
    assert item["pixel_values"].shape == (1, 3, 224, 224)


def test_multi_turn_labels_by_hand(tok, tmp_path):
    c = conv("<image>\nColour?", "red", "Left or right?", "left")
    path = write_parquet(tmp_path / "d.parquet", [(c, [png()])])
    item = VLMDataset(path, tok)[0]
    pieces = [(False, ids_of(tok, "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n") + SLOT
               + ids_of(tok, "\nColour?<|im_end|>\n<|im_start|>assistant\n")),
              (True, ids_of(tok, "red<|im_end|>\n")),
              (False, ids_of(tok, "<|im_start|>user\nLeft or right?<|im_end|>\n<|im_start|>assistant\n")),
              (True, ids_of(tok, "left<|im_end|>\n"))]
    assert item["input_ids"].tolist() == [i for _, p in pieces for i in p]
    assert item["labels"].tolist() == [i if sup else IGNORE_INDEX for sup, p in pieces for i in p]


def test_two_images_labels_by_hand(tok, tmp_path):
    c = conv("<image>\n<image>\nFirst colour?", "blue")
    path = write_parquet(tmp_path / "d.parquet", [(c, [png((0, 0, 255)), png((255, 0, 0))])], list_images=True)
    item = VLMDataset(path, tok)[0]
    prefix = (ids_of(tok, "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n") + SLOT
              + ids_of(tok, "\n") + SLOT + ids_of(tok, "\nFirst colour?<|im_end|>\n<|im_start|>assistant\n"))
    reply = ids_of(tok, "blue<|im_end|>\n")
    assert item["input_ids"].tolist() == prefix + reply
    assert item["labels"].tolist() == [IGNORE_INDEX] * len(prefix) + reply
    pv = item["pixel_values"]
    assert pv.shape == (2, 3, 224, 224)
    assert pv[0, 2].mean() > pv[1, 2].mean()  # images kept in order: the first is the blue one


def test_system_message_and_stray_at_sign(tok, tmp_path):
    c = [{"role": "system", "content": "Be brief."}] + conv("mail me @ home <image>", "ok @ once")
    path = write_parquet(tmp_path / "d.parquet", [(c, [png()])])
    item = VLMDataset(path, tok)[0]
    text = tok.decode(item["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert tok.decode(item["input_ids"][item["labels"] != IGNORE_INDEX]) == "ok @ once<|im_end|>\n"


# ---- compatibility with the original pipeline and the published tokenizer -----------------
def original_labels(ids: list[int], header: list[int], closer: list[int]) -> list[int]:
    """The published VLMDataset's label rule, restated: scan for `<|im_start|>assistant\\n`, label
    every id up to and including the next `<|im_end|>\\n`."""
    labels, i = [IGNORE_INDEX] * len(ids), 0
    while i < len(ids):
        if ids[i:i + len(header)] == header:
            start = end = i + len(header)
            while end < len(ids) and ids[end:end + len(closer)] != closer:
                end += 1
            for j in range(start, min(end + len(closer), len(ids))):
                labels[j] = ids[j]
            i = end + len(closer) if end < len(ids) else len(ids)
        else:
            i += 1
    return labels


def original_prompt(tok, conversations):
    """The published rendering: role by position, <image> -> 196 '@', no generation prompt."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t["content"].replace("<image>", "@" * 196)}
                for i, t in enumerate(conversations)]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


COMPAT_ROWS = [
    conv("<image>\nDescribe the image.", "A red circle at the top left."),
    conv("仔细看一下这张图：\n\n<image>\n\n描述一下这个图像的内容。", "图中有一个红色的圆形。"),
    conv("<image>\nColour?", "red", "And where is it?", "It is at the left <|im_end|> side."),
    conv("Look: <image> and <image>", "two pictures", "Same?", ""),
    conv("<image>", "Emails look like a@b.c; assistant\nsays hi"),
]


@pytest.mark.parametrize("tokenizer_name", ["project", "published"])
def test_ids_and_labels_equal_the_original_pipeline(tokenizer_name, tok, request, tmp_path):
    t = tok if tokenizer_name == "project" else request.getfixturevalue("fixture_tok")
    rows = [(c, [png()] * c[0]["content"].count("<image>")) for c in COMPAT_ROWS]
    ds = VLMDataset(write_parquet(tmp_path / "d.parquet", rows, list_images=True), t, max_length=4096)
    header = ids_of(t, "<|im_start|>assistant\n")
    closer = ids_of(t, "<|im_end|>\n")
    for i, (c, _) in enumerate(rows):
        item = ds[i]
        assert item["index"] == i and not item["skipped"]
        ref_ids = t(original_prompt(t, c)).input_ids  # the original called the tokenizer with defaults
        assert item["input_ids"].tolist() == ref_ids
        assert item["labels"].tolist() == original_labels(ref_ids, header, closer)


def test_project_and_published_tokenizers_agree_on_layout(tok, fixture_tok):
    """Same rendered text, same special / placeholder ids at the same characters, same supervised text."""
    for c in COMPAT_ROWS:
        a, b = render_conversation(tok, c), render_conversation(fixture_tok, c)
        assert a == b
        ia, ib = ids_of(tok, a), ids_of(fixture_tok, b)
        for special in (0, 1, 2, 34):
            assert ia.count(special) == ib.count(special)
        assert tok.decode(ia) == fixture_tok.decode(ib) == a
        from dataset.lm_dataset import assistant_labels
        la = assistant_labels(torch.tensor(ia), ids_of(tok, "<|im_start|>assistant\n"), ids_of(tok, "<|im_end|>\n"))
        lb = assistant_labels(torch.tensor(ib), ids_of(fixture_tok, "<|im_start|>assistant\n"),
                              ids_of(fixture_tok, "<|im_end|>\n"))
        assert tok.decode(torch.tensor(ia)[la != IGNORE_INDEX]) == fixture_tok.decode(torch.tensor(ib)[lb != IGNORE_INDEX])
    for t in (tok, fixture_tok):
        assert [t.pad_token_id, t.bos_token_id, t.eos_token_id] == [0, 1, 2]
        assert t.convert_tokens_to_ids("@") == 34


def test_generation_prompt(tok):
    text = render_conversation(tok, conv("<image>\nhi"), add_generation_prompt=True)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "@" * 196 in text and "<image>" not in text


# ---- truncation -----------------------------------------------------------------------------
def test_truncation_cuts_text_after_the_last_image(tok, tmp_path):
    c = conv("<image>\nDescribe.", "word " * 200)
    path = write_parquet(tmp_path / "d.parquet", [(c, [png()])])
    full = VLMDataset(path, tok, max_length=4096)[0]
    item = VLMDataset(path, tok, max_length=300)[0]
    assert len(item["input_ids"]) == 300 < len(full["input_ids"])
    assert item["input_ids"].tolist() == full["input_ids"][:300].tolist()
    assert item["labels"].tolist() == full["labels"][:300].tolist()
    assert item["input_ids"].tolist().count(34) == 196


def test_truncation_never_cuts_an_image_slot(tok, tmp_path, caplog):
    rows = [(conv("a long question " * 30 + "<image>", "ok"), [png()]), (conv("<image>\nshort", "ok"), [png()])]
    path = write_parquet(tmp_path / "d.parquet", rows)
    ds = VLMDataset(path, tok, max_length=260)
    assert ds.lengths(show_progress=False)[0] > 260
    with caplog.at_level(logging.WARNING, logger="minimind.data"):
        item = ds[0]
    assert item["index"] == 1 and item["skipped"] == [(0, "too_long")]  # fell through to the next row
    assert "row 0" in caplog.text and str(path) in caplog.text and "too_long" in caplog.text


def test_row_whose_reply_is_cut_entirely_is_skipped(tok, tmp_path):
    rows = [(conv("<image>" + " question" * 40, "answer"), [png()]), (conv("<image>", "ok"), [png()])]
    ds = VLMDataset(write_parquet(tmp_path / "d.parquet", rows), tok, max_length=200 + 30)
    assert ds.lengths(show_progress=False)[0] > 230
    assert ds[0]["skipped"] == [(0, "too_long")]


def test_rows_that_fit_are_not_cut(tok, tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [(conv("<image>\nq", "a"), [png()])])
    n = len(VLMDataset(path, tok, max_length=4096)[0]["input_ids"])
    assert len(VLMDataset(path, tok, max_length=n)[0]["input_ids"]) == n


# ---- bad rows ---------------------------------------------------------------------------------
GOOD = conv("<image>\nColour?", "red")


def bad_parquet(tmp_path):
    rows = [
        (GOOD, [png()]),                                              # 0 good
        (GOOD, [b"\x89PNG not really"]),                              # 1 image_decode
        ('[{"role": "user", "content": "<image>', [png()]),          # 2 json (malformed)
        ("[]", [png()]),                                              # 3 conversation (empty)
        (conv("<image>", "a")[::-1], [png()]),                        # 4 conversation (assistant first)
        (GOOD[:1] + GOOD[:1] + GOOD[1:], [png()]),                    # 5 conversation (user, user, assistant)
        (conv("<image><image>\ntwo?", "yes"), [png()]),               # 6 image_count (2 markers, 1 image)
        (conv("<image>\nhi", "no image at all"), []),                 # 7 image_count (0 images)
        ('{"role": "user"}', [png()]),                                # 8 json (not a list)
        (GOOD, [TALL]),                                               # 9 image_too_large (aspect ratio)
        (GOOD, [png()]),                                              # 10 good
    ]
    return write_parquet(tmp_path / "bad.parquet", rows)


EXPECTED_BAD = {1: "image_decode", 2: "json", 3: "conversation", 4: "conversation", 5: "conversation",
                6: "image_count", 7: "image_count", 8: "json", 9: "image_too_large"}
GOOD_ROWS = {0, 10}


def test_each_bad_row_kind_is_skipped_with_one_warning(tok, tmp_path, caplog):
    path = bad_parquet(tmp_path)
    for row, kind in EXPECTED_BAD.items():
        ds = VLMDataset(path, tok)  # fresh: nothing known bad yet
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="minimind.data"):
            item = ds[row]
        assert item["skipped"][0] == (row, kind)
        assert item["index"] == 10  # every bad row falls through to the next good one
        assert f"{path} row {row}: skipped ({kind})" in caplog.text
        assert len([r for r in caplog.records if f"row {row}:" in r.getMessage()]) == 1
    ds[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="minimind.data"):
        item = ds[1]  # again: still skipped and reported, but not logged twice
    assert [k for _, k in item["skipped"]] == [EXPECTED_BAD[r] for r in range(1, 10)] and not caplog.records


def test_loader_never_crashes_and_summarises_bad_rows(tok, tmp_path):
    ds = VLMDataset(bad_parquet(tmp_path), tok)
    stats = BadRowStats("bad.parquet")
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_fn, num_workers=2)
    seen = 0
    for batch in loader:
        stats.update(batch)
        seen += len(batch["input_ids"])
        assert set(batch["index"].tolist()) <= GOOD_ROWS
    assert seen == len(ds)  # batch shapes never change
    assert stats.counts() == {"json": 2, "conversation": 3, "image_count": 2, "image_decode": 1, "image_too_large": 1}
    assert stats.summary() == ("bad.parquet: skipped 9 bad row(s): json 2, conversation 3, image_count 2, "
                               "image_decode 1, image_too_large 1")
    stats.reset()
    assert stats.summary() == "bad.parquet: no bad rows"


def test_all_rows_bad_is_a_clear_error(tok, tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [("not json", [png()])] * 3)
    ds = VLMDataset(path, tok)
    with pytest.raises(RuntimeError, match="all bad.*check_data"):
        ds[0]
    with pytest.raises(RuntimeError, match="all bad.*check_data"):
        ds[2]


# ---- JSONL + image folder --------------------------------------------------------------------
def test_jsonl_with_image_folder(tok, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png((255, 0, 0)))
    (tmp_path / "imgs" / "b.png").write_bytes(png((0, 0, 255)))
    lines = [{"conversations": conv("<image>\nq", "a"), "image": "a.png"},
             {"conversations": conv("<image>\n<image>\nq", "a"), "image": "b.png, a.png"},
             {"conversations": conv("<image>\nq", "a"), "image": "missing.png"},
             "this line is not JSON",
             {"conversations": conv("<image>\nq", "a"), "image": "a.png"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    ds = VLMDataset(path, tok, image_root=tmp_path / "imgs")
    assert len(ds) == 5
    assert ds[0]["pixel_values"].shape == (1, 3, 224, 224)
    two = ds[1]["pixel_values"]
    assert two.shape == (2, 3, 224, 224) and two[0, 2].mean() > two[1, 2].mean()  # b (blue) first
    assert ds[2]["skipped"] == [(2, "image_missing"), (3, "json")] and ds[2]["index"] == 4


def test_jsonl_image_paths_stay_inside_the_image_folder(tok, tmp_path, caplog):
    """`..`, absolute paths and symlinks out of the folder are skipped, counted rows (never opened)."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.png").write_bytes(png())
    (imgs / "sub").mkdir()
    (imgs / "sub" / "b.png").write_bytes(png())
    outside = tmp_path / "outside.png"
    outside.write_bytes(png())
    (imgs / "link.png").symlink_to(outside)
    (imgs / "inner_link.png").symlink_to(imgs / "a.png")  # a link that stays inside is fine
    names = ["../outside.png", str(outside), "link.png", "/etc/passwd", "sub/../../outside.png", "a\x00.png",
             "a.png", "sub/b.png", "inner_link.png"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"conversations": conv("<image>\nq", "a"), "image": n}) + "\n" for n in names))
    ds = VLMDataset(path, tok, image_root=imgs)
    with caplog.at_level(logging.WARNING, logger="minimind.data"):
        item = ds[0]
    assert item["index"] == 6 and item["skipped"] == [(i, "image_path") for i in range(6)]
    assert f"{path} row 3: skipped (image_path): image '/etc/passwd' is outside the image folder" in caplog.text
    assert "row 0: skipped (image_path): image '../outside.png'" in caplog.text
    assert ds[7]["index"] == 7 and ds[8]["index"] == 8 and not ds[8]["skipped"]


def test_parquet_binary_and_list_columns_agree(tok, tmp_path):
    rows = [(GOOD, [png((10, 200, 10))])]
    a = VLMDataset(write_parquet(tmp_path / "a.parquet", rows), tok)[0]
    b = VLMDataset(write_parquet(tmp_path / "b.parquet", rows, list_images=True), tok)[0]
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_lengths_match_encoded_lengths_and_are_cached(tok, tmp_path):
    rows = [(c, [png()] * c[0]["content"].count("<image>")) for c in COMPAT_ROWS] + [("broken", [])]
    ds = VLMDataset(write_parquet(tmp_path / "d.parquet", rows, list_images=True), tok, max_length=4096)
    lengths = ds.lengths(show_progress=False)
    assert lengths.tolist() == [len(ds.encode(i)[0]) for i in range(len(rows) - 1)] + [0]
    assert list((tmp_path / ".cache").glob("*.npy"))
    again = VLMDataset(tmp_path / "d.parquet", tok, max_length=4096).lengths(show_progress=False)
    assert np.array_equal(again, lengths)


# ---- collate ------------------------------------------------------------------------------------
def test_collate_pads_to_the_longest_row(tok, tmp_path):
    rows = [(conv("<image>\nq", "short"), [png()]), (conv("<image>\n<image>\nq", "a much longer answer " * 5), [png()] * 2),
            (conv("text only", "fine"), [])]
    ds = VLMDataset(write_parquet(tmp_path / "d.parquet", rows, list_images=True), tok)
    items = [ds[i] for i in range(3)]
    b = collate_fn(items)
    lens = [len(it["input_ids"]) for it in items]
    B, T = 3, max(lens)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (B, T)
    assert b["attention_mask"].sum(1).tolist() == lens
    for i, it in enumerate(items):
        n = lens[i]
        assert b["input_ids"][i, :n].tolist() == it["input_ids"].tolist()
        assert b["labels"][i, :n].tolist() == it["labels"].tolist()
        assert (b["input_ids"][i, n:] == 0).all() and (b["labels"][i, n:] == IGNORE_INDEX).all()
        assert (b["attention_mask"][i, n:] == 0).all()
    assert b["pixel_values"].shape == (B, 2, 3, 224, 224)
    assert b["num_images"].tolist() == [1, 2, 0]
    assert torch.equal(b["pixel_values"][0, 0], items[0]["pixel_values"][0])
    assert (b["pixel_values"][0, 1] == 0).all() and (b["pixel_values"][2] == 0).all()
    assert b["index"].tolist() == [0, 1, 2] and b["bad_rows"] == []
    text_only = collate_fn([items[2]])
    assert text_only["pixel_values"] is None and text_only["num_images"].tolist() == [0]


# ---- sampler --------------------------------------------------------------------------------------
def test_sampler_is_deterministic_and_wraps_to_whole_batches():
    lengths = np.random.default_rng(0).integers(10, 1000, 103)
    s = LengthGroupedSampler(lengths, batch_size=4, seed=7, group_mult=2)
    s.set_epoch(1)
    order = list(s)
    again = LengthGroupedSampler(lengths, batch_size=4, seed=7, group_mult=2)
    again.set_epoch(1)
    assert list(again) == order  # a function of (lengths, batch size, seed, epoch)
    assert len(order) == len(s) == 26 * 4  # ceil(103 / 4) = 26 batches
    assert set(order) == set(range(103))  # every row, one repeated to fill the last batch
    s.set_epoch(2)
    assert list(s) != order  # a new epoch, a new order


def test_sampler_groups_lengths_and_saves_padding():
    lengths = np.random.default_rng(1).integers(10, 1000, 4000)

    def padded(group):
        s = LengthGroupedSampler(lengths, batch_size=8, seed=0, group_by_length=group)
        batches = np.array(list(s)).reshape(-1, 8)
        return (lengths[batches].max(1, keepdims=True) - lengths[batches]).sum()
    assert padded(True) < 0.1 * padded(False)


def test_sampler_without_grouping_is_a_plain_shuffle():
    s = LengthGroupedSampler(np.zeros(20), batch_size=4, group_by_length=False)
    assert sorted(s) == list(range(20)) and list(s) != list(range(20))
