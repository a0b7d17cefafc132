"""Scores from per-item outcomes: the benchmark headlines, per-category tables, POPE's metrics, chance.

A record (one per scored item) holds, for each pass ("images", "blank"), each method's extracted
answer and whether it is right. Headlines follow the benchmarks' own reports:

    mmstar    the mean over `l2_category` of each category's accuracy (lmms-eval's "average");
              the plain mean over items is reported beside it, and each `category` as the mean of
              its l2 categories (lmms-eval's per-category scores)
    mmbench   circular: a question counts when every copy of it (rows whose index differs by a
              multiple of 1,000,000) is answered right; without copies this is the item accuracy
    pope      accuracy, with precision, recall, F1 and the yes-ratio (the share of the model's
              answers that are "yes", as the POPE paper defines it) per category
    others    the item accuracy
The chance level goes through the same aggregation with each item's probability of a uniform guess.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

PASSES = ("images", "blank")
METHODS = ("generate", "loglik_mean", "loglik_sum")
METHOD_NAMES = {"generate": "generate", "loglik_mean": "ll-mean", "loglik_sum": "ll-sum"}
CIRCULAR = 1_000_000


def outcome(record: dict, pass_: str, method: str) -> tuple[str, bool] | None:
    """(the model's answer, right?) of one record for one pass and method; None when not scored."""
    res = record.get(pass_, {})
    if method == "generate":
        g = res.get("generate")
        return (g["answer"], g["correct"]) if g else None
    ll = res.get("loglik")
    if not ll:
        return None
    rule = method.split("_")[1]
    return ll[f"answer_{rule}"], ll[f"correct_{rule}"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _circular_key(uid: str) -> str:
    try:
        return str(int(uid) % CIRCULAR)
    except ValueError:
        return uid


def headline(fmt: str, records: list[dict], values: list[float]) -> float:
    """The benchmark's headline number of per-item `values` (1/0 for right/wrong, or chance levels)."""
    if not values:
        return float("nan")
    if fmt == "mmstar":
        by_l2: dict[str, list[float]] = defaultdict(list)
        for r, v in zip(records, values):
            by_l2[r["labels"].get("l2_category", "")].append(v)
        return _mean([_mean(v) for v in by_l2.values()])
    if fmt.startswith("mmbench"):
        groups: dict[str, float] = defaultdict(lambda: 1.0)
        for r, v in zip(records, values):
            groups[_circular_key(r["uid"])] *= v  # all copies right (or, for chance, all guessed right)
        return _mean(list(groups.values()))
    return _mean(values)


def pope_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """POPE's scores from yes/no answers: accuracy, precision, recall and F1 of "yes" (the object is
    there), and the yes-ratio, the share of the model's answers that are "yes"."""
    pairs = list(zip(predictions, references, strict=True))
    tp = sum(p == "yes" and r == "yes" for p, r in pairs)
    fp = sum(p == "yes" and r == "no" for p, r in pairs)
    tn = sum(p == "no" and r == "no" for p, r in pairs)
    fn = sum(p != "yes" and r == "yes" for p, r in pairs)  # an answer that is not "yes" misses the object
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": n, "accuracy": (tp + tn) / n if n else float("nan"), "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": sum(p == "yes" for p, _ in pairs) / n if n else float("nan"),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def summarize(fmt: str, records: list[dict], group_label: str, passes: tuple[str, ...],
              methods: tuple[str, ...]) -> dict[str, Any]:
    """Every score of a run: per method and pass the headline, the item mean and per-label tables;
    chance per label; POPE's metrics for POPE."""
    labels = sorted({k for r in records for k in r["labels"]})
    out: dict[str, Any] = {"chance": {"headline": headline(fmt, records, [r["chance"] for r in records]),
                                      "item_mean": _mean([r["chance"] for r in records]), "per_label": {}}}
    for label in labels:
        groups: dict[str, list[float]] = defaultdict(list)
        for r in records:
            groups[r["labels"].get(label, "")].append(r["chance"])
        out["chance"]["per_label"][label] = {g: _mean(v) for g, v in sorted(groups.items())}
    for method in methods:
        for pass_ in passes:
            scored = [(r, o) for r in records if (o := outcome(r, pass_, method)) is not None]
            if not scored:
                continue
            recs = [r for r, _ in scored]
            right = [float(o[1]) for _, o in scored]
            entry: dict[str, Any] = {"n": len(scored), "headline": headline(fmt, recs, right),
                                     "item_mean": _mean(right), "per_label": {}}
            for label in labels:
                groups: dict[str, list[float]] = defaultdict(list)
                for r, v in zip(recs, right):
                    groups[r["labels"].get(label, "")].append(v)
                entry["per_label"][label] = {g: {"n": len(v), "correct": int(sum(v)), "accuracy": _mean(v)}
                                             for g, v in sorted(groups.items())}
            if fmt == "mmstar":  # lmms-eval's per-category score: the mean of its l2 categories' accuracies
                l2 = entry["per_label"].get("l2_category", {})
                parent = {r["labels"].get("l2_category", ""): r["labels"].get("category", "") for r in recs}
                cats: dict[str, list[float]] = defaultdict(list)
                for name, v in l2.items():
                    cats[parent[name]].append(v["accuracy"])
                entry["category_l2_mean"] = {c: _mean(v) for c, v in sorted(cats.items())}
            if fmt == "pope":
                answers = [o[0] for _, o in scored]
                refs = [r["reference"] for r in recs]
                pope = {"all": pope_metrics(answers, refs)}
                for g in sorted({r["labels"].get(group_label, "") for r in recs}):
                    idx = [i for i, r in enumerate(recs) if r["labels"].get(group_label, "") == g]
                    pope[g] = pope_metrics([answers[i] for i in idx], [refs[i] for i in idx])
                entry["pope"] = pope
                if method == "generate":  # lmms-eval's strict rule, for comparison with its tables
                    entry["strict_exact_match"] = _mean([float(r[pass_]["generate"].get("strict", False))
                                                         for r in recs])
            out[f"{method}/{pass_}"] = entry
    return out


HEADLINE_NAMES = {"mmstar": "mean over l2_category",
                  "mmbench_en": "circular accuracy", "mmbench_cn": "circular accuracy",
                  "pope": "accuracy", "scienceqa": "accuracy", "qa": "accuracy"}


def _pct(x: float) -> str:
    return "   -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:6.1f}"


def format_table(fmt: str, summary: dict, group_label: str, passes: tuple[str, ...],
                 methods: tuple[str, ...]) -> str:
    """The on-screen report: one row per category, a column per method and pass, then the headlines."""
    cols = [(m, p) for m in methods for p in passes if f"{m}/{p}" in summary]
    chance = summary["chance"]["per_label"].get(group_label, {})
    groups = list(chance)
    width = max([len(group_label), 8, *(len(g) for g in groups)]) + 1
    head = f"{group_label:<{width}}{'n':>6} {'chance':>7}" + "".join(
        f" {METHOD_NAMES[m] + ('' if p == 'images' else ' blank'):>14}" for m, p in cols)
    lines = [head, "-" * len(head)]
    for g in groups:
        first = summary[f"{cols[0][0]}/{cols[0][1]}"]["per_label"][group_label].get(g, {}) if cols else {}
        row = f"{g:<{width}}{first.get('n', 0):>6} {_pct(chance[g]):>7}"
        for m, p in cols:
            row += f" {_pct(summary[f'{m}/{p}']['per_label'][group_label].get(g, {}).get('accuracy')):>14}"
        lines.append(row)
    lines.append("-" * len(head))
    rows = [(HEADLINE_NAMES.get(fmt, "accuracy"), "headline")]
    if fmt in ("mmstar",) or fmt.startswith("mmbench"):
        rows.append(("item mean", "item_mean"))
    for name, key in rows:
        row = f"{name[:width + 6]:<{width + 6}} {_pct(summary['chance'][key]):>7}"
        for m, p in cols:
            row += f" {_pct(summary[f'{m}/{p}'][key]):>14}"
        lines.append(row)
    if fmt == "pope":
        lines.append("")
        lines.append(f"{'POPE':<{width}}{'method':>16} {'acc':>6} {'prec':>6} {'recall':>6} {'F1':>6} {'yes%':>6}")
        for m, p in cols:
            for g, v in summary[f"{m}/{p}"]["pope"].items():
                name = METHOD_NAMES[m] + ("" if p == "images" else " blank")
                lines.append(f"{g:<{width}}{name:>16} {_pct(v['accuracy'])} {_pct(v['precision'])} "
                             f"{_pct(v['recall'])} {_pct(v['f1'])} {_pct(v['yes_ratio'])}")
    return "\n".join(lines)
