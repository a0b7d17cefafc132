"""Shared fixtures. Tests never touch the network: the hub is switched off before anything imports it."""
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402  (after the environment: the hub must be off before anything imports it)

ROOT = Path(__file__).resolve().parent.parent

FIXTURE_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "minimind_tokenizer"


@pytest.fixture(scope="session")
def tiny_clip() -> Path:
    """The tiny random CLIP stand-in (224 px, 16 px patches, 768 wide), written once per machine."""
    from model import TINY_CLIP
    from scripts.make_tiny_clip import make_clip
    return make_clip(TINY_CLIP)


@pytest.fixture(scope="session")
def fixture_tokenizer_path() -> Path:
    if not (FIXTURE_TOKENIZER / "tokenizer.json").exists():
        pytest.skip("published tokenizer fixture (../shared/fixtures/minimind_tokenizer) is absent")
    return FIXTURE_TOKENIZER


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (the suite shares two cores; results do not depend on it)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
