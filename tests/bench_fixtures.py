"""Small benchmark files in each published layout: the same column names and Arrow types as the files on
the hub (images as the `Image` feature's {bytes, path} struct), with made-up rows."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.infer_helpers import png_bytes

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
COLOURS = [(220, 30, 30), (30, 60, 220), (30, 170, 40), (235, 200, 20), (128, 128, 128)]


def image(i: int, data: bytes | None = None) -> dict:
    return {"bytes": data if data is not None else png_bytes(COLOURS[i % len(COLOURS)]), "path": f"{i}.png"}


def write(path: Path, columns: dict[str, list], types: dict[str, pa.DataType]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(name, types.get(name, pa.string())) for name in columns])
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def mmstar(path: Path, n: int = 6, images: list[bytes] | None = None) -> Path:
    """Lin-Chen/MMStar mmstar.parquet: options inside the question, answer a letter."""
    l2 = ["image emotion", "object counting", "geometry"]
    cat = ["coarse perception", "fine-grained perception", "math"]
    questions = [f"Which one fits picture {i}?\nOptions: A: a cat, sitting, B: two dogs, C: 3, 4, and 5, D: none"
                 for i in range(n)]
    return write(path, {
        "index": list(range(n)), "question": questions,
        "image": [image(i, images[i] if images else None) for i in range(n)],
        "answer": ["ABCD"[i % 4] for i in range(n)], "category": [cat[i % 3] for i in range(n)],
        "l2_category": [l2[i % 3] for i in range(n)],
        "meta_info": [{"source": "MMBench", "split": "val", "image_path": f"images/{i}.jpg"} for i in range(n)],
    }, {"index": pa.int64(), "image": IMAGE,
        "meta_info": pa.struct([("source", pa.string()), ("split", pa.string()), ("image_path", pa.string())])})


def scienceqa(path: Path, n: int = 4) -> Path:
    """lmms-lab/ScienceQA ScienceQA-IMG/test-*.parquet: choices a list, answer an int8 index."""
    choices = [["north", "south"], ["yes", "no", "maybe"], ["a magnet", "a rock"], ["hot", "cold", "warm", "wet"]]
    return write(path, {
        "image": [image(i) for i in range(n)], "question": [f"Question {i}?" for i in range(n)],
        "choices": [choices[i % 4] for i in range(n)], "answer": [i % 2 for i in range(n)],
        "hint": ["The map shows a place." if i % 2 == 0 else "" for i in range(n)],
        "task": ["closed choice"] * n, "grade": [f"grade{3 + i % 2}" for i in range(n)],
        "subject": ["natural science" if i % 2 == 0 else "social science" for i in range(n)],
        "topic": ["geography"] * n, "category": ["Geography"] * n, "skill": ["Read a map"] * n,
        "lecture": ["A lecture."] * n, "solution": ["A solution."] * n,
    }, {"image": IMAGE, "choices": pa.list_(pa.string()), "answer": pa.int8()})


def pope(path: Path, n: int = 6) -> Path:
    """lmms-lab/POPE data/test-*.parquet: answer yes/no, category adversarial/popular/random."""
    cats = ["adversarial", "popular", "random"]
    return write(path, {
        "id": [str(i) for i in range(n)], "question_id": [str(100 + i) for i in range(n)],
        "question": [f"Is there a {'dog' if i % 2 else 'cat'} in the image?" for i in range(n)],
        "answer": ["yes" if i % 2 == 0 else "no" for i in range(n)],
        "image_source": [f"COCO_val2014_{i:012d}" for i in range(n)], "image": [image(i) for i in range(n)],
        "category": [cats[i % 3] for i in range(n)],
    }, {"image": IMAGE})


def mmbench(path: Path, n: int = 4, chinese: bool = False, circular: bool = False) -> Path:
    """lmms-lab/MMBench en|cn/dev-*.parquet: options A-D (null when fewer), hint null when none.
    `circular` adds a copy of row 0 (index + 1,000,000) with its options rotated."""
    q = "图中是什么？" if chinese else "What is in the image?"
    rows = [dict(index=i, question=f"{q} {i}", hint=None if i % 2 else "A hint.", answer="ABC"[i % 3],
                 A="cat", B="dog", C="bird", D=None if i % 2 else "fish", category="object_localization",
                 image=image(i), source="coco", **{"L2-category": ["coarse_perception", "relation_reasoning"][i % 2]},
                 comment=None, split="dev") for i in range(n)]
    if circular:
        rows.append({**rows[0], "index": 1_000_000, "A": "fish", "B": "cat", "C": "dog", "D": "bird", "answer": "B"})
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    return write(path, cols, {"index": pa.int64(), "image": IMAGE})
