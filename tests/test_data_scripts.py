"""scripts/make_synthetic_data.py (the offline task) and scripts/check_data.py."""
import io
import json
from collections import Counter, defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model import PROJECT_TOKENIZER
from scripts.make_synthetic_data import CHOICES, COLOURS, KINDS, TWO_IMAGE_ATTRIBUTE, make_dataset, write_captions


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("syn"), seed=0, n_pretrain=60, n_sft=200, n_eval=400, eval_kinds=KINDS)


def rows(path):
    return pq.read_table(path).to_pylist()


def images_of(row):
    b = row["image_bytes"]
    return b if isinstance(b, list) else [b]


def read_scene(png: bytes) -> dict:
    """What a simple pixel rule sees: the shape's mean colour (nearest palette entry) and quadrant."""
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    mask = a.min(axis=2) < 200  # the background is light (>= 225 in every channel); shapes are saturated
    ys, xs = np.nonzero(mask)
    mean = a[mask].mean(axis=0)
    colour = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - mean).sum())
    h, w = mask.shape
    return {"colour": colour, "horizontal": "left" if xs.mean() < w / 2 else "right",
            "vertical": "top" if ys.mean() < h / 2 else "bottom"}


def test_layout_and_kinds(synthetic):
    for split in ("pretrain", "sft", "eval"):
        assert {"conversations", "image_bytes"} <= set(pq.read_schema(synthetic[split]).names)
    ev = rows(synthetic["eval"])
    assert Counter(r["kind"] for r in ev) == {k: 100 for k in KINDS}
    for r in ev:
        conv = json.loads(r["conversations"])
        assert [m["role"] for m in conv] == ["user", "assistant"] and conv[1]["content"] == r["answer"]
        assert conv[0]["content"].count("<image>") == len(images_of(r)) == (2 if r["kind"] == "two_images" else 1)
    sft = [json.loads(r["conversations"]) for r in rows(synthetic["sft"])]
    assert any(len(c) == 4 for c in sft)  # multi-turn rows
    assert any(c[0]["content"].count("<image>") == 2 for c in sft)  # two-image rows


def test_answers_are_read_off_the_image(synthetic):
    for r in rows(synthetic["eval"]):
        scenes = [read_scene(b) for b in images_of(r)]
        if r["kind"] in TWO_IMAGE_ATTRIBUTE:
            which = 0 if "first image" in r["conversations"] else 1
            assert scenes[which][TWO_IMAGE_ATTRIBUTE[r["kind"]]] == r["answer"]
        else:
            assert scenes[0][r["kind"]] == r["answer"]


def test_pretrain_rows_ask_where_the_shape_is(synthetic):
    """Stage 1 asks only what averaging the image cannot answer: left/right, of one image or of the
    first/second of two; both forms occur and every answer is read off the named image."""
    forms = Counter()
    for r in rows(synthetic["pretrain"]):
        user, answer = (m["content"] for m in json.loads(r["conversations"]))
        scenes = [read_scene(b) for b in images_of(r)]
        assert user.count("<image>") == len(scenes) and answer in CHOICES["horizontal"]
        which = 1 if "second image" in user else 0
        assert len(scenes) == 1 or ("first image" in user) != ("second image" in user)
        assert scenes[which]["horizontal"] == answer
        forms[len(scenes)] += 1
    assert set(forms) == {1, 2}


def test_text_alone_is_at_chance(synthetic):
    """The best text-only guess (the majority answer for each exact question) stays near chance."""
    by_question = defaultdict(Counter)
    ev = rows(synthetic["eval"])
    for r in ev:
        by_question[json.loads(r["conversations"])[0]["content"]][r["answer"]] += 1
    for kind in KINDS:
        kind_rows = [r for r in ev if r["kind"] == kind]
        chance = 1 / len(CHOICES["colour" if kind == "two_images" else kind])
        best = sum(max(c.values()) for q, c in by_question.items()
                   if any(json.loads(r["conversations"])[0]["content"] == q for r in kind_rows))
        assert best / len(kind_rows) < chance + 0.15, kind


def test_captions_describe_their_image(tmp_path):
    """The published pretraining style, kept for the training benchmark: one image, colour and place."""
    for r in rows(write_captions(tmp_path / "captions.parquet", 20)):
        (scene,), text = [read_scene(b) for b in images_of(r)], json.loads(r["conversations"])[1]["content"]
        assert f"{scene['colour']} " in text and text.endswith(f" {scene['vertical']} {scene['horizontal']}.")


def test_seeded_and_reused_unless_overwrite(synthetic, tmp_path):
    a = make_dataset(tmp_path / "a", seed=0, n_pretrain=60, n_sft=200, n_eval=400, eval_kinds=KINDS)
    assert all(pq.read_table(a[s]).equals(pq.read_table(synthetic[s])) for s in a)
    other = make_dataset(tmp_path / "b", seed=1, n_pretrain=60, n_sft=200, n_eval=400)
    assert not pq.read_table(other["sft"]).equals(pq.read_table(a["sft"]))
    mtime = a["sft"].stat().st_mtime_ns
    make_dataset(tmp_path / "a", seed=0, n_pretrain=60, n_sft=200, n_eval=400, eval_kinds=KINDS)
    assert a["sft"].stat().st_mtime_ns == mtime  # same recipe: kept
    make_dataset(tmp_path / "a", seed=0, n_pretrain=60, n_sft=200, n_eval=400, eval_kinds=KINDS, overwrite=True)
    assert a["sft"].stat().st_mtime_ns != mtime  # overwrite: rewritten
    make_dataset(tmp_path / "a", seed=5, n_pretrain=60, n_sft=200, n_eval=400)
    assert not pq.read_table(a["sft"]).equals(pq.read_table(synthetic["sft"]))  # other seed: rewritten
    assert Counter(r["kind"] for r in rows(a["eval"])) == {"colour": 134, "horizontal": 133, "vertical": 133}
    default = make_dataset(tmp_path / "c", seed=0, n_pretrain=4, n_sft=4, n_eval=9)
    assert Counter(r["kind"] for r in rows(default["eval"])) == {"colour": 3, "horizontal": 3, "vertical": 3}
    with pytest.raises(ValueError, match="shape"):
        make_dataset(tmp_path / "d", eval_kinds=("shape",))


def test_check_data_on_good_and_bad_files(synthetic, tmp_path, capsys):
    from scripts.check_data import check
    assert check(synthetic["sft"], PROJECT_TOKENIZER, 640, None, num_workers=0, decode_images=True) == 0
    out = capsys.readouterr().out
    assert "rows          200 (200 usable, 0 bad)" in out and "histogram" in out
    # too short a max_seq_len: two-image rows cannot fit their images
    assert check(synthetic["sft"], PROJECT_TOKENIZER, 300, None, num_workers=0, decode_images=False) == 1
    out = capsys.readouterr().out
    assert "too_long" in out and "skipped (too_long)" in out

    from tests.test_data import EXPECTED_BAD, bad_parquet
    assert check(bad_parquet(tmp_path), PROJECT_TOKENIZER, 640, None, num_workers=0, decode_images=True) == 1
    out = capsys.readouterr().out
    for kind, n in Counter(EXPECTED_BAD.values()).items():
        assert f"  {kind:14s} {n}" in out
    assert "rows          11 (2 usable, 9 bad)" in out
    assert "aspect ratio over 20:1" in out  # the 1 x 20000 image: reported, never resized (no MemoryError)


def test_check_data_takes_the_trainers_flag_names_and_the_old_ones(synthetic, capsys):
    from scripts.check_data import build_parser, main
    new = build_parser().parse_args(["--data_path", "d.jsonl", "--max_seq_len", "300", "--images_path", "imgs",
                                     "--num_workers", "0"])
    old = build_parser().parse_args(["d.jsonl", "--max_length", "300", "--image_root", "imgs", "--workers", "0"])
    assert (new.max_seq_len, new.images_path, new.num_workers) == (old.max_seq_len, old.images_path, old.num_workers) == (
        300, "imgs", 0)
    assert "--max_length" not in build_parser().format_help()  # the old names are hidden
    with pytest.raises(SystemExit) as e:
        main(["--data_path", str(synthetic["sft"]), "--max_seq_len", "640", "--num_workers", "0", "--no_images"])
    assert e.value.code == 0 and "rows          200" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("--max_seq_len", "0"), ("--num_workers", "-1"), ("--max_length", "x"),
                                         ("--workers", "-2")])
def test_check_data_rejects_bad_numbers(flag, value, capsys):
    from scripts.check_data import build_parser
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["d.parquet", flag, value])
    assert e.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err
