"""--quantize: int8 linear layers on the CPU, the embeddings left in fp32, generation through the engine."""
import pytest
import torch

from tests.infer_helpers import model_flags, tiny_weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("method", ["int8", "int8_dynamic"])
def test_quantized_model_generates(tmp_path, tiny_clip, method):
    import argparse

    from model.engine import Engine, GenRequest
    from model.load import add_model_args, load_model
    if method == "int8":
        pytest.importorskip("torchao")
    tiny_weights(tmp_path)
    parse = add_model_args(argparse.ArgumentParser()).parse_args
    ref, tok = load_model(parse(model_flags(tmp_path, tiny_clip)))
    model, _ = load_model(parse(model_flags(tmp_path, tiny_clip) + ["--quantize", method]))
    emb = model.model.embed_tokens.weight
    assert emb.dtype == torch.float32 and torch.equal(emb, ref.model.embed_tokens.weight)  # untied, untouched
    assert model.lm_head.weight is not emb
    ids = tok("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        a = ref(torch.tensor([ids])).logits[0, -1]
        b = model(torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(a, b, atol=0.05 * float(a.abs().max()))  # close to fp32, not equal
    engine = Engine(model, tok, max_batch=2)
    try:
        h = engine.submit(GenRequest(ids, None, max_new_tokens=5, n=2))
        assert len([ev for ev in h if ev.token is not None]) >= 2 and all(c >= 1 for c in h.completion_tokens)
    finally:
        engine.close()
