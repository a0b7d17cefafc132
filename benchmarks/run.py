"""One scoring run over a benchmark file: stream its items in chunks, score each chunk with its images
and with every image blanked, by generation and by option log-likelihood, then report.

Memory stays bounded whatever the file's size: a chunk's images are decoded, scored and dropped;
only a small record per item (answers and option scores) is kept for the report.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from model.chat import ChatInputError, check_conversation, open_image
from model.processor import MiniMindVLMProcessor

from .extract import RULES, judge
from .readers import LAYOUTS, Item, Skipped, bench_files, detect_format, iter_items
from .report import HEADLINE_NAMES, format_table, summarize
from .scoring import blank_image, encode, generate_chunk, loglik_chunk

METHOD_CHOICES = ("both", "generate", "loglik")


def _decode(item: Item, skipped: Skipped) -> list | None:
    """The item's PIL images, or None (counted as skipped) when one cannot be decoded or the prompt
    does not fit its images."""
    try:
        images = [open_image(b, f"image {j}") for j, b in enumerate(item.images)]
        check_conversation(item.messages, len(images))
        check_conversation(item.mc_messages, len(images))
    except ChatInputError as e:
        skipped.add(item.source, f"image: {e}")
        return None
    return images


def _option_answer(fmt: str, item: Item, pick: int) -> str:
    if item.letters:
        return item.letters[pick]
    if fmt == "pope":
        return "yes" if pick == 0 else "no"
    return item.options[pick]


class _BlankFeatures:
    """Vision features of the grey image, computed once: every blanked image shares them."""

    def __init__(self, model: Any, processor: MiniMindVLMProcessor):
        self.model, self.processor, self.one = model, processor, None

    def __call__(self, counts: list[int]) -> torch.Tensor | None:
        if not max(counts, default=0):
            return None
        if self.one is None:
            self.one = encode(self.model, self.processor, [[blank_image(self.processor.image_processor.image_size)]])[0, 0]
        out = self.one.new_zeros(len(counts), max(counts), *self.one.shape)
        for i, n in enumerate(counts):
            out[i, :n] = self.one
        return out


def _score_chunk(model: Any, processor: MiniMindVLMProcessor, fmt: str, items: list[Item], images: list[list],
                 passes: tuple[str, ...], methods: str, max_new_tokens: int, blank: _BlankFeatures) -> list[dict]:
    records = [{"uid": it.uid, "row": it.source, "labels": it.labels, "reference": it.reference,
                "chance": it.chance, "options": it.options, "letters": it.letters} for it in items]
    for pass_ in passes:
        grey = blank_image(processor.image_processor.image_size)
        pil = images if pass_ == "images" else [[grey] * len(x) for x in images]
        if methods in ("both", "loglik"):
            feats = encode(model, processor, pil) if pass_ == "images" else blank([len(x) for x in images])
            for rec, it, ll in zip(records, items, loglik_chunk(model, processor, items, feats)):
                if ll is not None:
                    for rule in ("sum", "mean"):
                        pick = ll[f"pick_{rule}"]
                        ll[f"answer_{rule}"] = _option_answer(fmt, it, pick)
                        ll[f"correct_{rule}"] = pick == it.answer
                rec.setdefault(pass_, {})["loglik"] = ll
        if methods in ("both", "generate"):
            for rec, it, text in zip(records, items, generate_chunk(model, processor, items, pil, max_new_tokens)):
                answer, right = judge(fmt, text, it.reference, it.letters, it.options, set(it.rivals))
                gen = {"response": text, "answer": answer, "correct": right}
                if fmt == "pope":
                    gen["strict"] = text.lower().strip() == it.reference
                rec.setdefault(pass_, {})["generate"] = gen
    return records


def _count_rows(path: str | Path) -> int:
    import pyarrow.parquet as pq
    return sum(pq.ParquetFile(f).metadata.num_rows for f in bench_files(path))


def _clean(x: Any) -> Any:
    """NaN (an empty category) -> None, so the report is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


@torch.inference_mode()
def evaluate(model: Any, tokenizer: Any, path: str | Path, fmt: str | None = None, limit: int = 0,
             methods: str = "both", baseline: bool = True, blank_only: bool = False, batch_size: int = 16,
             max_new_tokens: int = 24, show_progress: bool = True, out: str | Path | None = None,
             echo: bool = True) -> dict[str, Any]:
    """Score `model` on a benchmark file (or folder of shards) and return the report.

    `methods`: "both", "generate" or "loglik". `baseline`: also score every item with its images
    blanked (the text-only line); `blank_only`: score only that way. `out`: write the JSON report
    there. `echo`: print the table and the final `accuracy: X` line."""
    from tqdm import tqdm
    if methods not in METHOD_CHOICES:
        raise ChatInputError(f"--bench_method {methods}: choose from {', '.join(METHOD_CHOICES)}")
    fmt = detect_format(path, fmt)
    group_label = LAYOUTS[fmt][2]
    passes = ("blank",) if blank_only else (("images", "blank") if baseline else ("images",))
    total = _count_rows(path)
    skipped, records, t0 = Skipped(), [], time.perf_counter()
    processor = MiniMindVLMProcessor.from_config(model.config, tokenizer)
    blank = _BlankFeatures(model, processor)
    was_training = model.training
    model.eval()
    bar = tqdm(total=min(limit, total) if limit else total, desc=f"bench {Path(path).name}", unit="item",
               disable=not show_progress or None, dynamic_ncols=True)
    try:
        chunk: list[Item] = []
        items = iter_items(path, fmt, limit, skipped)
        while True:
            item = next(items, None)
            if item is not None:
                chunk.append(item)
                if len(chunk) < batch_size:
                    continue
            if chunk:
                decoded = [(it, im) for it in chunk if (im := _decode(it, skipped)) is not None]
                if decoded:
                    records += _score_chunk(model, processor, fmt, [d[0] for d in decoded], [d[1] for d in decoded],
                                            passes, methods, max_new_tokens, blank)
                bar.update(len(chunk))
                chunk = []
            if item is None:
                break
    finally:
        bar.close()
        model.train(was_training)
    method_keys = (("generate",) if methods != "loglik" else ()) + (("loglik_mean", "loglik_sum")
                                                                    if methods != "generate" else ())
    summary = summarize(fmt, records, group_label, passes, method_keys)
    main = f"{method_keys[0]}/{passes[0]}"
    if not records:
        raise ChatInputError(f"{path}: no row could be scored ({skipped.count} skipped: "
                             f"{'; '.join(skipped.examples[:3])})")
    report = {
        "file": str(path), "format": fmt, "rows": len(records), "skipped": skipped.as_dict(),
        "blank_image": blank_only, "method": method_keys[0], "accuracy": summary[main]["headline"],
        "headline": HEADLINE_NAMES.get(fmt, "accuracy"), "chance": summary["chance"]["headline"],
        "blank_accuracy": summary.get(f"{method_keys[0]}/blank", {}).get("headline"),
        "per_kind": summary[main]["per_label"][group_label], "grouped_by": group_label,
        "rules": {"generate": RULES[fmt] + f"; greedy, at most {max_new_tokens} new tokens",
                  "loglik_sum": "the option with the highest summed log-probability of its tokens after the "
                                "chat-template prompt",
                  "loglik_mean": "the option with the highest mean log-probability per token",
                  "blank": "every image replaced by a grey image (the model's input size)"},
        "scores": summary, "seconds": round(time.perf_counter() - t0, 2), "items": records,
    }
    report = _clean(report)
    if echo:
        print(f"{fmt} {path}: {len(records)} item(s) scored, {skipped.count} skipped")
        print(format_table(fmt, summary, group_label, passes, method_keys))
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, ensure_ascii=False))
        if echo:
            print(f"results written to {out}")
    if echo:
        print(f"accuracy: {report['accuracy']:.4f}")
    return report
