"""Validate a MiniMind-V data file without training: rows, images, bad rows by kind, a token-length
histogram and how many rows truncation to --max_length would touch.

    python scripts/check_data.py dataset/sft_data.parquet --max_length 1536
    python scripts/check_data.py old.jsonl --image_root dataset/images --tokenizer_path model/tokenizer

Exit status 0 when every row is usable, 1 otherwise (bad rows are listed, a few per kind).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataset.lm_dataset import BAD_KINDS, BadRow, VLMDataset
from model import DEFAULT_CLIP, DEFAULT_TOKENIZER, PROJECT_TOKENIZER, resolve
from model.model_vlm import VLMConfig
from model.processor import MiniMindVLMProcessor, load_tokenizer, vision_geometry

BINS = [0, 128, 256, 384, 512, 640, 768, 1024, 1536, 2048, 4096]


class RowCheck(Dataset):
    """Row i -> (i, bad kind or None, message, images decoded, truncated?)."""

    def __init__(self, ds: VLMDataset, decode_images: bool):
        self.ds, self.decode_images = ds, decode_images

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[int, str | None, str, int, bool]:
        try:
            ids, _, refs = self.ds.encode(i)
            if self.decode_images:
                self.ds.decode_images(refs)
        except BadRow as e:
            return i, e.kind, str(e), 0, False
        return i, None, "", len(refs), ids.numel() < self.ds.lengths(show_progress=False)[i]


def histogram(lengths: np.ndarray, width: int = 40) -> list[str]:
    """Rows per token-length bin, as text bars, up to the bin holding the longest row."""
    longest = int(lengths.max())
    edges = [b for b in BINS if b <= longest] + [longest + 1]
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(int(counts.max()), 1)
    return [f"  {lo:5d}-{hi - 1:<6d} {c:8d} {'#' * round(width * c / top)}"
            for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


def check(path: Path, tokenizer_path: Path, max_length: int, image_root: Path | None,
          workers: int, decode_images: bool, examples: int = 5, vision_model_path: Path | None = None) -> int:
    """Print the report; the image geometry (input size, slot length) is vision_model_path's when that
    folder exists, else the published one."""
    geometry = vision_geometry(vision_model_path) if vision_model_path and (vision_model_path / "config.json").is_file() else {}
    processor = MiniMindVLMProcessor.from_config(VLMConfig(**geometry), load_tokenizer(tokenizer_path))
    ds = VLMDataset(path, processor, max_length=max_length, image_root=image_root)
    lengths = ds.lengths()
    logging.getLogger("minimind.data").setLevel(logging.ERROR)  # bad rows are reported below instead
    bad: dict[str, list[tuple[int, str]]] = defaultdict(list)
    n_images, n_truncated = 0, 0
    loader = DataLoader(RowCheck(ds, decode_images), batch_size=64, num_workers=workers, collate_fn=list)
    for batch in tqdm(loader, desc=f"checking {path.name}", unit="batch"):
        for i, kind, message, images, truncated in batch:
            if kind:
                bad[kind].append((i, message))
            n_images += images
            n_truncated += truncated

    n_bad = sum(len(v) for v in bad.values())
    print(f"file          {path}")
    print(f"tokenizer     {tokenizer_path}")
    print(f"rows          {len(ds)} ({len(ds) - n_bad} usable, {n_bad} bad)")
    print(f"images        {n_images} in usable rows{'' if decode_images else ' (not decoded: --no_images)'}")
    good = lengths[lengths > 0]
    if len(good):
        print(f"tokens/row    min {good.min()}  median {int(np.median(good))}  mean {good.mean():.0f}  max {good.max()}")
        print("token-length histogram (before truncation):")
        print("\n".join(histogram(good)))
    print(f"truncation    {int((lengths > max_length).sum())} row(s) longer than max_length {max_length}: "
          f"{n_truncated} cut after their last image, {len(bad.get('too_long', []))} skipped (too_long)")
    if bad:
        print("bad rows by kind:")
        for kind in sorted(bad, key=lambda k: BAD_KINDS.index(k) if k in BAD_KINDS else len(BAD_KINDS)):
            print(f"  {kind:14s} {len(bad[kind])}")
            for i, message in bad[kind][:examples]:
                print(f"      row {i}: {message}")
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help=".parquet (conversations + image_bytes) or .jsonl (conversations + image)")
    ap.add_argument("--tokenizer_path", default=None,
                    help=f"default: {DEFAULT_TOKENIZER} when downloaded, else {PROJECT_TOKENIZER}")
    ap.add_argument("--max_length", type=int, default=640)
    ap.add_argument("--image_root", default=None, help="image folder of a .jsonl file (default: <its folder>/images)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vision_model_path", default=str(DEFAULT_CLIP),
                    help="vision tower whose input size and slot length to check with (default geometry when absent)")
    ap.add_argument("--no_images", action="store_true", help="skip decoding images (text checks only)")
    args = ap.parse_args()
    tok = resolve(args.tokenizer_path) if args.tokenizer_path else (
        DEFAULT_TOKENIZER if (DEFAULT_TOKENIZER / "tokenizer.json").exists() else PROJECT_TOKENIZER)
    try:
        code = check(resolve(args.path), tok, args.max_length, resolve(args.image_root) if args.image_root else None,
                     args.workers, not args.no_images, vision_model_path=resolve(args.vision_model_path))
    except (FileNotFoundError, ValueError) as e:  # no tokenizer / data file / vision tower, an unusable file
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
