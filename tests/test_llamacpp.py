"""scripts/check_llamacpp.py: a to_llama folder -> GGUF (llama.cpp's own converter) -> llama-cpp-python gives our
tokens. Needs llama-cpp-python (a source build, not in the requirements: CI skips it) and llama.cpp's converter
(cached by one run of the script, or LLAMA_CPP_SRC naming an unpacked sdist / llama.cpp checkout)."""
import json
import os

import pytest

from model import PROJECT_TOKENIZER
from scripts.check_llamacpp import converter_dir, is_gpt2_byte_level, main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tokenizers_use_gpt2_pre_tokenization(fixture_tokenizer_path):
    """What lets the script name llama.cpp's "gpt-2" pre-tokenizer: both tokenizers split text that way."""
    assert is_gpt2_byte_level(PROJECT_TOKENIZER / "tokenizer.json")
    assert is_gpt2_byte_level(fixture_tokenizer_path / "tokenizer.json")


def test_gguf_round_trip_gives_our_tokens(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (CI does not build it)")
    src = converter_dir(os.environ.get("LLAMA_CPP_SRC"), llama_cpp.__version__, download=False)
    if src is None:
        pytest.skip("llama.cpp's converter is not cached: run scripts/check_llamacpp.py once, or set LLAMA_CPP_SRC")
    out = tmp_path / "result.json"
    rc = main(["--random_model", "1", "--hidden_size", "64", "--num_hidden_layers", "2", "--outtypes", "f32",
               "--tokenizer_path", str(PROJECT_TOKENIZER), "--new_tokens", "16", "--bench_tokens", "0",
               "--threads", "1", "--llama_cpp_src", str(src), "--work_dir", str(tmp_path), "--json", str(out)])
    check = json.loads(out.read_text())["checks"]["f32"]
    assert rc == 0
    assert check["same_tokenization"]
    assert check["prompts_with_same_greedy_tokens"][0] == check["prompts_with_same_greedy_tokens"][1]
    assert check["max_logit_diff"] < 1e-3
