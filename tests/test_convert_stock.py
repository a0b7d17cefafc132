"""scripts/convert_vlm.py to_llava / to_llama: stock transformers folders (no trust_remote_code) that compute
what MiniMind-V computes, and read back to the native file bit-exactly."""
import json
import shutil

import pytest
import torch

from model.chat import build_inputs
from model.model_vlm import MiniMindVLM, VLMConfig, load_vision_encoder
from model.processor import MiniMindVLMProcessor
from model.weights import load_weights, read_state_dict
from scripts.check_llamacpp import random_lm
from scripts.convert_vlm import main as convert
from tests.infer_helpers import HIDDEN, LAYERS, model_flags

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
WORST: dict[str, float] = {}  # worst logit difference per export, printed at the end of the module


def peaky_weights(save_dir, seed: int = 0, use_moe: bool = False):
    """A random MiniMind-V whose matrices are scaled up, so greedy choices are not near-ties."""
    return random_lm(save_dir, HIDDEN, LAYERS, seed=seed, use_moe=use_moe, name="sft_vlm")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_clip):
    d = tmp_path_factory.mktemp("stock")
    src = peaky_weights(d)
    flags = model_flags(d, tiny_clip)
    assert convert(["to_llava", *flags, "--out_dir", str(d / "llava")]) == 0
    assert convert(["to_llama", *flags, "--out_dir", str(d / "llama")]) == 0
    ours = MiniMindVLM(VLMConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS))
    load_weights(ours, src)
    ours.vision_encoder = load_vision_encoder(tiny_clip)
    return d, src, flags, ours.eval()


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if WORST:
        print("\nworst |logit difference| per export: " + ", ".join(f"{k} {v:.2e}" for k, v in WORST.items()))


def images():
    from PIL import Image
    g = torch.Generator().manual_seed(1)
    return [Image.fromarray(torch.randint(0, 256, (48 + 16 * i, 64, 3), generator=g, dtype=torch.uint8).numpy())
            for i in range(2)]


CHATS = {
    "text": ([{"role": "user", "content": "Hello there, what is a tiny model?"}], 0),
    "one_image": ([{"role": "user", "content": "<image>\nWhat colour is the shape?"}], 1),
    "two_images": ([{"role": "user", "content": "<image>\n<image>\nWhich is brighter?"},
                    {"role": "assistant", "content": "The first."},
                    {"role": "user", "content": "Why?"}], 2),
}


def record(name: str, diff: float) -> None:
    WORST[name] = max(WORST.get(name, 0.0), diff)
    assert diff <= TOL, f"{name}: max |logit diff| {diff:.3g}"


def llava_inputs(processor, messages, imgs):
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=prompt, images=imgs or None, return_tensors="pt")


def test_llava_folder_is_stock(exported):
    d = exported[0] / "llava"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and "auto_map" not in cfg
    assert cfg["text_config"]["model_type"] == "llama" and cfg["image_token_index"] == 34
    assert not list(d.glob("*.py"))
    assert "LLaVA" in (d / "README.md").read_text()


@pytest.mark.parametrize("chat", list(CHATS))
def test_llava_logits_equal_ours(exported, chat):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor
    d, _, _, ours = exported
    llava = LlavaForConditionalGeneration.from_pretrained(str(d / "llava"), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(d / "llava"))
    assert isinstance(processor, LlavaProcessor)
    messages, n = CHATS[chat]
    imgs = images()[:n]
    inputs = llava_inputs(processor, messages, imgs)
    # Same ids as our own chat pipeline; images become 196 ids 34 each.
    our_ids, our_px = build_inputs(MiniMindVLMProcessor.from_config(ours.config, processor.tokenizer), messages, imgs)
    assert torch.equal(inputs["input_ids"], our_ids)
    assert int((our_ids == 34).sum()) == 196 * n
    if n:
        assert (inputs["pixel_values"] - our_px[0]).abs().max() < 1e-5
    with torch.no_grad():
        a = ours(our_ids, pixel_values=our_px).logits
        b = llava(**inputs).logits
    record("to_llava", (a - b).abs().max().item())


def test_stray_at_sign(exported):
    """Known limit: the processor takes every '@' for an image marker. Text-only prompts with an '@' go through
    the tokenizer instead, and the model then computes ours (no images: nothing is replaced)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    d, _, _, ours = exported
    processor = AutoProcessor.from_pretrained(str(d / "llava"))
    messages = [{"role": "user", "content": "Mail me at a@b.c"}]
    with pytest.raises(ValueError, match="no images were passed"):
        llava_inputs(processor, messages, [])
    ids = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)["input_ids"]
    assert int((ids == 34).sum()) == 1
    llava = LlavaForConditionalGeneration.from_pretrained(str(d / "llava"), dtype=torch.float32).eval()
    with torch.no_grad():
        record("to_llava", (ours(ids).logits - llava(input_ids=ids).logits).abs().max().item())


def test_llava_generate_gives_our_tokens(exported):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    d, _, _, ours = exported
    llava = LlavaForConditionalGeneration.from_pretrained(str(d / "llava"), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(d / "llava"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    inputs = llava_inputs(processor, messages, images()[:1])
    kw = dict(max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        got = llava.generate(**inputs, **kw)
        want = ours.generate(inputs["input_ids"], pixel_values=inputs["pixel_values"][None], **kw)
    assert torch.equal(got, want)


def test_llava_chat_template_matches_the_tokenizer(exported):
    from transformers import AutoProcessor

    from model import PROJECT_TOKENIZER
    from model.processor import load_tokenizer
    d = exported[0] / "llava"
    processor = AutoProcessor.from_pretrained(str(d))
    tok = load_tokenizer(PROJECT_TOKENIZER)
    for messages, _ in CHATS.values():
        plain = [{**m, "content": m["content"].replace("<image>", "@")} for m in messages]
        assert processor.apply_chat_template(messages, add_generation_prompt=True) == \
            tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    listed = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q"}]}]
    assert "@\n@\nQ<|im_end|>" in processor.apply_chat_template(listed)


def test_llama_logits_and_tokens_equal_ours(exported):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    d, _, _, ours = exported
    llama = AutoModelForCausalLM.from_pretrained(str(d / "llama"), dtype=torch.float32).eval()
    assert isinstance(llama, LlamaForCausalLM)
    ids = torch.randint(3, 6400, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        record("to_llama", (ours(ids).logits - llama(ids).logits).abs().max().item())
        kw = dict(max_new_tokens=12, do_sample=False)
        assert torch.equal(llama.generate(ids[:1], **kw), ours.generate(ids[:1], **kw))


def test_llama_carries_yarn(exported, tmp_path):
    from transformers import LlamaForCausalLM
    d, src, flags, _ = exported
    assert convert(["to_llama", *flags, "--inference_rope_scaling", "1", "--out_dir", str(tmp_path / "y")]) == 0
    rope = json.loads((tmp_path / "y" / "config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == "yarn" and rope["factor"] == 16 and rope["original_max_position_embeddings"] == 2048
    ours = MiniMindVLM(VLMConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, inference_rope_scaling=True))
    load_weights(ours, src)
    llama = LlamaForCausalLM.from_pretrained(str(tmp_path / "y"), dtype=torch.float32).eval()
    ids = torch.randint(3, 6400, (1, 64), generator=torch.Generator().manual_seed(1))
    plain = LlamaForCausalLM.from_pretrained(str(d / "llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ours.eval()(ids).logits
        record("to_llama (YaRN)", (want - llama(ids).logits).abs().max().item())
        assert (want - plain(ids).logits).abs().max() > 1e-3  # YaRN does change the logits


@pytest.mark.parametrize("kind", ["llava", "llama"])
def test_round_trip_back_to_pth_is_exact(exported, kind):
    d, src, flags, _ = exported
    out = d / f"back_{kind}.pth"
    assert convert(["to_pth", *flags, "--load_from", str(d / kind), "--out", str(out)]) == 0
    a, b = read_state_dict(src), read_state_dict(out)
    if kind == "llama":  # the LM alone: an LM-only file, like llm_512.pth
        a = {k: v for k, v in a.items() if not k.startswith("vision_proj.")}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_are_one_line_errors(exported, tmp_path, capsys):
    d, _, flags, _ = exported
    assert convert(["to_llama", *flags, "--use_moe", "1", "--out_dir", str(tmp_path / "m")]) == 2
    assert "to_llava" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert convert(["to_llama", *flags, "--out_dir", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert convert(["to_llava", *flags, "--out_dir", str(d)]) == 2  # a folder with other things in it
    assert "not a model folder" in capsys.readouterr().err
    assert convert(["to_llava", *flags, "--vision_model_path", str(tmp_path / "none"),
                    "--out_dir", str(tmp_path / "v")]) == 2
    assert "--vision_model_path" in capsys.readouterr().err
    # A LLaVA folder whose projector is a real MLP is not ours: refused, not silently truncated.
    bad = tmp_path / "bad"
    shutil.copytree(d / "llava", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["projector_hidden_act"] = "gelu"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert convert(["to_pth", *flags, "--load_from", str(bad), "--out", str(tmp_path / "x.pth")]) == 2
    assert "not a MiniMind-V export" in capsys.readouterr().err
    (bad / "model.safetensors").unlink()
    assert convert(["to_pth", *flags, "--load_from", str(bad), "--out", str(tmp_path / "x.pth")]) == 2
    assert "no model.safetensors" in capsys.readouterr().err
    lm = tmp_path / "lm"
    shutil.copytree(d / "llama", lm)
    cfg = json.loads((lm / "config.json").read_text())
    del cfg["vocab_size"]
    (lm / "config.json").write_text(json.dumps(cfg))
    assert convert(["to_pth", *flags, "--load_from", str(lm), "--out", str(tmp_path / "x.pth")]) == 2
    assert "lacks 'vocab_size'" in capsys.readouterr().err
    (bad / "config.json").write_text("{not json")
    assert convert(["to_pth", *flags, "--load_from", str(bad), "--out", str(tmp_path / "x.pth")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_moe_llava_equals_ours_and_reads_back(tmp_path, tiny_clip):
    """MoE: the LLaVA text model is a stock Qwen2-MoE (zero shared-expert gate, doubled shared down_proj)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    src = peaky_weights(tmp_path, seed=3, use_moe=True)
    flags = model_flags(tmp_path, tiny_clip) + ["--use_moe", "1"]
    assert convert(["to_llava", *flags, "--out_dir", str(tmp_path / "moe")]) == 0
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["text_config"]["model_type"] == "qwen2_moe"
    ours = MiniMindVLM(VLMConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, use_moe=True))
    load_weights(ours, src)
    ours.vision_encoder = load_vision_encoder(tiny_clip)
    ours.eval()
    llava = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "moe"), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "moe"))
    for chat in ("text", "two_images"):
        messages, n = CHATS[chat]
        inputs = llava_inputs(processor, messages, images()[:n])
        px = inputs["pixel_values"][None] if n else None
        with torch.no_grad():
            record("to_llava (MoE)", (ours(inputs["input_ids"], pixel_values=px).logits
                                      - llava(**inputs).logits).abs().max().item())
    with torch.no_grad():
        kw = dict(max_new_tokens=10, do_sample=False)
        assert torch.equal(llava.generate(**inputs, **kw), ours.generate(inputs["input_ids"], pixel_values=px, **kw))
    out = tmp_path / "back.pth"
    assert convert(["to_pth", *flags, "--load_from", str(tmp_path / "moe"), "--out", str(out)]) == 0
    a, b = read_state_dict(src), read_state_dict(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
