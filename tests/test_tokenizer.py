"""The project tokenizer (model/tokenizer, written by scripts/train_tokenizer.py): the published layout."""
import json

import pytest
from tokenizers import pre_tokenizers

from model import PROJECT_TOKENIZER

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"},
     {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
    [{"role": "user", "content": "q"}, {"role": "system", "content": "a later system turn"}],
]


@pytest.fixture(scope="module")
def tok():
    from model.processor import load_tokenizer
    return load_tokenizer(PROJECT_TOKENIZER)


def test_layout(tok):
    assert len(tok) == 6400
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 0, 1, 2)
    # the byte-level alphabet in code-point order right after the special tokens: '!' = 3, '@' = 34
    assert tok.convert_ids_to_tokens(list(range(3, 259))) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert tok.convert_tokens_to_ids(["!", "@"]) == [3, 34]


def test_image_placeholder_is_196_ids_34(tok):
    assert not [t for t in tok.get_vocab() if "@" in t and t != "@"]  # '@' never merges
    for text in ["@" * 196, "look: " + "@" * 196 + "\n", "(" + "@" * 196 + ")"]:
        assert tok(text, add_special_tokens=False)["input_ids"].count(34) == 196


def test_no_special_tokens_added_and_round_trip(tok):
    text = "A red circle at the top left. 图中有一个红色的圆形 🙂 x@y.z"
    ids = tok(text)["input_ids"]
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_chat_template_by_hand(tok):
    text = tok.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n<image>\nWhat colour?"
                    "<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n")
    prompt = tok.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_the_published_one(tok, fixture_tokenizer_path, i, gen):
    from model.processor import load_tokenizer
    ref = load_tokenizer(fixture_tokenizer_path)
    assert tok.apply_chat_template(CONVERSATIONS[i], tokenize=False, add_generation_prompt=gen) == \
        ref.apply_chat_template(CONVERSATIONS[i], tokenize=False, add_generation_prompt=gen)


def test_same_alphabet_and_special_ids_as_the_published(tok, fixture_tokenizer_path):
    from model.processor import load_tokenizer
    ref = load_tokenizer(fixture_tokenizer_path)
    assert tok.convert_ids_to_tokens(list(range(259))) == ref.convert_ids_to_tokens(list(range(259)))
    assert len(tok) == len(ref)


def test_shipped_tokenizer_is_what_the_script_trains():
    from scripts.train_tokenizer import check_layout, train, training_corpus
    fresh = train(training_corpus())
    check_layout(fresh)
    shipped = json.loads((PROJECT_TOKENIZER / "tokenizer.json").read_text())
    assert json.loads(fresh.to_str())["model"] == shipped["model"]
    size = sum(f.stat().st_size for f in PROJECT_TOKENIZER.iterdir())
    assert size < 1_000_000  # small enough to ship in git
