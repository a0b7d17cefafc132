"""Weight files: unreadable or unsafe files are one-line errors (and a pickle's code never runs), and a
file's sizes are read from the file itself, so the size flags only pick the file and are checked."""
import argparse
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

import eval_vlm
from model import PROJECT_TOKENIZER
from model.load import ModelLoadError, choose_weight_file
from model.model_vlm import MiniMindVLM, VLMConfig
from model.weights import (
    WeightFileError,
    WeightMismatchError,
    check_shape,
    describe_shape,
    export_state_dict,
    infer_shape,
    read_state_dict,
    save_weights,
)
from tests.infer_helpers import HIDDEN, LAYERS, model_flags, png_bytes, tiny_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Payload:
    """A pickle that runs a shell command when unpickled (what a malicious .pth does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def good_bytes(tmp_path) -> bytes:
    path = tmp_path / "good.pth"
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 2)}, path)
    return path.read_bytes()


def write_bad(kind: str, tmp_path):
    """(path, expected words in the message) for one kind of bad weight file."""
    path = tmp_path / ("bad.safetensors" if kind == "safetensors_header" else "bad.pth")
    if kind == "empty":
        path.write_bytes(b"")
        return path, "is empty (0 bytes)"
    if kind == "truncated_zip":
        path.write_bytes(good_bytes(tmp_path)[:300])
        return path, "truncated or corrupt"
    if kind == "truncated_legacy":  # torch's pre-zip format, cut short
        torch.save({"a": torch.zeros(100)}, path, _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[:-100])
        return path, "is truncated"
    if kind == "zeros":
        path.write_bytes(bytes(4096))
        return path, "is not a PyTorch weight file"
    if kind == "text":
        path.write_text("hello, this is not a weight file\n")
        return path, "is not a PyTorch weight file"
    if kind in ("malicious_pickle", "malicious_zip"):
        payload = {"model.embed_tokens.weight": Payload(tmp_path / "pwned")}
        if kind == "malicious_zip":
            torch.save(payload, path)
        else:
            path.write_bytes(pickle.dumps(payload))
        return path, ("not a plain weight file (it holds Python objects other than tensors); refusing to load it")
    if kind == "safetensors_header":
        path.write_bytes((16).to_bytes(8, "little") + b"{garbage!!!!!!!}" + b"xxxx")
        return path, "is not a readable safetensors file"
    if kind == "directory":
        path.mkdir()
        return path, "is a folder, not a weight file"
    if kind == "list":
        torch.save([torch.zeros(2)], path)
        return path, "holds a list, not a state dict"
    if kind == "dict_of_numbers":
        torch.save({"step": 3, "lr": 0.1}, path)
        return path, "entry 'step' is a int, not a tensor"
    raise AssertionError(kind)


BAD_KINDS = ["empty", "truncated_zip", "truncated_legacy", "zeros", "text", "malicious_pickle", "malicious_zip",
             "safetensors_header", "directory", "list", "dict_of_numbers"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_weight_files_are_one_line_errors(kind, tmp_path):
    path, words = write_bad(kind, tmp_path)
    with pytest.raises(WeightFileError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert words in message and str(path) in message
    assert "\n" not in message and "weights_only" not in message
    assert not (tmp_path / "pwned").exists()  # the pickle's command never ran


@pytest.mark.parametrize("kind", ["malicious_zip", "zeros", "empty"])
def test_entry_point_prints_bad_file_in_one_line(kind, tmp_path, tiny_clip, capsys):
    _, words = write_bad(kind, tmp_path)
    (tmp_path / "bad.pth").rename(tmp_path / "sft_vlm_64.pth")
    assert eval_vlm.main(model_flags(tmp_path, tiny_clip) + ["--image", "x.png"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err and "sft_vlm_64.pth" in err
    assert "weights_only" not in err
    assert not (tmp_path / "pwned").exists()


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="weight file not found"):
        read_state_dict(tmp_path / "nothing.pth")


# ---------------------------------------------------------------------------------- sizes from the file

@pytest.mark.parametrize("config", [
    dict(hidden_size=64, num_hidden_layers=2),
    dict(hidden_size=128, num_hidden_layers=3, num_key_value_heads=4, intermediate_size=200, vocab_size=500),
    dict(hidden_size=64, num_hidden_layers=1, use_moe=True, n_routed_experts=3, n_shared_experts=2),
    dict(hidden_size=32, num_hidden_layers=2, use_moe=True, n_routed_experts=2, n_shared_experts=0),
], ids=["dense", "custom_sizes", "moe", "moe_no_shared"])
def test_infer_shape_rebuilds_the_same_model(config):
    state = export_state_dict(MiniMindVLM(VLMConfig(**config)))
    shape = infer_shape(state)
    assert {k: shape[k] for k in config} == config
    rebuilt = export_state_dict(MiniMindVLM(VLMConfig(**shape)))
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in state.items()}


def test_infer_shape_of_an_lm_only_file_and_a_foreign_one():
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    lm = export_state_dict(MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=3)))
    assert describe_shape(infer_shape(lm)) == "3-layer, hidden-64 dense model"
    with pytest.raises(WeightMismatchError, match="x.pth has no model.embed_tokens.weight"):
        infer_shape({"encoder.weight": torch.zeros(2, 2)}, "x.pth")
    gap = {k: v for k, v in lm.items() if not k.startswith("model.layers.1.")}
    with pytest.raises(WeightMismatchError, match="incomplete"):
        infer_shape(gap)


def test_check_shape_names_both_shapes():
    shape = {"hidden_size": 128, "num_hidden_layers": 4, "use_moe": False}
    check_shape(shape, {"hidden_size": 128, "num_hidden_layers": None, "use_moe": 0}, "f.pth")
    with pytest.raises(WeightMismatchError) as info:
        check_shape(shape, {"hidden_size": None, "num_hidden_layers": 8, "use_moe": None}, "out/sft_vlm_128.pth")
    assert str(info.value) == ("out/sft_vlm_128.pth holds a 4-layer, hidden-128 dense model; --num_hidden_layers 8 "
                               "disagrees: drop the flag or pick another file")
    with pytest.raises(WeightMismatchError, match="--num_hidden_layers 8 and --use_moe 1 disagree: drop the flags"):
        check_shape(shape, {"hidden_size": 128, "num_hidden_layers": 8, "use_moe": 1}, "f.pth")


def test_entry_point_reads_sizes_from_the_file(tmp_path, tiny_clip, capsys):
    tiny_weights(tmp_path)
    bare = ["--save_dir", str(tmp_path), "--vision_model_path", str(tiny_clip), "--tokenizer_path",
            str(PROJECT_TOKENIZER), "--device", "cpu", "--max_new_tokens", "4"]
    (tmp_path / "red.png").write_bytes(png_bytes())
    bare += ["--image", str(tmp_path / "red.png")]
    assert eval_vlm.main(bare + ["--prompt", "hi"]) == 0  # no size flag: the only sft_vlm_*.pth, its sizes
    assert "tokens/s" in capsys.readouterr().out
    assert eval_vlm.main(bare + ["--num_hidden_layers", "8", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'sft_vlm_64.pth'} holds a {LAYERS}-layer, hidden-{HIDDEN} dense model; "
                   f"--num_hidden_layers 8 disagrees: drop the flag or pick another file\n")


def test_load_model_fills_in_the_sizes(tmp_path, tiny_clip):
    from model.load import add_model_args, load_model
    tiny_weights(tmp_path)
    args = add_model_args(argparse.ArgumentParser()).parse_args(
        ["--save_dir", str(tmp_path), "--vision_model_path", str(tiny_clip), "--tokenizer_path",
         str(PROJECT_TOKENIZER), "--device", "cpu"])
    model, _ = load_model(args)
    assert (args.hidden_size, args.num_hidden_layers, args.use_moe) == (HIDDEN, LAYERS, 0)
    assert model.config.hidden_size == HIDDEN and len(model.model.layers) == LAYERS


def test_choosing_the_file(tmp_path):
    def touch(*names):
        for n in names:
            (tmp_path / n).write_bytes(b"")
    with pytest.raises(ModelLoadError, match="weight file not found.*none.*scripts/download.py"):
        choose_weight_file(tmp_path, "sft_vlm")
    touch("sft_vlm_64_moe.pth", "pretrain_vlm_128.pth", "sft_vlm_64_resume.pth", "sft_vlm_extra_32.pth")
    assert choose_weight_file(tmp_path, "sft_vlm").name == "sft_vlm_64_moe.pth"  # the only one
    with pytest.raises(ModelLoadError, match="weight file not found"):
        choose_weight_file(tmp_path, "sft_vlm", use_moe=0)
    touch("sft_vlm_64.pth")
    assert choose_weight_file(tmp_path, "sft_vlm", 64).name == "sft_vlm_64.pth"  # dense first
    assert choose_weight_file(tmp_path, "sft_vlm", 64, use_moe=1).name == "sft_vlm_64_moe.pth"
    with pytest.raises(ModelLoadError) as info:
        choose_weight_file(tmp_path, "sft_vlm")
    assert "several sft_vlm weight files (sft_vlm_64.pth, sft_vlm_64_moe.pth)" in str(info.value)
    assert "--hidden_size" in str(info.value) and "\n" not in str(info.value)
    touch("sft_vlm_512.pth")
    assert choose_weight_file(tmp_path, "sft_vlm").name == "sft_vlm_512.pth"  # the published size wins


def test_convert_reads_sizes_from_the_file(tmp_path, tiny_clip):
    from scripts.convert_vlm import main as convert
    torch.manual_seed(0)
    save_weights(MiniMindVLM(VLMConfig(hidden_size=32, num_hidden_layers=3, use_moe=True)),
                 tmp_path / "sft_vlm_32_moe.pth")
    flags = ["--save_dir", str(tmp_path), "--tokenizer_path", str(PROJECT_TOKENIZER)]
    assert convert(["to_hf", *flags, "--out_dir", str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["use_moe"]) == (32, 3, True)
    assert convert(["to_hf", *flags, "--num_hidden_layers", "2", "--out_dir", str(tmp_path / "x")]) == 2


def test_no_traceback_from_a_subprocess(tmp_path, tiny_clip):
    """The real command line: a malicious file, one line on stderr, exit 2, the payload never ran."""
    path, words = write_bad("malicious_zip", tmp_path)
    path.rename(tmp_path / "sft_vlm_64.pth")
    r = subprocess.run([sys.executable, "eval_vlm.py", *model_flags(tmp_path, tiny_clip), "--prompt", "hi"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'sft_vlm_64.pth'} is {words}"
    assert not (tmp_path / "pwned").exists()
