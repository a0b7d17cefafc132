"""A gradio chat page for MiniMind-V: upload images, ask, watch the answer stream in.

    python web_demo.py [--port 7788] [--host 127.0.0.1] [model flags as in eval_vlm.py]

Images in the upload box join the conversation with the next question (one `<image>` slot each,
before the text). The weight menu lists the `.pth` files in --save_dir; picking one loads it.
Mistakes (empty question, no image, a file that is not an image, a huge image) are explained in
the status line and the page keeps working. Binds 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradio as gr

from model.chat import MAX_IMAGES, ChatInputError, answer, open_image, with_image_markers
from model.engine import Engine
from model.load import ModelLoadError, add_model_args, add_serve_args, list_weight_files, load_model, parse_weight_name

LAYERS_OF_HIDDEN = {512: 8, 768: 16}  # the published sizes (SPEC §1); others use --num_hidden_layers
MAX_UPLOAD = "25mb"

log = logging.getLogger("minimind")


class ModelHolder:
    """The loaded model, swapped when another weight file is picked."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.engine = Engine(*load_model(args), max_batch=args.max_batch)
        self.name = self.current_name()

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
        args.load_from, args.weight, args.hidden_size, args.use_moe = "model", spec["weight"], spec["hidden_size"], spec["use_moe"]
        args.num_hidden_layers = LAYERS_OF_HIDDEN.get(spec["hidden_size"], self.args.num_hidden_layers)
        try:
            engine = Engine(*load_model(args), max_batch=args.max_batch)
        except ModelLoadError as e:
            return f"⚠️ could not load {name}: {e}; keeping {self.name}"
        old, self.engine = self.engine, engine
        old.close()  # answers still streaming from the old model end with an error event
        self.args, self.name = args, name
        return f"loaded {name}"


def build_demo(holder: ModelHolder) -> gr.Blocks:
    with gr.Blocks(title="MiniMind-V") as demo:
        gr.Markdown("## MiniMind-V\nUpload one or more images, ask a question, and the answer streams in.")
        # Per-session conversation: messages with <image> markers, the images, and the uploads already used.
        convo = gr.State({"messages": [], "images": [], "used": []})
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images", file_count="multiple", elem_id="images")
                weight = gr.Dropdown(holder.choices(), value=holder.name, label="Weights", elem_id="weights")
                temperature = gr.Slider(0.0, 1.5, value=0.65, step=0.05, label="temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=0.85, step=0.05, label="top_p")
                max_tokens = gr.Slider(8, 2048, value=512, step=8, label="max new tokens", elem_id="max_tokens")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=420)
                prompt = gr.Textbox(label="Question", placeholder="Ask about the images…", elem_id="prompt")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("New chat", elem_id="clear")
                status = gr.Markdown("", elem_id="status")

        def respond(question, uploads, state, chat, temp, p, n_tokens):
            question = (question or "").strip()
            if not question:
                yield chat, state, "⚠️ Please type a question.", question
                return
            new = [f for f in (uploads or []) if f not in state["used"]]
            stats: dict = {}
            try:
                images = [open_image(f, Path(f).name) for f in new]
                if not state["images"] and not images:
                    raise ChatInputError("Please upload an image first (the model answers about images).")
                if len(state["images"]) + len(images) > MAX_IMAGES:
                    raise ChatInputError(f"At most {MAX_IMAGES} images per chat: press New chat.")
                messages = state["messages"] + [{"role": "user", "content": with_image_markers(question, len(images))}]
                all_images = state["images"] + images
                pieces = answer(holder.engine, messages, all_images, int(n_tokens), float(temp), float(p), stats=stats)
            except ChatInputError as e:
                yield chat, state, f"⚠️ {e}", question
                return
            shown = f"[{len(images)} image(s)] {question}" if images else question
            chat = chat + [{"role": "user", "content": shown}, {"role": "assistant", "content": ""}]
            reply = ""
            for piece in pieces:
                reply += piece
                chat[-1] = {"role": "assistant", "content": reply}
                yield chat, state, "generating…", ""
            state = {"messages": messages + [{"role": "assistant", "content": reply}], "images": all_images,
                     "used": state["used"] + new}
            n, secs = stats.get("new_tokens", 0), stats.get("seconds", 0.0)
            yield chat, state, f"{n} tokens, {n / max(secs, 1e-9):.1f} tokens/s", ""

        inputs = [prompt, files, convo, chatbot, temperature, top_p, max_tokens]
        outputs = [chatbot, convo, status, prompt]
        send.click(respond, inputs, outputs)
        prompt.submit(respond, inputs, outputs)
        clear.click(lambda: ([], {"messages": [], "images": [], "used": []}, "", None),
                    None, [chatbot, convo, status, files])
        weight.change(lambda name: ([], {"messages": [], "images": [], "used": []}, holder.switch(name)),
                      weight, [chatbot, convo, status])
    return demo


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_args(add_model_args(ap), port=7788)  # the published demo's port
    ap.add_argument("--max_batch", type=int, default=8, help="answers generated together (continuous batching)")
    return ap


def launch(args: argparse.Namespace, block: bool = True) -> gr.Blocks:
    demo = build_demo(ModelHolder(args))
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
