"""A vision tower of another geometry (112 px, 16 px patches, 384 wide: 49 patches per image) trains,
generates, exports and loads with no code change: the geometry comes from the tower's own files."""
import json

import pytest
import torch

import eval_vlm
from model.model_vlm import MiniMindVLM, VLMConfig
from model.processor import tower_geometry_or_published, vision_geometry
from scripts.convert_vlm import main as convert
from tests.infer_helpers import model_flags, png_bytes
from tests.train_helpers import make_data, tiny_flags
from trainer.train_loop import main as train

pytestmark = pytest.mark.usefixtures("one_thread")

GEOMETRY = dict(image_size=112, patch_size=16, width=384)
PATCHES = (112 // 16) ** 2


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    from scripts.make_tiny_clip import make_clip
    return make_clip(tmp_path_factory.mktemp("clip") / "clip-112", **GEOMETRY)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_clip):
    """A few steps of the real trainer (SFT entry point) on the small tower."""
    root = tmp_path_factory.mktemp("geometry")
    data = make_data(root / "data", n=8)
    save_dir = root / "out"
    train("sft", tiny_flags(data / "sft.parquet", small_clip, save_dir, max_steps=2, packing=1))
    return save_dir


def test_the_tower_sets_the_geometry(small_clip):
    g = vision_geometry(small_clip)
    assert (g["image_size"], g["patch_size"], g["vision_hidden_size"]) == (112, 16, 384)
    config = VLMConfig(hidden_size=64, num_hidden_layers=2, **g)
    assert config.image_ids == [34] * PATCHES and config.image_special_token == "@" * PATCHES
    model = MiniMindVLM(config, vision_model_path=small_clip)
    assert model.vision_proj.vision_proj[0].weight.shape == (64, 384)
    feats = model.encode_images(torch.zeros(1, 1, 3, 112, 112))
    assert feats.shape == (1, 1, PATCHES, 384)


def test_without_a_tower_the_published_geometry_stays(small_clip, tmp_path):
    assert tower_geometry_or_published(small_clip) == vision_geometry(small_clip)
    assert tower_geometry_or_published(tmp_path / "no_tower") == {} == tower_geometry_or_published(None)
    assert VLMConfig(**tower_geometry_or_published(None)).image_ids == [34] * 196


def test_a_misfit_tower_is_a_one_line_error(small_clip, tiny_clip):
    with pytest.raises(ValueError, match=r"image_size 112 \(model: 224\).*vision_hidden_size 384 \(model: 768\)"):
        MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=2), vision_model_path=small_clip)
    model = MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=2, **vision_geometry(small_clip)))
    with pytest.raises(ValueError, match="does not fit this model") as e:
        model.attach_vision_encoder(tiny_clip)
    assert "\n" not in str(e.value)


def test_trained_and_generates_end_to_end(trained, small_clip, tmp_path, capsys):
    state = torch.load(trained / "sft_vlm_64.pth", weights_only=True)
    assert state["vision_proj.vision_proj.0.weight"].shape == (64, 384)
    img = tmp_path / "red.png"
    img.write_bytes(png_bytes())
    flags = model_flags(trained, small_clip) + ["--max_new_tokens", "5", "--temperature", "0"]
    assert eval_vlm.main(flags + ["--image", str(img), "--prompt", "Colour?"]) == 0
    assert "tokens/s" in capsys.readouterr().out


def test_exported_folder_carries_the_geometry(trained, small_clip, tiny_clip, tmp_path, capsys):
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor
    flags = model_flags(trained, small_clip)
    assert convert(["to_hf", *flags, "--out_dir", str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["image_size"], cfg["vision_hidden_size"], len(cfg["image_ids"])) == (112, 384, PATCHES)
    processor = AutoProcessor.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True, dtype=torch.float32,
                                                 vision_model_path=small_clip).eval()
    inputs = processor(text=processor.apply_chat_template([{"role": "user", "content": "<image>\nColour?"}],
                                                          add_generation_prompt=True),
                       images=[Image.new("RGB", (40, 30), (200, 30, 30))], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 1, 3, 112, 112) and int((inputs["input_ids"] == 34).sum()) == PATCHES
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    # the folder's geometry is checked against the tower it is given
    folder = model_flags(trained, tiny_clip) + ["--load_from", str(tmp_path / "hf"), "--prompt", "hi"]
    assert eval_vlm.main(folder) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "image_size 224 (model: 112)" in err
