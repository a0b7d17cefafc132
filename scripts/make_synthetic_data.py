"""A seeded synthetic vision-language task in the published MiniMind-V Parquet layout.

Each image (64x64 PNG) shows one or two coloured shapes on a light background. Every answer is a
word read off the image and drawn uniformly from its listed choices, so text alone is at chance:

    colour      What colour is the shape? (one of 6)             one shape anywhere
    horizontal  Is the shape on the left or on the right?        one shape in a quadrant
    vertical    Is the shape at the top or at the bottom?        one shape in a quadrant
    two_images  What colour is the shape in the first/second image?   two images, one shape each
    two_images_where  Is the shape in the first/second image on the left or on the right?

Colour and position are learnable from a randomly initialised CLIP stand-in; the kind of shape is
not (measured on the original code: shape questions stay near chance), so no question asks
about it. Colour is also the trap: a model can answer it by
averaging the whole image, and once it does, nothing pushes it to find *where* the shape is. Measured
(tiny stand-in, LM hidden 128 x 4 from scratch, batch 16, lr 1e-3, all kinds mixed from the start):
colour and top/bottom 1.0 within 300 steps, left/right still 0.5 and two_images ~0.6 after 600
(top/bottom can lean on where the shape's patches sit in the image's token sequence, left/right cannot).
Trained on left/right questions alone, left/right reaches 1.0 in ~150 steps and stays there when
the other kinds join. So the first stage's file holds only questions colour cannot answer:

    pretrain.parquet  stage 1 (the quickstart's pretraining): left/right questions only, about one
                      image or about the first/second of two (kinds horizontal, two_images_where)
    sft.parquet       the first four kinds (two_images 40%), multi-turn rows (two questions about one image)
                      and two-image rows (`image_bytes` a list of two PNGs: our multi-image extension)
    eval.parquet      single-turn questions + reference answers, columns `kind` and `answer`
                      (kinds colour/horizontal/vertical by default; --eval_kinds adds two_images)

    python scripts/make_synthetic_data.py --out dataset/synthetic --seed 0
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from tqdm import tqdm

from model import resolve
from model.argtypes import positive_int, seed_int
from model.files import atomic_write

SIZE = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (235, 200, 20), "purple": (140, 40, 170), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
KINDS = ("colour", "horizontal", "vertical", "two_images")
# Evaluated by default: the kinds measured learnable within a few hundred steps; two_images
# (the same colour skill plus picking the right image) is trained on, and evaluated on request.
EVAL_KINDS = ("colour", "horizontal", "vertical")
PRETRAIN_KINDS = ("horizontal", "two_images_where")
# SFT's share of each kind (KINDS order): the two-image colour question, the slowest to learn (it must
# read the colour of the named image only), gets the largest share.
SFT_MIX = (0.2, 0.2, 0.2, 0.4)
# Bumped whenever what a seed produces changes, so files from an older recipe are rewritten, not reused.
DATA_VERSION = 2
CHOICES = {"colour": list(COLOURS), "horizontal": ["left", "right"], "vertical": ["top", "bottom"]}
QUESTIONS = {
    "colour": "What colour is the shape? Answer with one of: red, green, blue, yellow, purple, orange.",
    "horizontal": "Is the shape on the left or on the right? Answer left or right.",
    "vertical": "Is the shape at the top or at the bottom? Answer top or bottom.",
    "two_images": "What colour is the shape in the {which} image? Answer with one of: red, green, blue, yellow, purple, orange.",
    "two_images_where": "Is the shape in the {which} image on the left or on the right? Answer left or right.",
}
# What a two-image question asks about the chosen image.
TWO_IMAGE_ATTRIBUTE = {"two_images": "colour", "two_images_where": "horizontal"}
CAPTION_PROMPTS = ["<image>\nDescribe the image.", "Describe this picture.\n<image>",
                   "<image>\nWhat do you see?", "Write a short caption for the image.\n<image>"]


def draw_scene(rng: np.random.Generator, colour: str, vertical: str, horizontal: str,
               shape: str) -> bytes:
    """One shape of `colour` in the given quadrant, jittered in place and size, as PNG bytes."""
    bg = tuple(int(v) for v in rng.integers(225, 256, 3))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(img)
    r = int(rng.integers(9, 14))  # big shapes: a strong signal even through a random CLIP stand-in
    q = SIZE // 2  # centred in its quadrant, jittered a little: the answer is never ambiguous
    cx = q // 2 + (q if horizontal == "right" else 0) + int(rng.integers(-3, 4))
    cy = q // 2 + (q if vertical == "bottom" else 0) + int(rng.integers(-3, 4))
    fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour])
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def random_scene(rng: np.random.Generator) -> tuple[dict, bytes]:
    s = {"colour": str(rng.choice(CHOICES["colour"])), "vertical": str(rng.choice(CHOICES["vertical"])),
         "horizontal": str(rng.choice(CHOICES["horizontal"])), "shape": str(rng.choice(SHAPES))}
    return s, draw_scene(rng, s["colour"], s["vertical"], s["horizontal"], s["shape"])


def caption(s: dict) -> str:
    article = "An" if s["colour"][0] in "aeiou" else "A"
    return f"{article} {s['colour']} {s['shape']} at the {s['vertical']} {s['horizontal']}."


def question(rng: np.random.Generator, kind: str) -> tuple[str, str, list[bytes]]:
    """(user text with <image> markers, answer, images) for one question of `kind`."""
    if kind in TWO_IMAGE_ATTRIBUTE:
        (s1, b1), (s2, b2) = random_scene(rng), random_scene(rng)
        which = str(rng.choice(["first", "second"]))
        answer = (s1 if which == "first" else s2)[TWO_IMAGE_ATTRIBUTE[kind]]
        return "<image>\n<image>\n" + QUESTIONS[kind].format(which=which), answer, [b1, b2]
    s, b = random_scene(rng)
    return "<image>\n" + QUESTIONS[kind], s[kind], [b]


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def pretrain_row(rng: np.random.Generator) -> dict:
    """A question that averaging the image cannot answer (see the module docstring)."""
    text, answer, images = question(rng, str(rng.choice(PRETRAIN_KINDS)))
    return {"conversations": [msg("user", text), msg("assistant", answer)], "image_bytes": images}


def caption_row(rng: np.random.Generator) -> dict:
    """A captioning row in the published pretraining style ("A red circle at the top left.")."""
    s, b = random_scene(rng)
    conv = [msg("user", str(rng.choice(CAPTION_PROMPTS))), msg("assistant", caption(s))]
    return {"conversations": conv, "image_bytes": [b]}


def sft_row(rng: np.random.Generator) -> dict:
    kind = str(rng.choice(KINDS, p=SFT_MIX))
    if kind != "two_images" and rng.random() < 0.25:  # multi-turn: a second question about the same image
        s, b = random_scene(rng)
        k1, k2 = rng.choice(["colour", "horizontal", "vertical"], size=2, replace=False)
        conv = [msg("user", "<image>\n" + QUESTIONS[k1]), msg("assistant", s[k1]),
                msg("user", QUESTIONS[k2]), msg("assistant", s[k2])]
        return {"conversations": conv, "image_bytes": [b]}
    text, answer, images = question(rng, kind)
    return {"conversations": [msg("user", text), msg("assistant", answer)], "image_bytes": images}


def eval_row(rng: np.random.Generator, kind: str) -> dict:
    text, answer, images = question(rng, kind)
    return {"conversations": [msg("user", text), msg("assistant", answer)], "image_bytes": images,
            "kind": kind, "answer": answer}


def write_parquet(rows: list[dict], path: Path) -> None:
    """`image_bytes` is a plain binary column when every row has one image (the published layout),
    else a list<binary> column."""
    single = all(len(r["image_bytes"]) == 1 for r in rows)
    cols = {"conversations": pa.array([json.dumps(r["conversations"], ensure_ascii=False) for r in rows]),
            "image_bytes": pa.array([r["image_bytes"][0] for r in rows], pa.binary()) if single
            else pa.array([r["image_bytes"] for r in rows], pa.list_(pa.binary()))}
    for extra in ("kind", "answer"):
        if extra in rows[0]:
            cols[extra] = pa.array([r[extra] for r in rows])
    with atomic_write(path) as f:
        pq.write_table(pa.table(cols), f, row_group_size=1024)


def make_dataset(out: str | Path, seed: int = 0, n_pretrain: int = 6000, n_sft: int = 6000,
                 n_eval: int = 400, overwrite: bool = False, eval_kinds: tuple[str, ...] = EVAL_KINDS) -> dict[str, Path]:
    """Write pretrain/sft/eval Parquet files under `out`. A file is kept when it was written by the same
    recipe (version, seed, size, eval kinds: recorded beside it) unless `overwrite`; otherwise rewritten."""
    unknown = set(eval_kinds) - set(QUESTIONS)
    if unknown or not eval_kinds:
        raise ValueError(f"unknown eval kind(s) {sorted(unknown)}: choose from {', '.join(QUESTIONS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"pretrain": (n_pretrain, lambda rng, i: pretrain_row(rng)), "sft": (n_sft, lambda rng, i: sft_row(rng)),
            "eval": (n_eval, lambda rng, i: eval_row(rng, eval_kinds[i % len(eval_kinds)]))}  # balanced
    paths = {}
    for split, (n, make_row) in plan.items():
        path = paths[split] = out / f"{split}.parquet"
        recipe = json.dumps({"version": DATA_VERSION, "seed": seed, "rows": n,
                             **({"eval_kinds": list(eval_kinds)} if split == "eval" else {})})
        marker = out / f".{split}.recipe.json"
        if path.exists() and not overwrite and marker.exists() and marker.read_text() == recipe:
            continue
        rng = np.random.default_rng([seed, list(plan).index(split)])  # each split its own stream
        rows = [make_row(rng, i) for i in tqdm(range(n), desc=split, unit="row", leave=False)]
        write_parquet(rows, path)
        marker.write_text(recipe)
    return paths


def write_captions(path: str | Path, n: int, seed: int = 0) -> Path:
    """n caption rows (the published pretraining style, one image each): the training benchmark's data."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0])
    write_parquet([caption_row(rng) for _ in tqdm(range(n), desc="captions", unit="row", leave=False)], path)
    return path


def corpus(seed: int = 0, n: int = 2000) -> list[str]:
    """The task's text (questions, answers, captions), for training the project tokenizer."""
    rng = np.random.default_rng([seed, 99])
    # KINDS only: the shipped tokenizer was trained on these; later kinds reuse their words.
    texts = [QUESTIONS[k].format(which=w) for k in KINDS for w in ("first", "second")]
    texts += [p.replace("<image>", "") for p in CAPTION_PROMPTS]
    for _ in range(n):
        s = {"colour": str(rng.choice(CHOICES["colour"])), "vertical": str(rng.choice(CHOICES["vertical"])),
             "horizontal": str(rng.choice(CHOICES["horizontal"])), "shape": str(rng.choice(SHAPES))}
        texts.append(caption(s))
    return texts + [w for c in CHOICES.values() for w in c]


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="dataset/synthetic")
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--n_pretrain", type=positive_int, default=6000)
    ap.add_argument("--n_sft", type=positive_int, default=6000)
    ap.add_argument("--n_eval", type=positive_int, default=400)
    ap.add_argument("--eval_kinds", default=",".join(EVAL_KINDS),
                    help=f"question kinds in eval.parquet, comma-separated, from: {', '.join(QUESTIONS)}")
    ap.add_argument("--overwrite", action="store_true", help="regenerate files that already exist")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    paths = make_dataset(resolve(args.out), args.seed, args.n_pretrain, args.n_sft, args.n_eval, args.overwrite,
                         tuple(k.strip() for k in args.eval_kinds.split(",") if k.strip()))
    for split, p in paths.items():
        print(f"{split:9s} {pq.ParquetFile(p).metadata.num_rows:6d} rows  {p.stat().st_size / 1e6:6.1f} MB  {p}")


if __name__ == "__main__":
    main()
