"""A gradio chat page for MiniMind-V: attach images to a question, watch the answer stream in, stop it.

    python web_demo.py [--port 7788] [--host 127.0.0.1] [--max_batch 8] [model flags as in eval_vlm.py]

One box takes the question and its images (paperclip, drag and drop or paste); the images join the
conversation with that question (one `<image>` slot each, before the text) and show as thumbnails in
the chat; the box is emptied when the question is sent. Stop cancels the answer being generated (its
row leaves the engine's batch at once). Every session's answers run in one shared serving engine
(model/engine.py), batched together. The weight menu lists the `.pth` files in --save_dir; picking one
loads it. Mistakes (empty question, no image, a file that is not an image, a huge image) are explained
in the status line without server paths, and the page keeps working. Binds 127.0.0.1 unless --host
says otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import sys
import time
from pathlib import Path

import gradio as gr

from model.argtypes import positive_int
from model.chat import MAX_IMAGES, ChatInputError, encode_chat, image_tensor, with_image_markers
from model.engine import Engine, EngineBusy, GenRequest, Handle
from model.load import ModelLoadError, add_model_args, add_serve_args, list_weight_files, load_model, parse_weight_name

MAX_UPLOAD = "25mb"

log = logging.getLogger("minimind")


class ModelHolder:
    """The loaded model, swapped when another weight file is picked."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.engine = Engine(*load_model(args), max_batch=args.max_batch)
        self.name = self.current_name()
        self.running: dict[str, Handle] = {}  # session -> the answer it is generating (for Stop)

    def stop(self, session: str) -> None:
        handle = self.running.pop(session, None)
        if handle is not None:
            handle.cancel()

    def current_name(self) -> str:
        a = self.args
        return f"{a.weight}_{a.hidden_size}{'_moe' if a.use_moe else ''}.pth" if a.load_from == "model" \
            else str(a.load_from)

    def choices(self) -> list[str]:
        names = [p.name for p in list_weight_files(self.args.save_dir)]
        return names if self.name in names else [self.name, *names]

    def switch(self, name: str) -> str:
        if name == self.name:
            return f"using {name}"
        spec = parse_weight_name(name)
        if not spec:
            return f"⚠️ {name}: not a `weight_hidden[_moe].pth` name; keeping {self.name}"
        args = copy.copy(self.args)
        args.load_from, args.weight = "model", spec["weight"]
        args.hidden_size, args.use_moe = spec["hidden_size"], spec["use_moe"]
        args.num_hidden_layers = None  # read from the file
        try:
            engine = Engine(*load_model(args), max_batch=args.max_batch)
        except ModelLoadError as e:
            return f"⚠️ could not load {name}: {e}; keeping {self.name}"
        old, self.engine = self.engine, engine
        old.close()  # answers still streaming from the old model end with an error event
        self.args, self.name = args, name
        return f"loaded {name}"


def empty_convo() -> dict:
    return {"messages": [], "images": []}


def build_demo(holder: ModelHolder) -> gr.Blocks:
    with gr.Blocks(title="MiniMind-V") as demo:
        gr.Markdown("## MiniMind-V\nAttach one or more images to a question; the answer streams in.")
        # Per-session conversation: messages with <image> markers and the preprocessed images so far.
        convo = gr.State(empty_convo())
        with gr.Row():
            with gr.Column(scale=1):
                weight = gr.Dropdown(holder.choices(), value=holder.name, label="Weights", elem_id="weights")
                temperature = gr.Slider(0.0, 1.5, value=0.65, step=0.05, label="temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=0.85, step=0.05, label="top_p")
                max_tokens = gr.Slider(8, 2048, value=512, step=8, label="max new tokens", elem_id="max_tokens")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=420)
                box = gr.MultimodalTextbox(label="Question", placeholder="Ask about the images…", elem_id="prompt",
                                           file_types=["image"], file_count="multiple", submit_btn="Send")
                with gr.Row():
                    stop = gr.Button("Stop", elem_id="stop", variant="stop")
                    clear = gr.Button("New chat", elem_id="clear")
                status = gr.Markdown("", elem_id="status")

        async def respond(value, state, chat, temp, p, n_tokens, request: gr.Request):
            value = value or {}
            question = (value.get("text") or "").strip()
            uploads = list(value.get("files") or [])
            if not question:
                yield chat, state, "⚠️ Please type a question.", gr.skip()
                return
            engine = holder.engine
            try:
                if not state["images"] and not uploads:
                    raise ChatInputError("Please attach an image first (the model answers about images).")
                if len(state["images"]) + len(uploads) > MAX_IMAGES:
                    raise ChatInputError(f"At most {MAX_IMAGES} images per chat: press New chat.")
                images, messages, ids, pixels = await asyncio.to_thread(
                    prepare, engine, state, question, [f if isinstance(f, str) else f["path"] for f in uploads])
                handle = engine.submit(GenRequest(ids, pixels, int(n_tokens), float(temp), float(p)),
                                       loop=asyncio.get_running_loop())
            except ChatInputError as e:
                yield chat, state, f"⚠️ {e}", gr.skip()
                return
            except EngineBusy:
                yield chat, state, "⚠️ The server is busy: try again in a moment.", gr.skip()
                return
            holder.running[request.session_hash] = handle
            shown = [{"path": f if isinstance(f, str) else f["path"]} for f in uploads] + [question]
            chat = chat + [{"role": "user", "content": shown}, {"role": "assistant", "content": ""}]
            state = {"messages": messages, "images": state["images"] + images}
            reply, start = "", time.perf_counter()
            yield chat, state, "generating…", {"text": "", "files": []}  # the upload is spent: empty the box
            try:
                async for ev in handle:
                    if ev.error:
                        yield chat, state, f"⚠️ {ev.error}", gr.skip()
                        return
                    if not ev.text:
                        continue
                    reply += ev.text
                    chat[-1] = {"role": "assistant", "content": reply}
                    # The conversation keeps the partial reply, so after Stop it matches what is shown.
                    state = {**state, "messages": messages + [{"role": "assistant", "content": reply}]}
                    # status untouched: a piece still in flight when Stop is clicked must not
                    # overwrite the "stopped" that Stop writes
                    yield chat, state, gr.skip(), gr.skip()
            finally:
                handle.cancel()  # no-op when finished; frees the row when gradio cancels this generator
                holder.running.pop(request.session_hash, None)
            state = {**state, "messages": messages + [{"role": "assistant", "content": reply}]}
            n, secs = handle.completion_tokens[0], time.perf_counter() - start
            if handle.finish_reasons[0] == "cancelled":  # Stop won the race against gradio's own cancel
                yield chat, state, "⏹ stopped", gr.skip()
                return
            yield chat, state, f"{n} tokens, {n / max(secs, 1e-9):.1f} tokens/s", gr.skip()

        def prepare(engine: Engine, state: dict, question: str, paths: list[str]):
            """Decode and check the new images, then the whole chat (runs in a worker thread)."""
            images = [image_tensor(engine.processor, f, Path(f).name) for f in paths]  # names only, never paths
            messages = state["messages"] + [{"role": "user", "content": with_image_markers(question, len(images))}]
            ids, pixels = encode_chat(engine, messages, state["images"] + images)
            return images, messages, ids, pixels

        def stop_answer(request: gr.Request):
            holder.stop(request.session_hash)
            return "⏹ stopped"

        inputs = [box, convo, chatbot, temperature, top_p, max_tokens]
        outputs = [chatbot, convo, status, box]
        sent = box.submit(respond, inputs, outputs)
        stop.click(stop_answer, None, status, cancels=[sent])
        clear.click(lambda: ([], empty_convo(), "", {"text": "", "files": []}), None, [chatbot, convo, status, box])
        weight.change(lambda name: ([], empty_convo(), holder.switch(name)), weight, [chatbot, convo, status])
    return demo


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_args(add_model_args(ap), port=7788)  # the published demo's port
    ap.add_argument("--max_batch", type=positive_int, default=8, help="answers generated together (continuous batching)")
    return ap


def launch(args: argparse.Namespace, block: bool = True) -> gr.Blocks:
    holder = ModelHolder(args)
    demo = build_demo(holder)
    demo.holder = holder  # for tests and embedding: the engine in use
    # Every session's generation runs in the shared engine, batched with the others.
    demo.queue(default_concurrency_limit=args.max_batch)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD, ssr_mode=False,
                prevent_thread_lock=not block, quiet=not block)
    return demo


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        launch(args)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
