"""The VLM: vision tower loading, the image splice, strict weight files, the tokenizer layout."""
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from model.model_vlm import MiniMindVLM, VLMConfig
from model.processor import DEFAULT_PATCHES as PATCHES
from model.processor import image_slots, load_tokenizer
from model.weights import WeightMismatchError, export_state_dict, load_weights, save_weights, weight_path

SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             max_position_embeddings=1024)
AT = 34


@pytest.fixture(scope="module")
def vlm(tiny_clip):
    torch.manual_seed(0)
    return MiniMindVLM(VLMConfig(**SMALL), vision_model_path=tiny_clip).eval()


def reference_splice(model: MiniMindVLM, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Obviously correct and slow: walk each row, take 196-long placeholder matches left to right."""
    h = model.model.embed_tokens(ids).clone()
    proj = model.vision_proj(feats)
    for b in range(ids.shape[0]):
        row, t, k = ids[b].tolist(), 0, 0
        while t + PATCHES <= len(row):
            if all(x == AT for x in row[t:t + PATCHES]):
                h[b, t:t + PATCHES] = proj[b, k]
                t, k = t + PATCHES, k + 1
            else:
                t += 1
    return h


def text(n: int) -> list[int]:
    return torch.randint(100, 6400, (n,)).tolist()


def build(rows: list[list[int]]) -> torch.Tensor:
    T = max(map(len, rows))
    return torch.tensor([r + [0] * (T - len(r)) for r in rows])


def test_splice_matches_reference_on_hard_cases(vlm):
    img = [AT] * PATCHES
    rows = [
        text(3) + img + text(5),                          # one image
        text(7),                                          # no image in this sample
        text(2) + img + text(1) + img + text(4),          # two images
        [AT] + text(2) + [AT, AT] + img + text(3),        # stray '@' before, adjacent to a slot
        img + img + [AT] * 3,                             # back-to-back slots, 3 stray after
    ]
    ids = build(rows)
    feats = torch.randn(len(rows), 2, PATCHES, 768)
    with torch.no_grad():
        got = vlm.embed(ids, image_features=feats, num_images=torch.tensor([1, 0, 2, 1, 2]))
        assert torch.allclose(got, reference_splice(vlm, ids, feats), atol=1e-6)
    in_slot, idx, patch = image_slots(ids, AT)
    assert in_slot.sum(1).tolist() == [196, 0, 392, 196, 392]
    assert idx[2][in_slot[2]].unique().tolist() == [0, 1]


def test_splice_batch_size_one_and_4d_pixel_values(vlm):
    ids = torch.tensor([text(4) + [AT] * PATCHES + text(3)])
    pv = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = vlm.encode_images(pv)
        assert feats.shape == (1, 1, PATCHES, 768)
        a = vlm(ids, pixel_values=pv).logits
        b = vlm(ids, pixel_values=pv[:, None]).logits
        c = vlm(ids, image_features=feats).logits
    assert torch.equal(a, b) and torch.allclose(a, c)
    assert a.shape == (1, ids.shape[1], 6400)


def test_image_features_come_from_patch_tokens(vlm):
    pv = torch.randn(2, 2, 3, 224, 224)
    with torch.no_grad():
        feats = vlm.encode_images(pv)
        direct = vlm.vision_encoder(pixel_values=pv[1, 1][None]).last_hidden_state[0, 1:]
    assert feats.shape == (2, 2, PATCHES, 768)
    assert torch.allclose(feats[1, 1], direct, atol=1e-5)


def test_image_changes_only_later_positions(vlm):
    ids = torch.tensor([text(5) + [AT] * PATCHES + text(6)])
    with torch.no_grad():
        a = vlm(ids, pixel_values=torch.zeros(1, 1, 3, 224, 224)).logits
        b = vlm(ids, pixel_values=torch.ones(1, 1, 3, 224, 224)).logits
    assert torch.allclose(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, -6:], b[:, -6:])


def test_more_slots_than_images_names_the_sample(vlm):
    ids = build([text(3), text(2) + [AT] * PATCHES * 2])
    with pytest.raises(ValueError, match="sample 1 has 2 image slot"):
        vlm(ids, pixel_values=torch.zeros(2, 1, 3, 224, 224), num_images=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="sample 1"):
        vlm(ids)


def test_images_without_slots_are_an_error_not_dropped(vlm):
    """More images than slots used to run, the extra images silently ignored."""
    with pytest.raises(ValueError, match="sample 0 has 0 image slot.* but 2 image"):
        vlm(torch.tensor([[1, 5, 6, 7]]), pixel_values=torch.zeros(1, 2, 3, 224, 224))
    ids = build([text(3) + [AT] * PATCHES, text(4)])
    with pytest.raises(ValueError, match="sample 1 has 0 image slot.* but 1 image"):
        vlm(ids, pixel_values=torch.zeros(2, 1, 3, 224, 224))


def test_num_images_marks_zero_padding(vlm):
    """A batch's zero-padded image places are not images: num_images says how many are real, and only
    those are encoded; the result is what each sample gives alone."""
    a = torch.tensor([text(3) + [AT] * PATCHES + text(2) + [AT] * PATCHES])
    b = torch.tensor([text(3) + [AT] * PATCHES + text(2) + [9] * PATCHES])
    pv = torch.randn(2, 2, 3, 224, 224)
    pv[1, 1] = 0.0  # padding
    calls = []
    hook = vlm.vision_encoder.register_forward_pre_hook(lambda m, args, kw: calls.append(kw["pixel_values"].shape[0]),
                                                        with_kwargs=True)
    try:
        with torch.no_grad():
            both = vlm(torch.cat([a, b]), pixel_values=pv, num_images=torch.tensor([2, 1])).logits
            alone = [vlm(a, pixel_values=pv[:1]).logits, vlm(b, pixel_values=pv[1:, :1]).logits]
    finally:
        hook.remove()
    assert calls[0] == 3  # the padding was not encoded
    assert torch.allclose(both[0], alone[0][0], atol=1e-5) and torch.allclose(both[1], alone[1][0], atol=1e-5)
    with pytest.raises(ValueError, match="sample 1 has 1 image slot.* but 2 image"):
        vlm(torch.cat([a, b]), pixel_values=pv)  # without num_images every given image counts
    with pytest.raises(ValueError, match="num_images"):
        vlm(torch.cat([a, b]), pixel_values=pv, num_images=torch.tensor([3, 1]))


def test_images_without_vision_encoder_is_an_error():
    model = MiniMindVLM(VLMConfig(**SMALL))
    ids = torch.tensor([[5] + [AT] * PATCHES])
    with pytest.raises(ValueError, match="no vision encoder"):
        model(ids, pixel_values=torch.zeros(1, 1, 3, 224, 224))


def test_vision_tower_frozen_and_in_eval_mode(vlm):
    vlm.train()
    try:
        assert not vlm.vision_encoder.training
        assert not any(p.requires_grad for p in vlm.vision_encoder.parameters())
        ids = torch.tensor([text(3) + [AT] * PATCHES + text(3)])
        out = vlm(ids, pixel_values=torch.randn(1, 1, 3, 224, 224), labels=ids)
        out.loss.backward()
        assert vlm.vision_proj.vision_proj[0].weight.grad is not None
        assert all(p.grad is None for p in vlm.vision_encoder.parameters())
    finally:
        vlm.zero_grad(set_to_none=True)
        vlm.eval()


def test_text_only_training_batch_still_reaches_vision_proj(vlm):
    """DDP needs a gradient for every trainable parameter, even on a batch without images."""
    vlm.train()
    try:
        ids = torch.tensor([text(8)])
        vlm(ids, labels=ids).loss.backward()
        g = vlm.vision_proj.vision_proj[0].weight.grad
        assert g is not None and torch.count_nonzero(g) == 0
    finally:
        vlm.zero_grad(set_to_none=True)
        vlm.eval()


def test_vision_tower_loads_from_full_clip_folder(tmp_path):
    """A full CLIPModel checkpoint (text tower too): only the vision tower is kept."""
    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=12, image_size=224, patch_size=16)
    textc = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    full = CLIPModel(CLIPConfig(text_config=textc.to_dict(), vision_config=vision.to_dict()))
    full.save_pretrained(tmp_path)
    model = MiniMindVLM(VLMConfig(**SMALL), vision_model_path=tmp_path)
    assert not any(n.startswith("text") for n, _ in model.vision_encoder.named_parameters())
    ref = full.vision_model.embeddings.patch_embedding.weight
    assert torch.equal(model.vision_encoder.embeddings.patch_embedding.weight, ref)


def test_missing_clip_folder_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_tiny_clip"):
        MiniMindVLM(VLMConfig(**SMALL), vision_model_path=tmp_path / "nope")


def test_weight_file_round_trip_gives_identical_logits(vlm, tiny_clip, tmp_path):
    path = weight_path(tmp_path, "sft_vlm", 64, False)
    assert path.name == "sft_vlm_64.pth"
    save_weights(vlm, path)
    sd = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert not any(k.startswith("vision_encoder.") for k in sd)
    assert set(sd) == set(export_state_dict(vlm))
    torch.manual_seed(123)
    other = MiniMindVLM(VLMConfig(**SMALL), vision_model_path=tiny_clip).eval()
    report = load_weights(other, path)
    assert report["missing"] and all(k.startswith("vision_encoder.") for k in report["missing"])
    ids = torch.tensor([text(3) + [AT] * PATCHES + text(4)])
    pv = torch.randn(1, 1, 3, 224, 224)
    half = MiniMindVLM(VLMConfig(**SMALL), vision_model_path=tiny_clip).eval()
    half.load_state_dict({k: v.half() for k, v in vlm.state_dict().items() if not k.startswith("vision_encoder.")},
                         strict=False)
    with torch.no_grad():
        assert torch.equal(other(ids, pixel_values=pv).logits, half(ids, pixel_values=pv).logits)


def test_lm_only_file_loads_into_vlm_but_wrong_keys_raise(vlm, tmp_path):
    lm_only = {k: v for k, v in export_state_dict(vlm).items() if not k.startswith("vision_proj.")}
    torch.save(lm_only, tmp_path / "llm_64.pth")
    target = MiniMindVLM(VLMConfig(**SMALL))
    report = load_weights(target, tmp_path / "llm_64.pth")
    assert set(report["missing"]) == {"vision_proj.vision_proj.0.weight", "vision_proj.vision_proj.0.bias"}
    assert torch.equal(target.model.norm.weight, vlm.model.norm.weight)

    renamed = {k.replace("model.layers", "model.blocks"): v for k, v in export_state_dict(vlm).items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(WeightMismatchError, match="missing .*model.layers.0.*\n.*unexpected .*model.blocks.0"):
        load_weights(MiniMindVLM(VLMConfig(**SMALL)), tmp_path / "renamed.pth")

    partial = export_state_dict(vlm)
    del partial["model.layers.1.mlp.up_proj.weight"]
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightMismatchError, match="model.layers.1.mlp.up_proj.weight"):
        load_weights(MiniMindVLM(VLMConfig(**SMALL)), tmp_path / "partial.pth")

    with pytest.raises(WeightMismatchError, match="wrong shape"):
        load_weights(MiniMindVLM(VLMConfig(**{**SMALL, "hidden_size": 128})), tmp_path / "llm_64.pth")


def test_safetensors_and_ddp_prefixed_files_load(vlm, tmp_path):
    from safetensors.torch import save_file
    sd = export_state_dict(vlm)
    sd["lm_head.weight"] = sd["lm_head.weight"].clone()
    save_file(sd, str(tmp_path / "w.safetensors"))
    load_weights(MiniMindVLM(VLMConfig(**SMALL)), tmp_path / "w.safetensors")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pth")
    load_weights(MiniMindVLM(VLMConfig(**SMALL)), tmp_path / "ddp.pth")


def test_published_tokenizer_layout(fixture_tokenizer_path):
    tok = load_tokenizer(fixture_tokenizer_path)
    cfg = VLMConfig()
    assert tok.convert_tokens_to_ids("@") == AT
    assert tok(cfg.image_special_token, add_special_tokens=False)["input_ids"] == cfg.image_ids == [AT] * PATCHES
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert len(tok) == 6400


def test_saved_weight_file_is_world_readable_like_any_file(vlm, tmp_path):
    import os
    path = tmp_path / "w.pth"
    save_weights(vlm, path)
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]  # no temporary file left behind
