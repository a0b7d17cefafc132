"""From a generated answer to the model's choice, by each benchmark's documented rule.

    mmstar     lmms-eval: the option letter found by its multiple-choice extractor (formats ranked:
               a leading letter, a trailing letter, "the answer is X", "(X)", "X.", "X:", "X)", "X ",
               then any occurrence), compared with the reference letter
    scienceqa  lmms-eval (LLaVA's parser): the whole answer equals the letter, or it starts "X."
    mmbench    lmms-eval's offline ("static") rule: exactly one option letter as a word (or as "X.",
               "(X)", "X:", ... ), else exactly one option text contained in the answer, else the
               multiple-choice extractor; a question counts only if every circular copy of it is right
    pope       the POPE paper's rule (also LLaVA-1.5's): the first sentence, commas removed, is "no"
               when it has the word No/no/not, else "yes"; lmms-eval's strict exact match is reported beside
    qa         the project's rule: normalised equality, or the reference as whole words and no other
               reference answer of the same kind
"""
from __future__ import annotations

import re

_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
            "best answer is", "the correct option is", "correct option is", "the best option is",
            "best option is", "the choice is", "choice is", "the correct choice is", "correct choice is",
            "i choose", "i select", "i pick", "my answer is", "my choice is", "答案是", "答案为", "选")
# Higher wins; within a format the later position wins.
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
             "space": 2, "fallback": 0}


def mcq_letter(response: str, letters: list[str] | str = "ABCDEFGH") -> str:
    """lmms-eval's multiple-choice letter extractor: every way a letter can be given, ranked; "" if none."""
    text = response.strip()
    if not text:
        return ""
    for ch in ",.!?;:'\"":  # one character at a time, as lmms-eval strips
        text = text.strip(ch)
    text = " " + text + " "
    found: list[tuple[int, int, str]] = []  # (priority, position, letter)

    def add(fmt: str, pos: int, ch: str) -> None:
        found.append((_PRIORITY[fmt], pos, ch))
    for ch in letters:
        for fmt, pattern in (("parentheses", f"({ch})"), ("period", f"{ch}."), ("colon", f"{ch}:"),
                             ("right_paren", f"{ch})"), ("space", f"{ch} ")):
            if pattern in text:
                add(fmt, text.rfind(pattern), ch)
    lower = text.lower()
    for phrase in _PHRASES:
        at = lower.find(phrase)
        if at >= 0:
            for ch in letters:
                pos = text.find(ch, at + len(phrase))
                if pos >= 0:
                    add("phrase", pos, ch)
    bare = text.strip()
    for ch in letters:
        if bare.startswith(ch) and (len(bare) == 1 or not bare[1].isalpha()):
            add("start", 0, ch)
        if bare.endswith(ch) and (len(bare) == 1 or not bare[-2].isalpha()):
            add("end", len(text) - 1, ch)
    if not found:
        for ch in letters:
            if ch in text:
                add("fallback", text.rfind(ch), ch)
    return max(found)[2] if found else ""


def scienceqa_letter(response: str, letters: list[str]) -> str:
    """LLaVA's ScienceQA parser as lmms-eval runs it: "B" or "b" -> B; "B. text" -> B; else ""."""
    pred = response.strip()
    if pred.upper() in letters:
        return pred.upper()
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return pred[0]
    return ""


def _mmbench_option_letter(response: str, letters: list[str]) -> str:
    words = response.split()
    cands = "ABCDE"  # lmms-eval looks for all five letters whatever the question offers
    if sum(c in words for c in cands) == 1 and not ("A" in words and len(words) > 3):  # "A" may be an article
        return next(c for c in cands if c in words)
    for pre, post in (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                      (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")):
        hits = [c for c in cands if f"{pre}{c}{post}" in words]
        if len(hits) == 1:
            return hits[0]
    return ""


def mmbench_letter(response: str, letters: list[str], options: list[str]) -> str:
    """lmms-eval's offline MMBench matcher: a letter, else a unique option text, else the extractor."""
    got = _mmbench_option_letter(response, letters)
    if got:
        return got
    lower = response.lower()
    hits = [c for c, text in zip(letters, options) if text.lower() in lower]
    if len(hits) == 1:
        return hits[0]
    return mcq_letter(response, letters)


def pope_answer(response: str) -> str:
    """The POPE paper's yes/no rule: "no" when the first sentence has the word No/no/not, else "yes"."""
    text = response.split(".")[0] if "." in response else response
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def is_correct(prediction: str, reference: str, choices: set[str]) -> bool:
    """The project's Q&A rule: normalised equality, or the reference as whole words and no rival answer."""
    p, r = normalise(prediction), normalise(reference)
    if p == r:
        return True

    def has(word: str) -> bool:
        return bool(word) and f" {word} " in f" {p} "
    return has(r) and not any(has(c) for c in choices if c != r)


def judge(fmt: str, response: str, reference: str, letters: list[str], options: list[str],
          rivals: set[str] | None = None) -> tuple[str, bool]:
    """(the model's extracted answer, whether it is right) for one generated `response`."""
    if fmt == "mmstar":
        got = mcq_letter(response, "ABCD")
    elif fmt == "scienceqa":
        got = scienceqa_letter(response, letters)
    elif fmt.startswith("mmbench"):
        got = mmbench_letter(response, letters, options)
    elif fmt == "pope":
        got = pope_answer(response)
    else:
        return response, is_correct(response, reference, rivals or set())
    return got, got == reference


RULES = {
    "mmstar": "lmms-eval's multiple-choice letter extractor, letter == reference",
    "scienceqa": "lmms-eval/LLaVA: answer == letter (any case) or starts with '<letter>.'",
    "mmbench_en": "lmms-eval static matcher (letter, unique option text, then letter extractor); circular copies "
                  "must all be right",
    "mmbench_cn": "lmms-eval static matcher (letter, unique option text, then letter extractor); circular copies "
                  "must all be right",
    "pope": "POPE paper: first sentence contains No/no/not -> no, else yes",
    "qa": "normalised exact match, or the reference contained as whole words with no other reference answer "
          "of the same kind",
}
