"""The API server under hostile and busy clients: limits, malformed requests, cancellation, concurrency, keys.

Loopback only; every wait is bounded. A "slow" model (each decoder forward sleeps 20 ms) makes a long
request really long, so freeing its row early is visible.
"""
import base64
import io
import json
import threading
import time

import httpx
import pytest

from tests.infer_helpers import model_args, png_bytes, running_server, tiny_weights

pytestmark = pytest.mark.usefixtures("one_thread")
CONTEXT = 512


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tiny_clip):
    from model.load import load_model
    save_dir = tmp_path_factory.mktemp("weights")
    tiny_weights(save_dir)
    return lambda: load_model(model_args(save_dir, tiny_clip))


@pytest.fixture(scope="module")
def server(loaded):
    from model.engine import Engine
    from scripts.serve_openai_api import Limits, create_app
    limits = Limits(max_body_mb=1, max_image_mb=0.25, max_image_pixels=10_000_000, max_n=3)
    with running_server(create_app(Engine(*loaded(), max_batch=16, max_context=CONTEXT), "tiny",
                                   limits=limits)) as url:
        yield url


@pytest.fixture(scope="module")
def slow_model(loaded):
    import time as _time
    model, tok = loaded()
    hook = model.model.register_forward_pre_hook(lambda *a: _time.sleep(0.02))
    yield model, tok
    hook.remove()


@pytest.fixture(scope="module")
def slow_server(slow_model):
    """One row, one waiting place: a 1000-token answer takes ~20 s unless it is cancelled."""
    from model.engine import Engine
    from scripts.serve_openai_api import create_app
    with running_server(create_app(Engine(*slow_model, max_batch=1, max_queue=1, max_context=2048), "slow")) as url:
        yield url


def client(url: str, key: str = "none", timeout: float = 60):
    from openai import OpenAI
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=timeout)


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_msg(data: bytes, text: str = "What is it?") -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(data)}},
                                         {"type": "text", "text": text}]}]


def png(size, mode="L") -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new(mode, size, 100).save(buf, format="PNG")
    return buf.getvalue()


HI = [{"role": "user", "content": "hi"}]


def malformed_bodies() -> list[tuple[str, bytes | dict]]:
    """(name, body): every one must get a 4xx in OpenAI's shape, streamed or not."""
    junk_image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}
    return [
        ("not json", b"{not json"),
        ("messages not a list", b'{"messages": "hello"}'),
        ("content a number", b'{"messages": [{"role": "user", "content": 5}]}'),
        ("no messages", {"messages": []}),
        ("role tool", {"messages": [{"role": "tool", "content": "x"}]}),
        ("last message from assistant", {"messages": [{"role": "user", "content": "a"},
                                                      {"role": "assistant", "content": "b"}]}),
        ("empty prompt", {"messages": [{"role": "user", "content": "   "}]}),
        ("max_tokens a string", {"messages": HI, "max_tokens": "many"}),
        ("max_tokens 0", {"messages": HI, "max_tokens": 0}),
        ("max_tokens -1", {"messages": HI, "max_tokens": -1}),
        ("max_tokens 1e9", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e9}'),
        ("max_tokens 2**70", {"messages": HI, "max_tokens": 2 ** 70}),
        ("max_tokens over the context", {"messages": HI, "max_tokens": CONTEXT + 1}),
        ("n -5", {"messages": HI, "n": -5}),
        ("n 0", {"messages": HI, "n": 0}),
        ("n 100", {"messages": HI, "n": 100}),
        ("temperature 5", {"messages": HI, "temperature": 5}),
        ("top_p 0", {"messages": HI, "top_p": 0}),
        ("seed a string", {"messages": HI, "seed": "abc"}),
        ("five stop strings", {"messages": HI, "stop": ["a", "b", "c", "d", "e"]}),
        ("empty stop string", {"messages": HI, "stop": [""]}),
        ("stop a number", {"messages": HI, "stop": 5}),
        ("frequency_penalty", {"messages": HI, "frequency_penalty": 1.0}),
        ("tools", {"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}),
        ("prompt over the context", {"messages": [{"role": "user", "content": " ".join(map(str, range(600)))}]}),
        ("text far over the context", {"messages": [{"role": "user", "content": "x" * 600_000}]}),
        ("many tiny messages", {"messages": [{"role": "user", "content": "hi"}] * 3000}),
        ("196 @ in text", {"messages": [{"role": "user", "content": "@" * 196}]}),
        ("<image> in text", {"messages": [{"role": "user", "content": "look <image>"}]}),
        ("lone surrogate", b'{"messages": [{"role": "user", "content": "bad \\ud800 text"}]}'),
        ("surrogate in stop", b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}'),
        ("not an image", {"messages": [{"role": "user", "content": [junk_image]}]}),
        ("not base64", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]}),
        ("data URI without base64", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}]}),
        ("http URL", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}),
        ("nine images", {"messages": [{"role": "user", "content": [junk_image] * 9}]}),
        ("image over the byte limit", {"messages": image_msg(b"\0" * 300_000)}),
        ("1x20000 image", {"messages": image_msg(png((1, 20000)))}),
        ("8000x8000 image", {"messages": image_msg(png((8000, 8000)))}),
        ("truncated image", {"messages": image_msg(png_bytes()[:60])}),
        ("body over the limit", {"messages": [{"role": "user", "content": "y" * 1_200_000}]}),
        ("unknown part type", {"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}),
        ("deeply nested JSON", b"[" * 100_000),
        ("temperature NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
        ("max_tokens 1e400", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}'),
        ("seed 2**200 and n over the limit", {"messages": HI, "seed": 2 ** 200, "n": 4}),
        ("json array body", b'[{"role": "user", "content": "hi"}]'),
        ("empty body", b""),
    ]


def test_malformed_request_sweep(server):
    """Every malformed request, plain and streamed: a 4xx JSON error in OpenAI's shape, within the timeout."""
    sent = four = five = hangs = 0
    failures = []
    with httpx.Client(timeout=30) as http:
        for name, body in malformed_bodies():
            for stream in (False, True):
                if isinstance(body, dict):
                    content = json.dumps({**body, "stream": stream}).encode()
                elif stream:
                    continue  # raw bytes are sent once
                else:
                    content = body
                sent += 1
                try:
                    r = http.post(f"{server}/v1/chat/completions", content=content,
                                  headers={"content-type": "application/json"})
                except httpx.TimeoutException:
                    hangs += 1
                    failures.append((name, stream, "hang"))
                    continue
                four += 400 <= r.status_code < 500
                five += r.status_code >= 500
                ok = 400 <= r.status_code < 500 and isinstance(r.json().get("error", {}).get("message"), str)
                if not ok or "/" + "tmp" in r.text:
                    failures.append((name, stream, r.status_code, r.text[:200]))
        # the server still serves
        assert http.get(f"{server}/v1/models").status_code == 200
        assert http.post(f"{server}/v1/chat/completions", json={"messages": HI, "max_tokens": 2}).status_code == 200
    print(f"\nmalformed-request sweep: {sent} sent, {four} 4xx, {five} 5xx, {hangs} hangs")
    assert not failures, failures
    assert five == 0 and hangs == 0 and four == sent


def test_chunked_body_over_the_limit_is_refused(server):
    def body():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"z" * 65536
        yield b'"}]}'
    r = httpx.post(f"{server}/v1/chat/completions", content=body(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]


def test_other_errors_in_openai_shape(server):
    r = httpx.get(f"{server}/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(f"{server}/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_prompt_plus_max_tokens_past_the_context_is_capped(server):
    import openai
    c = client(server)
    text = " ".join(map(str, range(120)))
    r = c.chat.completions.create(model="tiny", max_tokens=CONTEXT, temperature=0.0,
                                  messages=[{"role": "user", "content": text}])
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= CONTEXT
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", max_tokens=CONTEXT + 1, messages=HI)
    assert "context" in e.value.message


def test_n_stop_and_seed_are_honoured(server):
    c = client(server)
    r = c.chat.completions.create(model="tiny", max_tokens=6, temperature=1.0, n=3, messages=HI, seed=1)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    again = c.chat.completions.create(model="tiny", max_tokens=6, temperature=1.0, n=3, messages=HI, seed=1)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in r.choices]
    other = c.chat.completions.create(model="tiny", max_tokens=6, temperature=1.0, n=3, messages=HI, seed=2)
    assert [ch.message.content for ch in other.choices] != [ch.message.content for ch in r.choices]
    assert c.chat.completions.create(model="tiny", max_tokens=2, temperature=1.0, messages=HI, seed=-2 ** 200).choices
    chunks = list(c.chat.completions.create(model="tiny", max_tokens=4, n=2, messages=HI, stream=True))
    assert {ch.choices[0].index for ch in chunks if ch.choices} == {0, 1}
    free = c.chat.completions.create(model="tiny", max_tokens=24, temperature=0.0, messages=HI)
    text = free.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = c.chat.completions.create(model="tiny", max_tokens=24, temperature=0.0, messages=HI, stop=stop)
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = c.chat.completions.create(model="tiny", max_tokens=24, temperature=0.0, messages=HI, stop=[stop],
                                         stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == text[:text.index(stop)]


def test_48_concurrent_streams_all_finish(server):
    """More streams than anyio's 40 worker threads (the old server deadlocked at 41), images in half of them."""
    results, errors = {}, []

    def one(i):
        try:
            c = client(server, timeout=120)
            msgs = image_msg(png_bytes((30 * (i % 8), 60, 90)), f"question {i}") if i % 2 else \
                [{"role": "user", "content": f"question {i}"}]
            stream = c.chat.completions.create(model="tiny", max_tokens=8, temperature=0.0, messages=msgs,
                                               stream=True)
            chunks = list(stream)
            results[i] = (chunks[-1].choices[0].finish_reason, "".join(ch.choices[0].delta.content or ""
                                                                       for ch in chunks if ch.choices))
        except Exception as e:  # reported below
            errors.append(repr(e))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(48)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    assert httpx.get(f"{server}/v1/models", timeout=10).status_code == 200  # still answering meanwhile
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert len(results) == 48 and all(f in ("stop", "length") for f, _ in results.values())
    c = client(server)  # the same answer alone as in the crowd
    alone = c.chat.completions.create(model="tiny", max_tokens=8, temperature=0.0,
                                      messages=[{"role": "user", "content": "question 6"}])
    assert alone.choices[0].message.content == results[6][1]


def test_dropped_stream_frees_its_row_at_once(slow_server):
    c = client(slow_server)
    stream = c.chat.completions.create(model="slow", max_tokens=1000, messages=HI, stream=True)
    for _, _ in zip(range(4), stream):
        pass
    stream.close()  # the client goes away after a few chunks
    t0 = time.perf_counter()
    nxt = c.chat.completions.create(model="slow", max_tokens=20, messages=HI, stream=True)
    next(iter(nxt))
    first = time.perf_counter() - t0
    list(nxt)
    assert first < 1.0, f"the next request started after {first:.1f} s"


def test_abandoned_non_streaming_request_is_cancelled(slow_server):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{slow_server}/v1/chat/completions", json={"messages": HI, "max_tokens": 1000}, timeout=0.5)
    t0 = time.perf_counter()
    r = httpx.post(f"{slow_server}/v1/chat/completions", json={"messages": HI, "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and time.perf_counter() - t0 < 3.0


def test_full_queue_gets_503_with_retry_after(slow_server):
    c = client(slow_server)
    running = c.chat.completions.create(model="slow", max_tokens=1000, messages=HI, stream=True)
    next(iter(running))  # holds the only row
    waiting = {}
    t = threading.Thread(target=lambda: waiting.update(r=httpx.post(
        f"{slow_server}/v1/chat/completions", json={"messages": HI, "max_tokens": 2}, timeout=60)))
    t.start()
    deadline = time.time() + 10
    while httpx.get(f"{slow_server}/health", timeout=5).json()["queued"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    r = httpx.post(f"{slow_server}/v1/chat/completions", json={"messages": HI, "max_tokens": 2}, timeout=10)
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "server_busy"
    running.close()
    t.join(30)
    assert waiting["r"].status_code == 200


def test_too_many_open_requests_get_an_openai_shaped_503(slow_model):
    """Past --max_connections open requests every path but /health gets OpenAI's error shape + Retry-After
    (uvicorn's own limit answers plain text), and the slot is free again once the stream ends."""
    import openai

    from model.engine import Engine
    from scripts.serve_openai_api import Limits, create_app
    app = create_app(Engine(*slow_model, max_batch=1, max_queue=4), "slow", limits=Limits(max_connections=1))
    with running_server(app) as url:
        running = client(url).chat.completions.create(model="slow", max_tokens=1000, messages=HI, stream=True)
        next(iter(running))  # the one open request
        for r in (httpx.post(f"{url}/v1/chat/completions", json={"messages": HI, "max_tokens": 2}, timeout=10),
                  httpx.get(f"{url}/v1/models", timeout=10), httpx.get(f"{url}/nowhere", timeout=10)):
            err = r.json()["error"]
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert err["code"] == "server_busy" and err["type"] == "server_error" and "busy" in err["message"]
        with pytest.raises(openai.InternalServerError) as caught:
            client(url).models.list()
        assert caught.value.code == "server_busy"
        assert httpx.get(f"{url}/health", timeout=10).json()["running"] == 1
        running.close()
        deadline, status = time.time() + 20, 503
        while status == 503 and time.time() < deadline:
            status = httpx.get(f"{url}/v1/models", timeout=10).status_code
            time.sleep(0.05)
        assert status == 200


def test_shutdown_mid_stream_sends_an_error_event_then_done(slow_model):
    from model.engine import Engine
    from scripts.serve_openai_api import create_app
    engine = Engine(*slow_model, max_batch=1)
    with running_server(create_app(engine, "slow")) as url:
        body = {"messages": HI, "stream": True, "max_tokens": 1000}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            lines = []
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3:
                    engine.close()
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][len("data: "):])["error"]["message"] == "the server is shutting down"


def test_api_key(loaded, monkeypatch):
    import openai

    from model.engine import Engine
    from scripts.serve_openai_api import create_app, get_parser
    monkeypatch.setenv("MINIMIND_API_KEY", "s3cret")
    assert get_parser().parse_args([]).api_key == "s3cret"
    with running_server(create_app(Engine(*loaded(), max_batch=2), "tiny", api_key="s3cret")) as url:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            r = httpx.post(f"{url}/v1/chat/completions", json={"messages": HI, "max_tokens": 2}, headers=headers,
                           timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        r = client(url, "s3cret").chat.completions.create(model="tiny", max_tokens=2, messages=HI)
        assert r.choices[0].message.content is not None
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_sigterm_ends_the_server_with_streams_open(tmp_path, tiny_clip):
    """The script itself: SIGTERM during open streams ends it within seconds (the old server hung)."""
    import os
    import signal
    import subprocess
    import sys

    from model import ROOT
    from tests.infer_helpers import free_port, model_flags
    tiny_weights(tmp_path)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve_openai_api.py"), *model_flags(tmp_path, tiny_clip),
                             "--port", str(port), "--max_batch", "2", "--max_connections", "3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        streams = [client(url).chat.completions.create(model="x", max_tokens=1500, messages=HI, stream=True)
                   for _ in range(3)]  # two running, one waiting
        next(iter(streams[0]))
        busy = httpx.get(f"{url}/v1/models", timeout=10)  # a fourth open request
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "server_busy"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
