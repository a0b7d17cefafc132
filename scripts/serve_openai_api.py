"""An OpenAI-compatible API for a MiniMind-V model: `/v1/models`, `/v1/chat/completions` and `/health`.

    python scripts/serve_openai_api.py --port 8998 [--api_key KEY] [--max_batch 16] [model flags as in eval_vlm.py]

Every request goes to one serving engine (model/engine.py): continuous batching, so many users are
served together, and a client that disconnects frees its row at the next step.

Messages take plain text or content parts: {"type": "text", "text": ...} and
{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}} (base64 data URIs only: the
server never fetches URLs). An image part stands where it appears in the text. Supported: `stream`
(server-sent events ending in `data: [DONE]`), `stream_options.include_usage`, `n` (up to --max_n),
`stop` (up to 4 strings), `seed`, `temperature`, `top_p`, `max_tokens` / `max_completion_tokens`, and
the extra `repetition_penalty`. Every limit is checked before the work it protects; a bad request gets
a 4xx JSON error in OpenAI's shape ({"error": {"message", "type", "param", "code"}}), a full queue or
more than --max_connections open requests a 503 in the same shape with Retry-After, and the server keeps
serving. Binds 127.0.0.1 unless --host says otherwise; set --api_key (or MINIMIND_API_KEY) whenever it
listens on anything else.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.argtypes import int_range, non_negative_int, positive_float, positive_int
from model.chat import ChatInputError, check_text, encode_chat, image_tensor
from model.engine import DEFAULT_MAX_CONTEXT, IMAGE_CACHE, PREFILL_BUDGET, Engine, EngineBusy, EngineClosed, GenRequest, Handle
from model.load import ModelLoadError, add_model_args, add_serve_args, load_model
from model.processor import IMAGE_MARKER, MAX_ASPECT, MAX_IMAGE_PIXELS, MiniMindVLMProcessor

log = logging.getLogger("minimind")


@dataclass
class Limits:
    """What one request (and all open ones together) may ask for; each is checked before the work it protects."""
    max_body_mb: float = 32.0          # the whole request body, before JSON parsing
    max_images: int = 8                # images per request, counted before any is decoded
    max_image_mb: float = 10.0         # encoded bytes per image, before base64 decoding
    max_image_pixels: int = MAX_IMAGE_PIXELS  # width x height from the image header, before decoding
    max_aspect: float = MAX_ASPECT     # long side / short side, before resizing
    max_n: int = 4                     # choices per request
    max_stop: int = 4                  # stop strings per request (as OpenAI)
    max_stop_chars: int = 64
    default_max_tokens: int = 512
    max_connections: int = 512         # requests being served at once (streams included); more get 503


# ------------------------------------------------------------------------------------------ request schema

class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields that change nothing here (user, metadata, ...)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.65, ge=0.0, le=2.0)
    top_p: float = Field(default=0.85, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    # Asked for but not supported: refused rather than silently ignored.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None,
                 headers: dict | None = None):
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    kind = {401: "authentication_error", 413: "invalid_request_error", 503: "server_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_headers(status: int, headers: dict | None = None) -> dict:
    """Every 503 says when to try again (the official clients wait that long before retrying)."""
    return {"Retry-After": "1", **(headers or {})} if status == 503 else dict(headers or {})


def error_response(status: int, message: str, code: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, code, param),
                        headers=error_headers(status, headers))


# ------------------------------------------------------------------------------------------ checks

@dataclass
class Prepared:
    gen: GenRequest
    include_usage: bool


def decode_data_uri(url: str, limits: Limits, name: str) -> bytes:
    if not url.startswith("data:"):
        raise APIError(400, "image_url must be a base64 data URI (data:image/png;base64,...); "
                            "this server does not fetch URLs", "unsupported_image_url")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise APIError(400, f"{name}: the data URI must be base64-encoded", "invalid_image")
    if len(payload) * 3 // 4 > limits.max_image_mb * 2 ** 20:
        raise APIError(413, f"{name} is larger than {limits.max_image_mb:g} MiB", "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{name}: the data URI is not valid base64", "invalid_image") from None


def check_options(req: ChatRequest, engine: Engine, limits: Limits) -> tuple[int, list[str]]:
    """The cheap checks of the sampling options: (max_tokens, stop strings)."""
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported (use repetition_penalty)", "unsupported_parameter", name)
    for name in ("logprobs", "tools", "response_format"):
        value = getattr(req, name)
        if value and not (name == "response_format" and value.get("type") == "text"):
            raise APIError(400, f"{name} is not supported by this server", "unsupported_parameter", name)
    if req.n > min(limits.max_n, engine.max_batch):
        raise APIError(400, f"n={req.n}: at most {min(limits.max_n, engine.max_batch)} choices per request",
                       "invalid_value", "n")
    max_tokens = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
    if max_tokens > engine.max_context:
        raise APIError(400, f"max_tokens={max_tokens} is larger than the whole context ({engine.max_context} "
                            f"tokens, prompt included)", "invalid_value", "max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > limits.max_stop or any(not s or len(s) > limits.max_stop_chars for s in stop):
        raise APIError(400, f"stop: up to {limits.max_stop} non-empty strings of at most {limits.max_stop_chars} "
                            f"characters", "invalid_value", "stop")
    for s in stop:
        check_text(s, "a stop string")
    return max_tokens, stop


def to_chat(req: ChatRequest, limits: Limits, processor: MiniMindVLMProcessor) -> tuple[list[dict], list]:
    """OpenAI messages -> (messages with <image> markers, preprocessed image tensors in marker order).
    Images are counted before any is decoded, and each is decoded, checked and preprocessed on its own
    (only one decoded image is alive at a time)."""
    n_images = sum(isinstance(p, ImagePart) for m in req.messages if isinstance(m.content, list) for p in m.content)
    if n_images > limits.max_images:
        raise APIError(400, f"{n_images} images: at most {limits.max_images} per request", "too_many_images")
    out, images = [], []
    for m in req.messages:
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        text = []
        for part in parts:
            if isinstance(part, TextPart):
                if IMAGE_MARKER in part.text:  # a literal marker without an image would be read as a slot
                    raise APIError(400, f"text may not contain {IMAGE_MARKER}: send images as image_url parts")
                text.append(part.text)
            else:
                name = f"image {len(images) + 1}"
                data = decode_data_uri(part.image_url.url, limits, name)
                images.append(image_tensor(processor, data, name, limits.max_image_pixels, limits.max_aspect))
                text.append(IMAGE_MARKER)
        out.append({"role": m.role, "content": "\n".join(text)})
    return out, images


def prepare(req: ChatRequest, engine: Engine, limits: Limits) -> Prepared:
    """Everything before the model: option checks, images, template, tokens vs the context."""
    max_tokens, stop = check_options(req, engine, limits)
    messages, images = to_chat(req, limits, engine.processor)
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must come from the user", param="messages")
    ids, pixel_values = encode_chat(engine, messages, images)
    # A prompt + max_tokens that crosses the context is capped to what is left (finish_reason "length").
    gen = GenRequest(ids, pixel_values, max_tokens, req.temperature, req.top_p, req.repetition_penalty,
                     req.seed, req.n, stop)
    return Prepared(gen, bool(req.stream_options and req.stream_options.include_usage))


# ------------------------------------------------------------------------------------------ middleware

class GuardMiddleware:
    """Pure ASGI: the API key (constant-time compare), the number of requests open at once and the body-size
    limit, before any parsing. A body over the limit is refused from its Content-Length, or while it streams
    in (chunked uploads). Counting open requests here rather than with uvicorn's `limit_concurrency` makes
    that refusal an OpenAI-shaped 503 with Retry-After (uvicorn's is plain text)."""

    def __init__(self, app: Any, api_key: str | None, max_body: int, max_open: int):
        self.app, self.api_key, self.max_body, self.max_open = app, api_key, max_body, max_open
        self.open = 0  # requests inside the app now; only the event loop's thread touches it

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"] != "/health":
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return await self._refuse(send, 401, "missing or wrong API key (Authorization: Bearer ...)",
                                          "invalid_api_key", {"www-authenticate": "Bearer"})
        if self.open >= self.max_open and scope["path"] != "/health":
            return await self._refuse(send, 503, f"server busy: {self.open} requests open; try again shortly",
                                      "server_busy")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await self._refuse(send, 400, "bad Content-Length", "invalid_request")
            if int(length) > self.max_body:
                return await self._refuse(send, 413, self._too_big(), "request_too_large")
        seen, refused = 0, False

        async def counted_receive() -> dict:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > self.max_body:  # a chunked upload without Content-Length: refuse as it grows
                    refused = True
                    await self._refuse(send, 413, self._too_big(), "request_too_large")
                    return {"type": "http.disconnect"}  # the app stops reading; its own answer is dropped
            return message

        async def guarded_send(message: dict) -> None:
            if not refused:
                await send(message)

        self.open += 1
        try:
            await self.app(scope, counted_receive, guarded_send)
        finally:
            self.open -= 1

    def _too_big(self) -> str:
        return f"request body larger than {self.max_body / 2 ** 20:g} MiB"

    @staticmethod
    async def _refuse(send: Any, status: int, message: str, code: str, headers: dict | None = None) -> None:
        body = json.dumps(error_body(status, message, code)).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in error_headers(status, headers).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------ the app

def create_app(engine: Engine, model_name: str = "minimind-v", api_key: str | None = None,
               limits: Limits | None = None, close_engine: bool = True) -> FastAPI:
    """The API over `engine`. The app closes the engine when it shuts down (unless close_engine=False)."""
    limits = limits or Limits()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if close_engine:
            await anyio.to_thread.run_sync(engine.close)

    app = FastAPI(title="MiniMind-V OpenAI-compatible API", lifespan=lifespan)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body=int(limits.max_body_mb * 2 ** 20),
                       max_open=limits.max_connections)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return error_response(400, "request body is not valid JSON", "invalid_json")
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                        for e in errs[:5])
        first = errs[0].get("loc", ()) if errs else ()
        return error_response(400, f"invalid request: {msg}"[:2000], "invalid_request",
                              str(first[1]) if len(first) > 1 else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, "internal server error", "internal_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": engine.running, "queued": engine.queued}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "minimind"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        try:  # CPU work (image decoding, tokenizing) off the event loop, no lock held
            prepared = await anyio.to_thread.run_sync(prepare, req, engine, limits)
        except ChatInputError as e:
            raise APIError(400, str(e), e.code) from None
        try:
            handle = engine.submit(prepared.gen, loop=asyncio.get_running_loop())
        except EngineBusy as e:
            raise APIError(503, f"server busy: {e}", "server_busy") from None
        except EngineClosed:
            raise APIError(503, "the server is shutting down", "server_shutting_down") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(sse_events(handle, cid, created, model_name, prepared.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await complete(handle, request, cid, created, model_name)

    return app


def usage(handle: Handle) -> dict:
    c = sum(handle.completion_tokens)
    return {"prompt_tokens": handle.prompt_tokens, "completion_tokens": c, "total_tokens": handle.prompt_tokens + c}


async def complete(handle: Handle, request: Request, cid: str, created: int, model_name: str) -> JSONResponse:
    """Collect a non-streamed answer; a client that gives up cancels the generation."""
    async def watch() -> None:
        while not handle.done:
            if await request.is_disconnected():
                handle.cancel()
                return
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    texts = [[] for _ in range(handle.request.n)]
    try:
        async for ev in handle:
            if ev.error:
                return error_response(503, ev.error, "generation_failed")
            texts[ev.index].append(ev.text)
    finally:
        watcher.cancel()
        handle.cancel()
    choices = [{"index": i, "message": {"role": "assistant", "content": "".join(t)},
                "finish_reason": handle.finish_reasons[i]} for i, t in enumerate(texts)]
    return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                         "choices": choices, "usage": usage(handle)})


async def sse_events(handle: Handle, cid: str, created: int, model_name: str, include_usage: bool):
    """Server-sent events for one request. When the client disconnects, Starlette cancels this generator
    at its next await and the `finally` frees the rows."""
    def chunk(choices: list, **extra: Any) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        for i in range(handle.request.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        async for ev in handle:
            if ev.error:  # the stream has started: report in-band, then end it properly
                yield f"data: {json.dumps(error_body(503, ev.error, 'generation_failed'))}\n\n"
                break
            if ev.text or ev.finish:
                delta = {"content": ev.text} if ev.text else {}
                yield chunk([{"index": ev.index, "delta": delta, "finish_reason": ev.finish}])
        if include_usage:
            yield chunk([], usage=usage(handle))
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()


# ------------------------------------------------------------------------------------------ command line

def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_args(add_model_args(ap), port=8998)
    ap.add_argument("--model_name", default=None, help="id reported by /v1/models (default: the weight name)")
    ap.add_argument("--api_key", default=os.environ.get("MINIMIND_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (default: $MINIMIND_API_KEY; unset = no key)")
    g = ap.add_argument_group("engine")
    g.add_argument("--max_batch", type=positive_int, default=16, help="rows decoded together (1 = one request at a time)")
    g.add_argument("--max_queue", type=non_negative_int, default=64, help="requests that may wait; more get 503")
    g.add_argument("--max_context", type=int_range(2), default=DEFAULT_MAX_CONTEXT,
                   help="prompt + answer tokens per request")
    g.add_argument("--threads", type=non_negative_int, default=0,
                   help="torch threads for the model (0: torch's default, one per core). On a machine where other "
                        "programs keep cores busy, leave them one: each parallel op waits for its slowest thread")
    g.add_argument("--image_cache", type=non_negative_int, default=IMAGE_CACHE,
                   help="images whose vision features are kept for later requests (a chat re-sends its images "
                        "every turn); 0: none")
    g.add_argument("--prefill_budget", type=positive_int, default=PREFILL_BUDGET,
                   help="prompt tokens prefilled per step; longer prompts are prefilled in chunks between decode steps")
    g.add_argument("--max_connections", type=positive_int, default=Limits.max_connections,
                   help="requests served at once, streams included; more get 503 + Retry-After")
    g = ap.add_argument_group("limits")
    d = Limits()
    g.add_argument("--max_body_mb", type=positive_float, default=d.max_body_mb)
    g.add_argument("--max_images", type=non_negative_int, default=d.max_images, help="images per request (0: text only)")
    g.add_argument("--max_image_mb", type=positive_float, default=d.max_image_mb, help="encoded bytes per image")
    g.add_argument("--max_image_pixels", type=positive_int, default=d.max_image_pixels, help="width x height per image")
    g.add_argument("--max_n", type=positive_int, default=d.max_n, help="choices per request (n)")
    g.add_argument("--default_max_tokens", type=positive_int, default=d.default_max_tokens,
                   help="new tokens when a request sets no max_tokens")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model, tokenizer = load_model(args)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("listening on %s without --api_key: anyone who can reach it can use it", args.host)
    name = args.model_name or (f"{args.weight}_{args.hidden_size}" if args.load_from == "model"
                               else Path(args.load_from).name)
    limits = Limits(args.max_body_mb, args.max_images, args.max_image_mb, args.max_image_pixels,
                    max_n=args.max_n, default_max_tokens=args.default_max_tokens,
                    max_connections=args.max_connections)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                    max_context=args.max_context, prefill_budget=args.prefill_budget, image_cache=args.image_cache)
    import uvicorn
    uvicorn.run(create_app(engine, name, args.api_key, limits), host=args.host, port=args.port,
                timeout_graceful_shutdown=5, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
