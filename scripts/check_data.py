"""Validate a MiniMind-V data file without training: rows, images, bad rows by kind, a token-length
histogram and how many rows truncation to --max_seq_len would touch. The flags are the trainer's.

    python scripts/check_data.py dataset/sft_data.parquet --max_seq_len 1536
    python scripts/check_data.py old.jsonl --images_path dataset/images --tokenizer_path model/tokenizer

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
from model.argtypes import non_negative_int, positive_int
from model.model_vlm import VLMConfig
from model.processor import MiniMindVLMProcessor, load_tokenizer, tower_geometry_or_published

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


def check(path: Path, tokenizer_path: Path, max_seq_len: int, images_path: Path | None,
          num_workers: int, decode_images: bool, examples: int = 5, vision_model_path: Path | None = None) -> int:
    """Print the report; the image geometry (input size, slot length) is vision_model_path's when that
    folder exists, else the published one."""
    geometry = tower_geometry_or_published(vision_model_path)
    processor = MiniMindVLMProcessor.from_config(VLMConfig(**geometry), load_tokenizer(tokenizer_path))
    ds = VLMDataset(path, processor, max_length=max_seq_len, image_root=images_path)
    lengths = ds.lengths()
    logging.getLogger("minimind.data").setLevel(logging.ERROR)  # bad rows are reported below instead
    bad: dict[str, list[tuple[int, str]]] = defaultdict(list)
    n_images, n_truncated = 0, 0
    loader = DataLoader(RowCheck(ds, decode_images), batch_size=64, num_workers=num_workers, collate_fn=list)
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
    print(f"truncation    {int((lengths > max_seq_len).sum())} row(s) longer than --max_seq_len {max_seq_len}: "
          f"{n_truncated} cut after their last image, {len(bad.get('too_long', []))} skipped (too_long)")
    if bad:
        print("bad rows by kind:")
        for kind in sorted(bad, key=lambda k: BAD_KINDS.index(k) if k in BAD_KINDS else len(BAD_KINDS)):
            print(f"  {kind:14s} {len(bad[kind])}")
            for i, message in bad[kind][:examples]:
                print(f"      row {i}: {message}")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", help=".parquet (conversations + image_bytes) or .jsonl (conversations + image)")
    ap.add_argument("--data_path", help="the data file, as the trainer names it (instead of PATH)")
    ap.add_argument("--tokenizer_path", default=None,
                    help=f"default: {DEFAULT_TOKENIZER} when downloaded, else {PROJECT_TOKENIZER}")
    ap.add_argument("--max_seq_len", type=positive_int, default=640, help="the trainer's truncation length")
    ap.add_argument("--images_path", default=None, help="image folder of a .jsonl file (default: <its folder>/images)")
    ap.add_argument("--num_workers", type=non_negative_int, default=2, help="data-loader worker processes")
    ap.add_argument("--vision_model_path", default=str(DEFAULT_CLIP),
                    help="vision tower whose input size and slot length to check with (default geometry when absent)")
    ap.add_argument("--no_images", action="store_true", help="skip decoding images (text checks only)")
    # Earlier names of the same flags, still accepted.
    ap.add_argument("--max_length", dest="max_seq_len", type=positive_int, help=argparse.SUPPRESS)
    ap.add_argument("--image_root", dest="images_path", help=argparse.SUPPRESS)
    ap.add_argument("--workers", dest="num_workers", type=non_negative_int, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if (args.path is None) == (args.data_path is None):
        ap.error("give the data file once: as PATH or as --data_path")
    tok = resolve(args.tokenizer_path) if args.tokenizer_path else (
        DEFAULT_TOKENIZER if (DEFAULT_TOKENIZER / "tokenizer.json").exists() else PROJECT_TOKENIZER)
    try:
        code = check(resolve(args.path or args.data_path), tok, args.max_seq_len,
                     resolve(args.images_path) if args.images_path else None, args.num_workers, not args.no_images,
                     vision_model_path=resolve(args.vision_model_path))
    except (FileNotFoundError, ValueError) as e:  # no tokenizer / data file / vision tower, an unusable file
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
