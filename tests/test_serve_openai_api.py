"""The OpenAI-compatible server, driven by the official `openai` client over loopback."""
import base64

import pytest

from tests.infer_helpers import model_args, png_bytes, running_server, tiny_weights


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_clip):
    from model.engine import Engine
    from model.load import load_model
    from scripts.serve_openai_api import create_app
    save_dir = tmp_path_factory.mktemp("weights")
    tiny_weights(save_dir)
    model, tokenizer = load_model(model_args(save_dir, tiny_clip))
    with running_server(create_app(Engine(model, tokenizer), "tiny")) as url:
        yield url


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def client(url: str):
    from openai import OpenAI
    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def test_models_and_completion(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.chat.completions.create(model="tiny", max_tokens=8, temperature=0.0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What colour?"}, image_part(png_bytes())]}])
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.prompt_tokens > 196  # the image slot is part of the prompt
    assert 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_streaming_matches_non_streaming(server):
    c = client(server)
    msgs = [{"role": "user", "content": "Say something."}]
    full = c.chat.completions.create(model="tiny", max_tokens=12, temperature=0.0, messages=msgs)
    chunks = list(c.chat.completions.create(model="tiny", max_tokens=12, temperature=0.0, messages=msgs,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_sse_ends_with_done(server):
    import httpx
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (b'{"messages": "hello"}', 400),                                           # wrong type
    (b'{"messages": [{"role": "user", "content": 5}]}', 400),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}', 400),
    (b'{"messages": []}', 400),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
     b'{"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]}', 400),          # "not an image"
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
     b'{"url": "data:image/png;base64,%%%"}}]}]}', 400),                       # not base64
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
     b'{"url": "http://example.com/a.png"}}]}]}', 400),                        # never fetched
    (b'{"messages": [{"role": "user", "content": "   "}]}', 400),                # empty prompt
])
def test_bad_requests_get_json_4xx_and_server_survives(server, body, status):
    import httpx
    r = httpx.post(f"{server}/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"]["message"], str)
    ok = httpx.post(f"{server}/v1/chat/completions", timeout=60,
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_binds_loopback_by_default():
    from scripts.serve_openai_api import get_parser
    assert get_parser().parse_args([]).host == "127.0.0.1"
