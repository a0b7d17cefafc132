"""scripts/convert_vlm.py: .pth -> transformers folder -> .pth, identical logits, usable by eval_vlm.py."""
import json

import pytest
import torch

import eval_vlm
from model.model_vlm import MiniMindVLM, VLMConfig
from model.weights import load_weights, read_state_dict
from scripts.convert_vlm import main as convert
from tests.infer_helpers import HIDDEN, LAYERS, model_flags, png_bytes, tiny_weights


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_clip):
    d = tmp_path_factory.mktemp("convert")
    src = tiny_weights(d)
    flags = model_flags(d, tiny_clip)
    assert convert(["to_hf", *flags, "--out_dir", str(d / "hf")]) == 0
    return d, src, flags


def logits_of(model, tiny_clip) -> torch.Tensor:
    from model.model_vlm import load_vision_encoder
    model.vision_encoder = load_vision_encoder(tiny_clip)
    ids = torch.cat([torch.tensor([[1, 300, 301]]), torch.full((1, 196), 34), torch.tensor([[400, 2, 1]])], dim=1)
    px = torch.randn(1, 1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(ids, pixel_values=px).logits


def test_folder_layout(converted):
    d, _, _ = converted
    import json
    cfg = json.loads((d / "hf" / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"].endswith("MiniMindVLM")
    assert {"model.safetensors", "model_vlm.py", "model_minimind.py", "tokenizer.json"} <= {
        p.name for p in (d / "hf").iterdir()}
    saved = read_state_dict(d / "hf" / "model.safetensors")
    assert not any(k.startswith("vision_encoder.") for k in saved)


def test_from_pretrained_offline_gives_identical_logits(converted, tiny_clip):
    from transformers import AutoModelForCausalLM
    d, src, _ = converted
    native = MiniMindVLM(VLMConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS))
    load_weights(native, src)
    hf = AutoModelForCausalLM.from_pretrained(str(d / "hf"), trust_remote_code=True, dtype=torch.float32)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # re-tied
    assert torch.equal(hf.model.rotary_emb.cos, native.model.rotary_emb.cos)  # non-persistent: rebuilt
    assert torch.equal(hf.model.rotary_emb.sin, native.model.rotary_emb.sin)
    assert torch.equal(logits_of(hf, tiny_clip), logits_of(native, tiny_clip))


def test_from_pretrained_attaches_the_vision_tower(converted, tiny_clip):
    """`vision_model_path=` loads CLIP after the folder (not inside __init__ on the meta device)."""
    from transformers import AutoModelForCausalLM

    from model.model_vlm import load_vision_encoder
    d, src, _ = converted
    hf = AutoModelForCausalLM.from_pretrained(str(d / "hf"), trust_remote_code=True, dtype=torch.float32,
                                              vision_model_path=tiny_clip)
    ref = load_vision_encoder(tiny_clip).state_dict()
    got = hf.vision_encoder.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    native = MiniMindVLM(VLMConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS))
    load_weights(native, src)
    assert torch.equal(logits_of(hf, tiny_clip), logits_of(native, tiny_clip))


def test_round_trip_back_to_pth_is_exact(converted):
    d, src, flags = converted
    out = d / "back.pth"
    assert convert(["to_pth", *flags, "--load_from", str(d / "hf"), "--out", str(out)]) == 0
    a, b = read_state_dict(src), read_state_dict(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_vlm_loads_the_folder(converted, tiny_clip, tmp_path, capsys):
    d, _, flags = converted
    img = tmp_path / "red.png"
    img.write_bytes(png_bytes())
    assert eval_vlm.main(flags + ["--load_from", str(d / "hf"), "--image", str(img), "--prompt", "Colour?",
                                  "--max_new_tokens", "6"]) == 0
    assert "tokens/s" in capsys.readouterr().out


def test_missing_inputs_are_clear_errors(tmp_path, tiny_clip, capsys):
    flags = model_flags(tmp_path, tiny_clip)
    assert convert(["to_hf", *flags]) == 2
    assert "weight file not found" in capsys.readouterr().err
    assert convert(["to_pth", *flags, "--load_from", str(tmp_path)]) == 2
    assert "transformers model folder" in capsys.readouterr().err


def test_processor_in_the_folder_drives_generate(converted, tiny_clip):
    """AutoProcessor (remote code: tokenizer + image processor + <image> expansion) and then
    model.generate(**processor(text=..., images=...)); the tokenizer alone is a stock class."""
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    from model.processor import load_tokenizer
    d, src, _ = converted
    folder = str(d / "hf")
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)  # no custom tokenizer code
    assert type(tok).__module__.startswith("transformers.") and tok("@" * 3)["input_ids"] == [34] * 3
    assert "AutoTokenizer" not in json.loads((d / "hf" / "tokenizer_config.json").read_text()).get("auto_map", {})
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                 vision_model_path=tiny_clip).eval()
    red, blue = Image.new("RGB", (64, 48), (220, 30, 30)), Image.new("RGB", (30, 60), (30, 60, 220))
    chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
             [{"role": "user", "content": "Compare <image> with <image>."}]]
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in chats]
    assert texts[0].endswith("<image>\nColour?<|im_end|>\n<|im_start|>assistant\n")
    inputs = processor(text=texts, images=[red, red, blue], return_tensors="pt", padding=True, padding_side="left")
    assert inputs["pixel_values"].shape == (2, 2, 3, 224, 224) and inputs["num_images"].tolist() == [1, 2]
    assert (inputs["input_ids"] == 34).sum(1).tolist() == [196, 392]
    with torch.no_grad():
        batched = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)[:, inputs["input_ids"].shape[1]:]
        one = processor(text=texts[1], images=[red, blue], return_tensors="pt")
        alone = model.generate(**one, max_new_tokens=5, do_sample=False, pad_token_id=0)[:, one["input_ids"].shape[1]:]
    assert torch.equal(batched[1], alone[0])
    # the same ids and pixels as the project's own chat pipeline
    from model.chat import build_inputs
    from model.processor import MiniMindVLMProcessor
    ours = MiniMindVLMProcessor.from_config(model.config, load_tokenizer(d / "hf"))
    ids, px = build_inputs(ours, chats[1], [red, blue])
    assert torch.equal(ids, one["input_ids"]) and torch.equal(px, one["pixel_values"])
    with pytest.raises(ValueError, match="1 <image> marker.* but 2 image"):
        processor(text="one <image> only", images=[red, blue])


def test_images_without_slots_are_refused_not_dropped(converted, tiny_clip):
    """generate with pixel_values but a prompt without image slots used to run, the image ignored."""
    from transformers import AutoModelForCausalLM
    d, _, _ = converted
    model = AutoModelForCausalLM.from_pretrained(str(d / "hf"), trust_remote_code=True, dtype=torch.float32,
                                                 vision_model_path=tiny_clip).eval()
    with pytest.raises(ValueError, match="sample 0 has 0 image slot.* but 1 image"):
        model.generate(torch.tensor([[1, 5, 6, 7]]), pixel_values=torch.zeros(1, 1, 3, 224, 224), max_new_tokens=2)


def test_processor_refuses_a_hostile_image_before_resizing(converted):
    import io

    from PIL import Image
    from transformers import AutoProcessor
    d, _, _ = converted
    processor = AutoProcessor.from_pretrained(str(d / "hf"), trust_remote_code=True)
    buf = io.BytesIO()
    Image.new("L", (1, 20000), 128).save(buf, format="PNG")
    with Image.open(buf) as tall, pytest.raises(ValueError, match="aspect ratio over 20:1"):
        processor(text="<image> what?", images=[tall])
