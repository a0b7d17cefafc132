"""Public VLM benchmarks (MMStar, ScienceQA-IMG, POPE, MMBench) and the project's own Q&A files,
scored the way the field scores them.

    readers.py   the published Parquet layouts -> `Item`s, streamed (detected from the columns)
    extract.py   the documented answer-extraction rules (letters, yes/no, open answers)
    scoring.py   option log-likelihood (batched) and greedy generation on a chunk of items
    report.py    per-category tables, the benchmark headlines, POPE's metrics, chance, JSON
    run.py       one pass over a file: images and blanked images, both methods -> report
"""
from .readers import BenchError, Item, detect_format, iter_items
from .run import evaluate

__all__ = ["BenchError", "Item", "detect_format", "evaluate", "iter_items"]
