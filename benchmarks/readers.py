"""The published files of each benchmark -> `Item`s, one row at a time.

Layouts (columns as published; the image column is the Hugging Face `Image` feature, stored in
Parquet as a struct {bytes: binary, path: string}):

    mmstar     Lin-Chen/MMStar, mmstar.parquet (split val): index int64, question string (the options
               are inside it: "...\\nOptions: A: x, B: y, C: z, D: w"), image, answer string (a letter),
               category, l2_category string, meta_info struct
    scienceqa  lmms-lab/ScienceQA, ScienceQA-IMG/test-*.parquet: image, question string, choices
               list<string>, answer int8 (index into choices), hint string (may be empty), task, grade,
               subject, topic, category, skill, lecture, solution string
    pope       lmms-lab/POPE, data/test-*.parquet: id, question_id, question, answer ("yes"/"no"),
               image_source string, image, category string (adversarial / popular / random)
    mmbench    lmms-lab/MMBench, en/dev-*.parquet and cn/dev-*.parquet: index int64 (string in some
               revisions), question, hint (null when none), answer (a letter), A, B, C, D (null when the
               question has fewer options), category string, image, source, L2-category, comment, split
    qa         the project's own Q&A files: conversations (JSON string ending with the reference
               assistant answer), image_bytes (binary or list<binary>), kind and answer (optional)

Rows are read in small Arrow batches of the needed columns only and images stay encoded until they are
scored, so a 10K-row file never sits decoded in memory.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.chat import ChatInputError, with_image_markers

from .extract import normalise

log = logging.getLogger("minimind.bench")

# The lmms-eval default prompts (its task files' `post_prompt` / option lists), followed exactly.
MC_POST = "\nAnswer with the option's letter from the given choices directly."
MMSTAR_POST = "\nAnswer with the option's letter from the given choices directly"  # (no full stop there)
MMSTAR_DROPPED = " Please answer yes or no."
MMBENCH_CN_POST = "\n请直接使用所提供的选项字母作为答案回答。"
MMBENCH_OPTIONS_HEADER = "There are several options:"  # lmms-eval uses the English header for cn too
POPE_POST = "\nAnswer the question using a single word or phrase."
LETTERS = "ABCDEFGH"
MAX_QA_CHOICES = 26  # a Q&A kind with more distinct answers is open-ended: no log-likelihood for it

# name -> (required columns, optional columns read when present, the label the table is grouped by)
LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "mmbench_en": (("index", "question", "hint", "answer", "A", "B", "C", "D", "category", "image"),
                   ("E", "L2-category", "l2-category"), "l2_category"),
    "mmbench_cn": (("index", "question", "hint", "answer", "A", "B", "C", "D", "category", "image"),
                   ("E", "L2-category", "l2-category"), "l2_category"),
    "mmstar": (("index", "question", "image", "answer", "category", "l2_category"), (), "l2_category"),
    "scienceqa": (("image", "question", "choices", "answer", "hint", "subject"), ("grade", "category"), "subject"),
    "pope": (("question_id", "question", "answer", "image", "category"), (), "category"),
    "qa": (("conversations",), ("image_bytes", "kind", "answer"), "kind"),
}
FORMATS = tuple(LAYOUTS)
# Detection order: the most specific column sets first.
_DETECT = ("mmbench_en", "mmstar", "scienceqa", "pope", "qa")


class BenchError(ChatInputError):
    """A benchmark file that cannot be read at all: one line naming the file and the fix."""


class BadRow(ValueError):
    """One row that cannot be scored: skipped and counted."""


@dataclass
class Item:
    """One question, ready for both scoring methods."""
    source: str                  # "file row N": every message about the row names it
    uid: str                     # the row's own id (index, question_id...), or its row number
    labels: dict[str, str]       # categories, e.g. {"category": ..., "l2_category": ...}
    messages: list[dict]         # the generation prompt (lmms-eval's wording), `<image>` markers in it
    mc_messages: list[dict]      # the log-likelihood prompt: the question without the answer instruction
    options: list[str]           # continuations scored by log-likelihood ([] = not scored that way)
    answer: int                  # index of the right option in `options` (-1 when none)
    reference: str               # the reference answer: a letter, yes/no, or a text
    letters: list[str] = field(default_factory=list)  # option letters of a lettered multiple choice
    images: list[bytes] = field(default_factory=list)  # encoded; decoded only when scored
    chance: float = 0.0          # probability that a uniform guess is right
    rivals: frozenset = frozenset()  # Q&A: every normalised reference answer of the item's kind


@dataclass
class Skipped:
    """Rows that could not be scored, with their reasons (first few kept for the report)."""
    count: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        self.reasons[reason.split(":")[0]] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")
            log.warning("skipped %s: %s", where, reason)

    def as_dict(self) -> dict:
        return {"count": self.count, "reasons": dict(self.reasons), "examples": self.examples}


# ------------------------------------------------------------------------------------ files, layout

def bench_files(path: str | Path) -> list[Path]:
    """A Parquet file, or every *.parquet under a folder (sharded splits such as POPE's three files)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        # hidden folders hold huggingface_hub's download bookkeeping, never a split
        files = sorted(f for f in p.rglob("*.parquet")
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if files:
            return files
        raise BenchError(f"{p}: no .parquet files in this folder (get a benchmark with "
                         f"`python scripts/download.py bench NAME`)")
    raise BenchError(f"{p}: file not found (get a benchmark with `python scripts/download.py bench NAME`, "
                     f"or make the synthetic Q&A file with `python scripts/make_synthetic_data.py`)")


def _columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq
    try:
        return pq.read_schema(path).names
    except Exception as e:  # not Parquet, truncated download...
        raise BenchError(f"{path}: not a readable Parquet file ({e.__class__.__name__}: {e}); "
                         f"download it again") from None


def _expected() -> str:
    return "; ".join(f"{name}: {', '.join(req)}" for name, (req, _, _) in LAYOUTS.items() if name != "mmbench_cn")


def _looks_chinese(path: Path) -> bool:
    """MMBench cn vs en: the folder the file came in, else Chinese characters in the first questions."""
    if "cn" in {part.lower() for part in path.parts} or "_cn" in path.stem.lower():
        return True
    import pyarrow.parquet as pq
    batch = next(pq.ParquetFile(path).iter_batches(batch_size=16, columns=["question"]), None)
    text = " ".join(q or "" for q in batch.column(0).to_pylist()) if batch is not None else ""
    return bool(re.search(r"[\u4e00-\u9fff]", text))


def detect_format(path: str | Path, requested: str | None = None) -> str:
    """The layout of a benchmark file (or folder): `requested` after checking its columns, else the
    first layout whose required columns are all present."""
    files = bench_files(path)
    cols = _columns(files[0])
    if requested:
        if requested not in LAYOUTS:
            raise BenchError(f"--bench_format {requested}: unknown; choose from {', '.join(FORMATS)}")
        missing = [c for c in LAYOUTS[requested][0] if c not in cols]
        if missing:
            raise BenchError(f"{files[0]}: --bench_format {requested} needs columns {missing}, which are missing "
                             f"(columns found: {', '.join(cols)})")
        return requested
    for name in _DETECT:
        if all(c in cols for c in LAYOUTS[name][0]):
            if name == "mmbench_en" and _looks_chinese(files[0]):
                return "mmbench_cn"
            return name
    raise BenchError(f"{files[0]}: its columns ({', '.join(cols)}) match no benchmark layout. Expected "
                     f"{_expected()}. Pass --bench_format to name the layout")


# ---------------------------------------------------------------------------------------- fields

def _text(value: Any) -> str:
    """A string cell; null, NaN and pandas' "nan" (MMBench's missing hints and options) are empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value)
    return "" if text == "nan" else text


def _image(value: Any) -> bytes:
    """The encoded image of an `Image` struct {bytes, path} (or plain bytes, the project's layout)."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            return bytes(data)
        raise BadRow(f"image: the image struct holds no bytes (path {value.get('path')!r}); "
                     f"use the published Parquet file, which embeds the images")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return bytes(value)
    raise BadRow("image: no image in this row")


def _user(text: str, n_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": with_image_markers(text, n_images)}]


def _letter_index(answer: Any, letters: list[str]) -> int:
    letter = _text(answer).strip().upper()
    if not letter:
        raise BadRow("answer: no reference answer (a test split without answers? score the dev/val split)")
    if letter not in letters:
        raise BadRow(f"answer: {answer!r} is not one of the option letters {letters}")
    return letters.index(letter)


def split_mmstar_options(question: str) -> tuple[str, list[str]] | None:
    """MMStar keeps its options in the question: "stem\\nOptions: A: x, B: y, C: z, D: w" ->
    (stem, [x, y, z, w]); None when the text does not follow that pattern. Options may contain commas:
    only ", B:" ", C:"... in letter order end one."""
    m = re.search(r"\n\s*Options:\s*A:", question)
    if not m:
        return None
    stem, rest = question[:m.start()].strip(), question[m.end():]
    options = []
    for letter in LETTERS[1:]:
        cut = rest.find(f", {letter}:")
        if cut < 0:
            break
        options.append(rest[:cut].strip())
        rest = rest[cut + len(f", {letter}:"):]
    options.append(rest.strip())
    return (stem, options) if stem and all(options) and len(options) >= 2 else None


# ------------------------------------------------------------------------------- one row -> Item

def _mmstar(r: dict, where: str) -> Item:
    # lmms-eval drops this sentence from the few yes/no questions before adding its own instruction
    question = _text(r["question"]).strip().replace(MMSTAR_DROPPED, "")
    letters = list("ABCD")
    answer = _letter_index(r["answer"], letters)
    parsed = split_mmstar_options(question)
    prompt = question + MMSTAR_POST
    if parsed and answer < len(parsed[1]):  # score the option texts after the bare question
        stem, options = parsed
        letters = list(LETTERS[:len(options)])
        mc = _user(stem)
    else:  # options not recognisable: score the letters after the full prompt
        options, mc = list(letters), _user(prompt)
    return Item(where, str(r["index"]), {"category": _text(r["category"]), "l2_category": _text(r["l2_category"])},
                _user(prompt), mc, options, answer, letters[answer], letters, [_image(r["image"])], 1 / len(options))


def _scienceqa(r: dict, where: str) -> Item:
    choices = [_text(c) for c in (r["choices"] or [])]
    if len(choices) < 2:
        raise BadRow(f"choices: {len(choices)} choice(s); a question needs at least two")
    answer = r["answer"]
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise BadRow(f"answer: {answer!r} is not an index into the {len(choices)} choices")
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    hint, question = _text(r["hint"]), _text(r["question"])
    context = f"Context: {hint}\n" if hint else ""
    listed = "\n".join(f"{c}. {t}" for c, t in zip(letters, choices))
    labels = {k: _text(r.get(k)) for k in ("subject", "grade", "category") if k in r}
    return Item(where, where.rsplit(" ", 1)[-1], labels, _user(f"{context}{question}\n{listed}{MC_POST}"),
                _user(f"{context}{question}"), choices, answer, letters[answer], letters, [_image(r["image"])],
                1 / len(choices))


def _pope(r: dict, where: str) -> Item:
    reference = _text(r["answer"]).strip().lower()
    if reference not in ("yes", "no"):
        raise BadRow(f"answer: {r['answer']!r} is neither yes nor no")
    question = _text(r["question"]).strip()
    return Item(where, _text(r["question_id"]), {"category": _text(r["category"])}, _user(question + POPE_POST),
                _user(question), ["Yes", "No"], 0 if reference == "yes" else 1, reference, [],
                [_image(r["image"])], 0.5)


def _mmbench(r: dict, where: str, chinese: bool) -> Item:
    options = {c: _text(r.get(c)) for c in "ABCDE" if _text(r.get(c))}
    if len(options) < 2:
        raise BadRow(f"A-D: {len(options)} option(s); a question needs at least two")
    letters = sorted(options)
    answer = _letter_index(r["answer"], letters)
    listed = "\n".join(f"{c}. {options[c]}" for c in letters)
    hint, question = _text(r["hint"]), _text(r["question"])
    head = f"{hint} {question}" if hint else question
    # lmms-eval joins with "\n" a post prompt that itself starts with "\n": a blank line before the instruction
    prompt = f"{head} {MMBENCH_OPTIONS_HEADER}\n{listed}\n{MMBENCH_CN_POST if chinese else MC_POST}"
    l2 = _text(r.get("L2-category", r.get("l2-category")))
    return Item(where, _text(r["index"]), {"l2_category": l2, "category": _text(r["category"])}, _user(prompt),
                _user(head), [options[c] for c in letters], answer, letters[answer], letters,
                [_image(r["image"])], 1 / len(letters))


def _qa(r: dict, where: str, answer_sets: dict[str, list[str]], rivals: dict[str, frozenset]) -> Item:
    from dataset.lm_dataset import BadRow as DataBadRow
    from dataset.lm_dataset import parse_conversation
    from model.processor import count_markers
    try:
        conv = parse_conversation(r["conversations"])
    except DataBadRow as e:
        raise BadRow(f"conversations: {e}") from None
    raw = r.get("image_bytes")
    images = [] if raw is None else [_image(x) for x in (raw if isinstance(raw, list) else [raw])]
    messages = conv[:-1]
    if count_markers(messages) != len(images):
        raise BadRow(f"image_bytes: the conversation has {count_markers(messages)} <image> marker(s) but "
                     f"{len(images)} image(s)")
    kind = _text(r.get("kind")) or "all"
    reference = _text(r.get("answer")) or conv[-1]["content"]
    options = answer_sets.get(kind, [])
    if not 2 <= len(options) <= MAX_QA_CHOICES or reference not in options:
        options = []
    chance = 1 / len(answer_sets[kind]) if answer_sets.get(kind) else 0.0
    return Item(where, where.rsplit(" ", 1)[-1], {"kind": kind}, messages, messages, options,
                options.index(reference) if options else -1, reference, [], images, chance, rivals.get(kind, frozenset()))


def qa_answer_sets(files: list[Path]) -> dict[str, list[str]]:
    """Every distinct reference answer of each kind in a Q&A file: the candidates of its log-likelihood
    scoring and the base of its chance level (one cheap pass over the text columns)."""
    import pyarrow.parquet as pq
    sets: dict[str, set[str]] = {}
    for f in files:
        pf = pq.ParquetFile(f)
        cols = [c for c in ("conversations", "kind", "answer") if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=1024, columns=cols):
            for r in batch.to_pylist():
                answer = _text(r.get("answer"))
                if not answer:
                    try:
                        conv = json.loads(r["conversations"]) if isinstance(r["conversations"], str) else r["conversations"]
                        answer = conv[-1]["content"]
                    except (ValueError, TypeError, KeyError, IndexError):
                        continue
                sets.setdefault(_text(r.get("kind")) or "all", set()).add(answer)
    return {k: sorted(v) for k, v in sets.items()}


def iter_items(path: str | Path, fmt: str | None = None, limit: int = 0, skipped: Skipped | None = None,
               batch_rows: int = 64) -> Iterator[Item]:
    """Stream the scoreable `Item`s of a benchmark file or folder (the first `limit` when > 0); a row
    that cannot be read is skipped, counted in `skipped` and named in one warning line."""
    import pyarrow.parquet as pq
    files = bench_files(path)
    fmt = detect_format(path, fmt)
    required, optional, _ = LAYOUTS[fmt]
    skipped = skipped if skipped is not None else Skipped()
    answer_sets = qa_answer_sets(files) if fmt == "qa" else {}
    rivals = {k: frozenset(normalise(a) for a in v) for k, v in answer_sets.items()}
    n = 0
    for f in files:
        names = _columns(f)
        missing = [c for c in required if c not in names]
        if missing:
            raise BenchError(f"{f}: columns {missing} are missing for layout {fmt} (found: {', '.join(names)}); "
                             f"every file of a benchmark folder must have the same layout")
        cols = [c for c in (*required, *optional) if c in names]
        row = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=cols):
            for r in batch.to_pylist():
                where = f"{f} row {row}"
                row += 1
                try:
                    if fmt == "mmstar":
                        item = _mmstar(r, where)
                    elif fmt == "scienceqa":
                        item = _scienceqa(r, where)
                    elif fmt == "pope":
                        item = _pope(r, where)
                    elif fmt.startswith("mmbench"):
                        item = _mmbench(r, where, fmt == "mmbench_cn")
                    else:
                        item = _qa(r, where, answer_sets, rivals)
                except BadRow as e:
                    skipped.add(where, str(e))
                    continue
                yield item
                n += 1
                if limit and n >= limit:
                    return
