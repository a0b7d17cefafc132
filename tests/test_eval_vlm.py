"""eval_vlm.py: one-shot answers, image folders, interactive chat, --bench scoring, clear errors."""
import io
import json
import sys

import pytest

import eval_vlm
from tests.infer_helpers import model_flags, png_bytes, tiny_weights


@pytest.fixture(scope="module")
def flags(tmp_path_factory, tiny_clip):
    save_dir = tmp_path_factory.mktemp("weights")
    tiny_weights(save_dir)
    return model_flags(save_dir, tiny_clip) + ["--max_new_tokens", "12"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    for name, colour in [("red.png", (220, 30, 30)), ("blue.png", (30, 60, 220))]:
        (d / name).write_bytes(png_bytes(colour))
    (d / "notes.txt").write_text("ignored: not an image suffix")
    return d


def test_one_image_with_prompt(flags, images, capsys):
    assert eval_vlm.main(flags + ["--image", str(images / "red.png"), "--prompt", "What colour?"]) == 0
    out = capsys.readouterr().out
    assert "<image>\nWhat colour?" in out and "tokens/s" in out and "first token after" in out


def test_several_images_and_bad_marker_count(flags, images, capsys):
    two = ["--image", str(images / "red.png"), "--image", str(images / "blue.png")]
    assert eval_vlm.main(flags + two + ["--prompt", "Compare <image> with <image>."]) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert eval_vlm.main(flags + two + ["--prompt", "Only one <image> here."]) == 2
    assert "2 image(s)" in capsys.readouterr().err


def test_image_dir_uses_default_prompt(flags, images, capsys):
    assert eval_vlm.main(flags + ["--image_dir", str(images), "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "[image] blue.png" in out and "[image] red.png" in out and "notes.txt" not in out
    assert out.count("描述一下这个图像的内容") == 2


def test_interactive_chat(flags, images, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is it?\nAnd again?\n\n"))
    assert eval_vlm.main(flags + ["--chat", "--image", str(images / "red.png")]) == 0
    assert capsys.readouterr().out.count("tokens/s") == 2


def test_user_mistakes_are_reported_without_traceback(flags, tmp_path, capsys):
    assert eval_vlm.main(flags + ["--image", str(tmp_path / "missing.png")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert eval_vlm.main(flags + ["--image", str(bad)]) == 2
    assert "not an image" in capsys.readouterr().err
    assert eval_vlm.main(flags + ["--weight", "nothing"]) == 2
    err = capsys.readouterr().err
    assert "weight file not found" in err and "scripts/download.py" in err
    assert eval_vlm.main(flags + ["--hidden_size", "512"]) == 2  # no such file for 512
    assert eval_vlm.main(flags + ["--vision_model_path", str(tmp_path)]) == 2
    assert "make_tiny_clip.py" in capsys.readouterr().err


@pytest.mark.parametrize("pred, ref, ok", [
    ("Red.", "red", True), ("It is red", "red", True), ("red green blue", "red", False),
    ("reddish", "red", False), ("left", "right", False), ("  LEFT  ", "left", True),
])
def test_scoring_rule(pred, ref, ok):
    assert eval_vlm.is_correct(pred, ref, {"red", "green", "blue", "left", "right"}) is ok


@pytest.mark.usefixtures("one_thread")
def test_bench_on_synthetic_eval(flags, tmp_path, capsys):
    from scripts.make_synthetic_data import KINDS, make_dataset
    paths = make_dataset(tmp_path / "syn", seed=0, n_pretrain=1, n_sft=1, n_eval=12, eval_kinds=KINDS)
    out_json = tmp_path / "bench.json"
    assert eval_vlm.main(flags + ["--bench", str(paths["eval"]), "--bench_out", str(out_json),
                                  "--batch_size", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("accuracy: ")
    report = json.loads(out_json.read_text())
    assert set(report["per_kind"]) == {"colour", "horizontal", "vertical", "two_images"}
    assert report["rows"] == 12 and sum(v["n"] for v in report["per_kind"].values()) == 12
    assert float(lines[-1].split()[-1]) == pytest.approx(report["accuracy"], abs=1e-4)
    assert eval_vlm.main(flags + ["--bench", str(paths["eval"]), "--blank_image", "--bench_limit", "4"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("accuracy: ")


def test_dtype_flag(flags, images, capsys):
    import argparse

    import torch

    from model.load import add_model_args, load_model, pick_dtype
    assert pick_dtype("cpu") == torch.float32
    assert pick_dtype("cpu", "bfloat16") == torch.bfloat16
    assert pick_dtype("cuda", "float32") == torch.float32  # an explicit choice needs no device query
    args = add_model_args(argparse.ArgumentParser()).parse_args(flags[:-2] + ["--dtype", "bfloat16"])
    model, _ = load_model(args)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert eval_vlm.main(flags + ["--dtype", "bfloat16", "--image", str(images / "red.png"), "--prompt", "Colour?"]) == 0
    assert "tokens/s" in capsys.readouterr().out


def test_weight_file_helpers(tmp_path):
    from model.load import list_weight_files, parse_weight_name
    assert parse_weight_name("sft_vlm_512.pth") == {"weight": "sft_vlm", "hidden_size": 512, "use_moe": 0}
    assert parse_weight_name("pretrain_vlm_768_moe.pth") == {"weight": "pretrain_vlm", "hidden_size": 768, "use_moe": 1}
    assert parse_weight_name("notes.pth") == {}
    for name in ("sft_vlm_64.pth", "sft_vlm_64_resume.pth", "readme.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_weight_files(tmp_path)] == ["sft_vlm_64.pth"]
    assert list_weight_files(tmp_path / "absent") == []


@pytest.mark.usefixtures("one_thread")
def test_bench_bad_rows_are_skipped_and_named(flags, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    conv = [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "red"}]
    rows = {"conversations": [json.dumps(conv)] * 3, "image_bytes": [[png_bytes()], [], [b"junk"]]}
    path = tmp_path / "q.parquet"
    pq.write_table(pa.table(rows), path)
    out = tmp_path / "q.json"
    assert eval_vlm.main(flags + ["--bench", str(path), "--batch_size", "2", "--bench_out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1].startswith("accuracy: ")
    report = json.loads(out.read_text())
    assert report["rows"] == 1 and report["skipped"]["count"] == 2
    assert report["skipped"]["examples"] == [
        f"{path} row 1: image_bytes: the conversation has 1 <image> marker(s) but 0 image(s)",
        f"{path} row 2: image: image 0 is not an image that can be read (UnidentifiedImageError)"]
    pq.write_table(pa.table({"conversations": [json.dumps(conv)], "image_bytes": [[b"junk"]]}), path)
    assert eval_vlm.main(flags + ["--bench", str(path)]) == 2
    assert f"{path}: no row could be scored (1 skipped: {path} row 0: image: image 0 is not an image" in \
        capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_bench_public_layouts_end_to_end(flags, tmp_path, capsys):
    from tests import bench_fixtures as fx
    quick = ["--bench_method", "loglik", "--bench_baseline", "0"]
    for path, fmt, extra in ((fx.mmstar(tmp_path / "mmstar.parquet"), "mmstar", []),
                             (fx.scienceqa(tmp_path / "sqa" / "test-00000-of-00001.parquet").parent, "scienceqa", quick),
                             (fx.mmbench(tmp_path / "cn" / "dev-00000-of-00001.parquet", chinese=True), "mmbench_cn",
                              quick)):
        out = tmp_path / f"{fmt}.json"
        assert eval_vlm.main(flags + ["--bench", str(path), "--bench_limit", "3", "--bench_out", str(out),
                                      "--bench_max_new_tokens", "4", *extra]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        report = json.loads(out.read_text())
        assert report["format"] == fmt and report["rows"] == 3 and lines[-1].startswith("accuracy: ")
        assert lines[0].startswith(f"{fmt} {path}: 3 item(s) scored, 0 skipped")
    assert eval_vlm.main(flags + ["--bench", str(tmp_path / "mmstar.parquet"), "--bench_format", "pope"]) == 2
    assert "--bench_format pope needs columns ['question_id']" in capsys.readouterr().err


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (valid CRCs, almost no pixel data): refused before decoding."""
    import struct
    import zlib
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))


def test_image_dir_skips_bad_files_and_counts_them(flags, tmp_path, capsys):
    (tmp_path / "a_good.png").write_bytes(png_bytes())
    (tmp_path / "b_text.png").write_text("not an image at all")
    (tmp_path / "c_truncated.png").write_bytes(png_bytes(size=(200, 150))[:60])
    (tmp_path / "d_huge.png").write_bytes(huge_png_header(20000, 20000))
    (tmp_path / "e_good.jpg").write_bytes(png_bytes((10, 200, 10)))  # any decodable content counts
    assert eval_vlm.main(flags + ["--image_dir", str(tmp_path), "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert "[image] a_good.png" in out and "[image] e_good.jpg" in out and out.count("tokens/s") == 2
    skipped = [line for line in err.splitlines() if line.startswith("[skipped]")]
    assert len(skipped) == 3
    assert "b_text.png is not an image" in skipped[0] and "c_truncated.png" in skipped[1]
    assert "d_huge.png is too large" in skipped[2]
    assert out.strip().splitlines()[-1] == "2 image(s) answered, 3 skipped"
    for name in ("a_good.png", "e_good.jpg"):
        (tmp_path / name).unlink()
    assert eval_vlm.main(flags + ["--image_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: no image in {tmp_path} could be read (3 skipped)"
