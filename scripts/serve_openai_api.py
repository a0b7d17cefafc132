"""An OpenAI-compatible API for a MiniMind-V model: `/v1/models` and `/v1/chat/completions`.

    python scripts/serve_openai_api.py --port 8998 [model flags as in eval_vlm.py]

Messages take plain text or content parts: {"type": "text", "text": ...} and
{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}} (base64 data URIs only: the
server never fetches URLs). An image part stands where it appears in the text. `"stream": true`
answers with server-sent events ending in `data: [DONE]`. Bad requests get a 4xx JSON error in
OpenAI's shape ({"error": {"message", "type", "code"}}) and the server keeps serving. Binds
127.0.0.1 unless --host says otherwise; one generation runs at a time.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from model.chat import IMAGE_MARKER, ChatInputError, answer, open_image
from model.load import ModelLoadError, add_model_args, add_serve_args, load_model

MAX_IMAGE_BYTES = 20 * 1024 * 1024


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
    model_config = ConfigDict(extra="ignore")  # accept (and ignore) OpenAI fields we do not use
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.65, ge=0.0, le=2.0)
    top_p: float = Field(default=0.85, gt=0.0, le=1.0)
    frequency_penalty: float | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request"):
        self.status, self.message, self.code = status, message, code


def error_response(status: int, message: str, code: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": code}})


def decode_data_uri(url: str) -> bytes:
    if not url.startswith("data:"):
        raise APIError(400, "image_url must be a base64 data URI (data:image/png;base64,...); "
                            "this server does not fetch URLs", "unsupported_image_url")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise APIError(400, "image data URI must be base64-encoded", "invalid_image")
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
        raise APIError(413, f"image larger than {MAX_IMAGE_BYTES // 2**20} MiB", "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image data URI is not valid base64", "invalid_image") from None


def to_chat(messages: list[Message]) -> tuple[list[dict], list]:
    """OpenAI messages -> (messages with <image> markers, decoded PIL images in marker order)."""
    out, images = [], []
    for m in messages:
        if isinstance(m.content, str):
            if IMAGE_MARKER in m.content:  # a literal marker without an image would be read as a slot
                raise APIError(400, f"text may not contain {IMAGE_MARKER}: send images as image_url parts")
            out.append({"role": m.role, "content": m.content})
            continue
        text = []
        for part in m.content:
            if isinstance(part, TextPart):
                if IMAGE_MARKER in part.text:
                    raise APIError(400, f"text may not contain {IMAGE_MARKER}: send images as image_url parts")
                text.append(part.text)
            else:
                try:
                    images.append(open_image(decode_data_uri(part.image_url.url), f"image {len(images) + 1}"))
                except ChatInputError as e:
                    raise APIError(400, str(e), "invalid_image") from None
                text.append(IMAGE_MARKER)
        out.append({"role": m.role, "content": "\n".join(text)})
    return out, images


def create_app(model: Any, tokenizer: Any, model_name: str = "minimind-v") -> FastAPI:
    app = FastAPI(title="MiniMind-V OpenAI-compatible API")
    lock = threading.Lock()  # one generation at a time: the model and its caches are not shared-safe

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return error_response(400, "request body is not valid JSON", "invalid_json")
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in errs[:5])
        return error_response(400, f"invalid request: {msg}", "invalid_request")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "minimind"}]}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        messages, images = to_chat(req.messages)
        if messages[-1]["role"] != "user":
            raise APIError(400, "the last message must come from the user")
        max_tokens = req.max_completion_tokens or req.max_tokens or 512
        stats: dict = {}
        try:  # inputs are checked here, before any model work (which runs under the lock below)
            pieces = answer(model, tokenizer, messages, images, max_tokens, req.temperature, req.top_p, stats=stats)
        except ChatInputError as e:
            raise APIError(400, str(e)) from None
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def usage() -> dict:
            p, c = stats.get("prompt_tokens", 0), stats.get("new_tokens", 0)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        if not req.stream:
            with lock:
                text = "".join(pieces)
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": stats.get("finish_reason", "stop")}],
                    "usage": usage()}

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def events():
            yield chunk({"role": "assistant", "content": ""})
            with lock:
                for piece in pieces:
                    yield chunk({"content": piece})
            yield chunk({}, stats.get("finish_reason", "stop"),
                        **({"usage": usage()} if req.stream_options and req.stream_options.include_usage else {}))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_args(add_model_args(ap), port=8998)
    ap.add_argument("--model_name", default=None, help="id reported by /v1/models (default: the weight name)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model, tokenizer = load_model(args)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.model_name or (f"{args.weight}_{args.hidden_size}" if args.load_from == "model" else Path(args.load_from).name)
    import uvicorn
    uvicorn.run(create_app(model, tokenizer, name), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
