"""The data loader does not copy the table into its workers (the original ran out of memory at 8).

Stated bound: over a ~190 MB Parquet file, each of 4 workers allocates less than 64 MB of anonymous
(heap) memory (`Anonymous` in /proc/self/smaps_rollup, from the worker's start), and building the
dataset leaves less than 64 MB more in the main process. Rows are read from a memory-mapped Arrow
file: file-backed pages of the page cache, shared by all processes, not copies. (A worker holding
the table, as the original's did, would need at least the file's size.)
"""
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from dataset.lm_dataset import VLMDataset, collate_fn
from model import PROJECT_TOKENIZER

pytestmark = [pytest.mark.filterwarnings("ignore:This DataLoader will create"),
              pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists() or sys.platform != "linux",
                                reason="needs Linux /proc/self/smaps_rollup")]
ROWS, PAD = 3000, 64 * 1024
BOUND_MB = 64
_baseline: dict[int, int] = {}


def anonymous_mb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Anonymous in smaps_rollup")


def big_parquet(path: Path) -> Path:
    """ROWS rows, each a tiny valid PNG followed by PAD random bytes (PIL stops reading at IEND)."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="PNG")
    conv = json.dumps([{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "red"}])
    writer = None
    for start in range(0, ROWS, 500):
        images = [buf.getvalue() + rng.bytes(PAD) for _ in range(500)]
        t = pa.table({"conversations": [conv] * 500, "image_bytes": pa.array(images, pa.binary())})
        writer = writer or pq.ParquetWriter(path, t.schema, compression="none")
        writer.write_table(t)
    writer.close()
    return path


def mark_baseline(worker_id: int) -> None:
    _baseline[os.getpid()] = anonymous_mb()


class Probe(Dataset):
    """Each item reports its worker's private-memory growth since the worker started."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self.ds[i]
        assert get_worker_info() is not None
        item["grown_mb"] = anonymous_mb() - _baseline[os.getpid()]
        item["pid"] = os.getpid()
        return item


def probe_collate(items):
    return collate_fn(items), [(it["pid"], it["grown_mb"]) for it in items]


def test_four_workers_stay_within_the_memory_bound(tmp_path):
    from model.processor import load_tokenizer
    path = big_parquet(tmp_path / "big.parquet")
    size_mb = path.stat().st_size / 2**20
    assert size_mb > 2.5 * BOUND_MB
    tok = load_tokenizer(PROJECT_TOKENIZER)
    before = anonymous_mb()
    ds = VLMDataset(path, tok, max_length=640)
    assert anonymous_mb() - before < BOUND_MB
    # rows spread over the whole file
    rows = np.random.default_rng(1).choice(ROWS, 320, replace=False).tolist()
    loader = DataLoader(Probe(ds), batch_size=8, sampler=rows, num_workers=4, collate_fn=probe_collate,
                        worker_init_fn=mark_baseline)
    grown: dict[int, float] = {}
    n = 0
    for batch, probes in loader:
        n += len(batch["input_ids"])
        assert batch["pixel_values"].shape[1:] == (1, 3, 224, 224)
        for pid, mb in probes:
            grown[pid] = max(grown.get(pid, 0.0), mb)
    assert n == len(rows) and len(grown) == 4
    worst = max(grown.values())
    print(f"file {size_mb:.0f} MB; worker private growth (MB): {sorted(round(v, 1) for v in grown.values())}")
    assert worst < BOUND_MB, f"a worker allocated {worst:.0f} MB (bound {BOUND_MB} MB) over a {size_mb:.0f} MB file"
