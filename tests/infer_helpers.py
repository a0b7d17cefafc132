"""Shared by the inference tests: a tiny random MiniMind-V weight file and the flags that select it."""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch

from model import PROJECT_TOKENIZER
from model.model_vlm import MiniMindVLM, VLMConfig
from model.weights import save_weights, weight_path
from scripts.bench_serve import free_port  # noqa: F401  (tests import it from here)

HIDDEN, LAYERS = 64, 2


def tiny_weights(save_dir: Path, name: str = "sft_vlm", seed: int = 0) -> Path:
    """A random hidden-64 x 2-layer MiniMind-V saved the way training saves it (fp16, no vision tower)."""
    torch.manual_seed(seed)
    model = MiniMindVLM(VLMConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS))
    path = weight_path(save_dir, name, HIDDEN, False)
    save_weights(model, path)
    return path


def model_flags(save_dir: Path, clip: Path, name: str = "sft_vlm") -> list[str]:
    return ["--save_dir", str(save_dir), "--weight", name, "--hidden_size", str(HIDDEN),
            "--num_hidden_layers", str(LAYERS), "--vision_model_path", str(clip),
            "--tokenizer_path", str(PROJECT_TOKENIZER), "--device", "cpu"]


def model_args(save_dir: Path, clip: Path, name: str = "sft_vlm") -> argparse.Namespace:
    from model.load import add_model_args
    return add_model_args(argparse.ArgumentParser()).parse_args(model_flags(save_dir, clip, name))


def png_bytes(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48)) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


class running_server:
    """Serve an ASGI app with uvicorn on a free loopback port in a thread: `with running_server(app) as url:`."""

    def __init__(self, app, **config):
        import uvicorn
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    **config))

    def __enter__(self) -> str:
        import threading
        import time
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started, "server did not start"
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
