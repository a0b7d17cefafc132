"""Fetch the real things from the Hugging Face hub into the paths every script uses by default.

    python scripts/download.py                      # CLIP, tokenizer, 512 weights and both datasets
    python scripts/download.py clip tokenizer       # just some of them
    python scripts/download.py weights --hidden_size 768
    python scripts/download.py --endpoint https://hf-mirror.com   # a mirror (or set HF_ENDPOINT)
    python scripts/download.py bench mmstar pope    # benchmark files, for eval_vlm.py --bench

What goes where:
    clip       openai/clip-vit-base-patch16          -> model/vision_model/clip-vit-base-patch16/
    tokenizer  jingyaogong/MiniMind2-V (tokenizer)   -> model/minimind_tokenizer/
    weights    jingyaogong/MiniMind2-V-PyTorch       -> out/*_{hidden}.pth (llm_, pretrain_vlm_, sft_vlm_)
    data       jingyaogong/minimind-v_dataset        -> dataset/pretrain_data.parquet, dataset/sft_data.parquet
    bench NAME the split a benchmark is scored on, only its files, under dataset/bench/NAME/:
               mmstar      Lin-Chen/MMStar          mmstar.parquet (val, 1500 questions)
               scienceqa   lmms-lab/ScienceQA       ScienceQA-IMG/test-*.parquet (2017)
               pope        lmms-lab/POPE            data/test-*.parquet (9000: adversarial, popular, random)
               mmbench_en  lmms-lab/MMBench         en/dev-*.parquet (dev, 4329)
               mmbench_cn  lmms-lab/MMBench         cn/dev-*.parquet (dev, 4329)

Downloads show progress, resume where they stopped, and skip files already complete.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from model import DATA_DIR, DEFAULT_CLIP, DEFAULT_TOKENIZER, OUT_DIR


@dataclass(frozen=True)
class Item:
    repo_id: str
    repo_type: str
    patterns: tuple[str, ...]
    local_dir: Path
    required: tuple[str, ...]  # what must be there afterwards (glob patterns), else the download failed


BENCH_DIR = DATA_DIR / "bench"
# name -> (hub dataset, the files of the split it is scored on); see eval_vlm.py --bench
BENCHMARKS = {
    "mmstar": ("Lin-Chen/MMStar", "mmstar.parquet"),
    "scienceqa": ("lmms-lab/ScienceQA", "ScienceQA-IMG/test-*.parquet"),
    "pope": ("lmms-lab/POPE", "data/test-*.parquet"),
    "mmbench_en": ("lmms-lab/MMBench", "en/dev-*.parquet"),
    "mmbench_cn": ("lmms-lab/MMBench", "cn/dev-*.parquet"),
}


def bench_item(name: str) -> Item:
    repo, pattern = BENCHMARKS[name]
    return Item(repo, "dataset", (pattern,), BENCH_DIR / name, (pattern,))


def items(hidden_size: int, data_files: list[str]) -> dict[str, Item]:
    h = hidden_size
    return {
        "clip": Item("openai/clip-vit-base-patch16", "model",
                     ("config.json", "preprocessor_config.json", "model.safetensors"), DEFAULT_CLIP,
                     ("config.json", "model.safetensors")),
        "tokenizer": Item("jingyaogong/MiniMind2-V", "model", ("tokenizer.json", "tokenizer_config.json"),
                          DEFAULT_TOKENIZER, ("tokenizer.json", "tokenizer_config.json")),
        "weights": Item("jingyaogong/MiniMind2-V-PyTorch", "model", (f"*_{h}.pth", f"*_{h}_moe.pth"), OUT_DIR,
                        (f"llm_{h}.pth",)),
        "data": Item("jingyaogong/minimind-v_dataset", "dataset", tuple(data_files), DATA_DIR, tuple(data_files)),
    }


class HubUnreachable(RuntimeError):
    pass


def fetch(item: Item, endpoint: str | None = None) -> list[Path]:
    """Download one item's files (resumable, with progress) and check the expected ones arrived."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        snapshot_download(repo_id=item.repo_id, repo_type=item.repo_type, allow_patterns=list(item.patterns),
                          local_dir=item.local_dir, endpoint=endpoint)
    except RepositoryNotFoundError as e:
        raise HubUnreachable(f"{item.repo_id} was not found on {where} ({e.__class__.__name__})") from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        offline = " HF_HUB_OFFLINE is set: unset it to download." if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise HubUnreachable(
            f"could not download {item.repo_id} from {where}: {e.__class__.__name__}: {str(e).splitlines()[0]}\n"
            f"  Check your connection, or use a mirror: --endpoint https://hf-mirror.com (or HF_ENDPOINT).{offline}\n"
            f"  Offline, `python scripts/quickstart.py` trains on synthetic data with a stand-in CLIP instead."
        ) from e
    missing = [f for f in item.required if not any(p.is_file() for p in item.local_dir.glob(f))]
    if missing:
        present = sorted(p.name for p in item.local_dir.glob("*") if p.is_file())
        raise HubUnreachable(f"{item.repo_id} did not provide {missing}; {item.local_dir} now holds {present}")
    return sorted(p for pat in item.patterns for p in item.local_dir.glob(pat))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", help="any of: clip tokenizer weights data (default: all of those); "
                    f"bench NAME [NAME...] with NAME from {', '.join(BENCHMARKS)}")
    ap.add_argument("--hidden_size", type=int, default=512, choices=[512, 768],
                    help="which published weights: 512 (MiniMind2-Small-V, 26M) or 768 (MiniMind2-V, 104M)")
    ap.add_argument("--data_files", nargs="+", default=["pretrain_data.parquet", "sft_data.parquet"],
                    help="dataset files to fetch")
    ap.add_argument("--endpoint", default=None, help="hub endpoint or mirror, e.g. https://hf-mirror.com")
    args = ap.parse_args(argv)
    table = items(args.hidden_size, args.data_files)
    what = list(args.what)
    benches = []
    if "bench" in what:  # "bench NAME...": every name after it is a benchmark
        at = what.index("bench")
        what, benches = what[:at], what[at + 1:]
        if not benches or any(b not in BENCHMARKS for b in benches):
            ap.error(f"bench needs benchmark names from {list(BENCHMARKS)} (got {benches or 'none'})")
        table |= {f"bench {b}": bench_item(b) for b in benches}
    chosen = what + [f"bench {b}" for b in benches] if (what or benches) else list(table)
    unknown = [w for w in chosen if w not in table]
    if unknown:
        ap.error(f"unknown item(s) {unknown}: choose from {list(table)} or bench NAME")
    for name in chosen:
        item = table[name]
        print(f"[{name}] {item.repo_id} -> {item.local_dir}", flush=True)
        try:
            files = fetch(item, args.endpoint)
        except HubUnreachable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for f in files:
            print(f"  {f} ({f.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
