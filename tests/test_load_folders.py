"""--load_from FOLDER runs none of the folder's code unless --trust_remote_code is given: our own folders
are built from this repository's classes, LLaVA / Llama exports from stock transformers classes."""
import argparse
import json
import shutil

import pytest
import torch

import eval_vlm
from model.load import ModelLoadError, add_model_args, load_model
from model.model_vlm import MiniMindVLM, VLMConfig, load_vision_encoder
from model.weights import load_weights
from scripts.convert_vlm import main as convert
from tests.infer_helpers import HIDDEN, LAYERS, model_flags, png_bytes, tiny_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def plant_marker(py_file, marker) -> None:
    """Make importing `py_file` write `marker` (what hostile code in a downloaded folder could do)."""
    head, sep, rest = py_file.read_text().partition("from __future__ import annotations\n")
    py_file.write_text(head + sep + f"open({str(marker)!r}, 'w').write('ran')\n" + rest)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_clip):
    d = tmp_path_factory.mktemp("folders")
    src = tiny_weights(d)
    flags = model_flags(d, tiny_clip)
    for direction in ("to_hf", "to_llava", "to_llama"):
        assert convert([direction, *flags, "--out_dir", str(d / direction)]) == 0
    native = MiniMindVLM(VLMConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS))
    load_weights(native, src)
    native.vision_encoder = load_vision_encoder(tiny_clip)
    return d, flags, native.eval()


def args_for(flags: list[str], folder, *extra: str) -> argparse.Namespace:
    return add_model_args(argparse.ArgumentParser()).parse_args([*flags, "--load_from", str(folder), *extra])


def logits(model) -> torch.Tensor:
    ids = torch.cat([torch.tensor([[1, 300]]), torch.full((1, 196), 34), torch.tensor([[400, 2]])], dim=1)
    px = torch.randn(1, 1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids, pixel_values=px).logits


def test_own_folder_never_runs_its_code(exported, tmp_path, capsys):
    d, flags, native = exported
    folder = tmp_path / "hostile_hf"
    shutil.copytree(d / "to_hf", folder)
    marker = tmp_path / "ran.txt"
    for py in ("model_vlm.py", "model_minimind.py"):
        plant_marker(folder / py, marker)
    model, _ = load_model(args_for(flags, folder))
    assert not marker.exists()
    assert "Do you wish to run the custom code" not in capsys.readouterr().out  # nor asks about it
    assert type(model) is MiniMindVLM  # this repository's class, not the folder's copy
    assert torch.equal(logits(model), logits(native))
    # With the flag, transformers imports the folder's code: the marker shows the check above can fail.
    load_model(args_for(flags, folder, "--trust_remote_code"))
    assert marker.read_text() == "ran"


def test_trust_remote_code_warns_once(exported, caplog):
    d, flags, native = exported
    with caplog.at_level("WARNING", logger="minimind"):
        model, _ = load_model(args_for(flags, d / "to_hf", "--trust_remote_code"))
    warnings = [r.getMessage() for r in caplog.records if r.name == "minimind" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "--trust_remote_code" in warnings[0] and str(d / "to_hf") in warnings[0]
    assert torch.equal(logits(model), logits(native))


def test_foreign_code_needs_the_flag(exported, tmp_path, capsys):
    d, flags, _ = exported
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "ran.txt"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "custom-vlm", "auto_map": {"AutoConfig": "custom.CustomConfig",
                                                 "AutoModelForCausalLM": "custom.CustomModel"}}))
    (folder / "custom.py").write_text("")
    plant_marker(folder / "custom.py", marker)
    assert eval_vlm.main(flags + ["--load_from", str(folder), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trust_remote_code" in err and "custom-vlm" in err
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017  (the planted module has no classes: loading fails after it ran)
        load_model(args_for(flags, folder, "--trust_remote_code"))
    assert marker.exists()


def test_other_models_are_refused(exported, tmp_path):
    _, flags, _ = exported
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="a 'gpt2' model, not MiniMind-V"):
        load_model(args_for(flags, tmp_path))


@pytest.mark.parametrize("kind", ["to_llava", "to_llama"])
def test_stock_exports_load_without_remote_code(exported, kind):
    d, flags, native = exported
    model, tokenizer = load_model(args_for(flags, d / kind))
    assert type(model) is MiniMindVLM
    if kind == "to_llava":
        assert torch.equal(logits(model), logits(native))
    else:  # the LM alone: text logits match (the projection is not in a Llama folder)
        ids = torch.tensor([[1, 300, 301, 2]])
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, native(ids).logits, atol=1e-5)
    assert tokenizer is not None


def test_folder_flags_are_checked(exported, tmp_path, capsys):
    d, flags, _ = exported
    img = tmp_path / "red.png"
    img.write_bytes(png_bytes())
    assert eval_vlm.main(flags + ["--load_from", str(d / "to_hf"), "--num_hidden_layers", "3", "--image", str(img)]) == 2
    assert f"{d / 'to_hf'} holds a {LAYERS}-layer, hidden-{HIDDEN} dense model; --num_hidden_layers 3 disagrees" in \
        capsys.readouterr().err
