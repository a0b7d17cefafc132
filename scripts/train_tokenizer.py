"""Train the project's own byte-level BPE tokenizer (the published tokenizer's layout: 6400 ids,
ids 0-2 the special tokens, then the 256 byte symbols) into model/tokenizer/.

Layout, identical to the published MiniMind tokenizer: vocab 6400; `<|endoftext|>` 0 (pad, unk),
`<|im_start|>` 1 (bos), `<|im_end|>` 2 (eos); then the 256-symbol byte-level alphabet in code-point
order (so '!' = 3 and '@' = 34), then the learned merges. '@' never merges ('@' is removed from the
corpus), so `'@' * 196` is always 196 tokens of id 34: one image slot. Chat template: ChatML with
the published default system prompt.

Corpus (all offline): the synthetic task's text (questions, answers, captions; repeated so its
words become single tokens) and Python's own language reference (`pydoc_data.topics`: English
prose and code, PSF licence, on every Python install) for general coverage. Users of the published
weights must use the published tokenizer (scripts/download.py fetches it): merges differ.

    python scripts/train_tokenizer.py [--tokenizer_path model/tokenizer]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model import PROJECT_TOKENIZER, resolve
from model.processor import DEFAULT_IMAGE_TOKEN_ID, DEFAULT_PATCHES, IMAGE_PLACEHOLDER, load_tokenizer
from scripts.make_synthetic_data import corpus as task_corpus

VOCAB_SIZE = 6400
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_SYSTEM = "You are a helpful assistant"

# ChatML. Without a system message the published default one is inserted; a system message other
# than the first is rendered as an ordinary turn; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message['role'] == 'system') -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)


def training_corpus() -> list[str]:
    from pydoc_data.topics import topics
    texts = task_corpus(seed=0) * 20 + [topics[k] for k in sorted(topics)]
    return [t.replace(IMAGE_PLACEHOLDER, " ") for t in texts]  # keep '@' unmerged: a slot stays one id per patch


def train(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def check_layout(tok: Tokenizer, vocab_size: int = VOCAB_SIZE) -> None:
    vocab = tok.get_vocab()
    problems = []
    if len(vocab) != vocab_size:
        problems.append(f"vocab size {len(vocab)} != {vocab_size} (corpus too small?)")
    for i, s in enumerate(SPECIAL):
        if vocab.get(s) != i:
            problems.append(f"{s} is id {vocab.get(s)}, expected {i}")
    at, n, slot = DEFAULT_IMAGE_TOKEN_ID, DEFAULT_PATCHES, IMAGE_PLACEHOLDER * DEFAULT_PATCHES
    if vocab.get("!") != 3 or vocab.get(IMAGE_PLACEHOLDER) != at:
        problems.append(f"'!' = {vocab.get('!')}, {IMAGE_PLACEHOLDER!r} = {vocab.get(IMAGE_PLACEHOLDER)}, expected 3 and {at}")
    if tok.encode("x " + slot + "\n").ids.count(at) != n:
        problems.append(f"an image slot ({n} x {IMAGE_PLACEHOLDER!r}) does not encode to {n} ids {at}")
    if problems:
        raise RuntimeError("tokenizer layout check failed: " + "; ".join(problems))


def tokenizer_config() -> dict:
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, s in enumerate(SPECIAL)}
    return {"add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
            "added_tokens_decoder": added, "additional_special_tokens": [],
            "bos_token": SPECIAL[1], "eos_token": SPECIAL[2], "pad_token": SPECIAL[0], "unk_token": SPECIAL[0],
            "clean_up_tokenization_spaces": False, "model_max_length": 32768,
            "spaces_between_special_tokens": False, "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": CHAT_TEMPLATE}


def save(tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), ensure_ascii=False, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer_path", default=str(PROJECT_TOKENIZER), help="output folder")
    args = ap.parse_args()
    out = resolve(args.tokenizer_path)
    tok = train(training_corpus())
    check_layout(tok)
    save(tok, out)
    hf = load_tokenizer(out)  # the way every script loads it
    print(f"tokenizer: {len(hf)} tokens -> {out}")
    print(hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True))


if __name__ == "__main__":
    main()
