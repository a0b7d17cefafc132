"""Row storage: both published data formats behind one memory-mapped Arrow file.

The original read the whole Parquet table into every data-loader worker (out of memory at 8
workers). Here a data file is converted once, streaming, into an uncompressed Arrow IPC file next
to it (`<folder>/.cache/<name>.<fingerprint>.arrow`); every process then memory-maps that file, so
rows are read on demand, zero-copy, and all workers share one copy in the OS page cache.

Rows of the cache: `conversations` (the JSON string, as in the data file) and either
`image_bytes` (list<binary>: the Parquet column may hold one binary value or, our extension for
multi-image rows, a list of them) or `image` (list<string>: the JSONL `image` field split at
commas, names relative to the image folder).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from model.files import atomic_write

BATCH = 512  # rows per conversion batch: bounded memory even with large images


def fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]


def cache_path(data_path: Path, cache_dir: Path | None = None) -> Path:
    """`<data folder>/.cache/`, or `~/.cache/minimind-v/` when the data folder is read-only."""
    folder = cache_dir
    if folder is None:
        folder = data_path.parent / ".cache"
        if not os.access(folder if folder.exists() else data_path.parent, os.W_OK):
            folder = Path.home() / ".cache" / "minimind-v"
    return folder / f"{data_path.name}.{fingerprint(data_path)}.arrow"


def _as_image_list(col: pa.ChunkedArray | pa.Array | None, n: int) -> pa.Array:
    """A binary column (one image per row) or list<binary> column -> list<large_binary>."""
    if col is None:
        return pa.nulls(n, pa.list_(pa.large_binary()))
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return col.cast(pa.list_(pa.large_binary()))
    values = col.cast(pa.large_binary())
    offsets = pa.array(np.arange(n + 1, dtype=np.int32))
    lists = pa.ListArray.from_arrays(offsets, values)
    return pa.array(lists.to_pylist(), type=pa.list_(pa.large_binary())) if values.null_count else lists


def _parquet_batches(path: Path):
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if "conversations" not in names:
        raise ValueError(f"{path}: no `conversations` column (columns: {names}); "
                         f"expected the MiniMind-V layout: conversations (JSON string) + image_bytes")
    cols = ["conversations"] + (["image_bytes"] if "image_bytes" in names else [])
    with tqdm(total=pf.metadata.num_rows, desc=f"indexing {path.name}", unit="row", leave=False) as bar:
        for b in pf.iter_batches(batch_size=BATCH, columns=cols):
            conv = b.column("conversations")
            if not pa.types.is_string(conv.type) and not pa.types.is_large_string(conv.type):
                # a list<struct> column (already parsed): store it as the JSON string the rest expects
                conv = pa.array([json.dumps(c, ensure_ascii=False) for c in conv.to_pylist()])
            images = _as_image_list(b.column("image_bytes") if "image_bytes" in cols else None, b.num_rows)
            bar.update(b.num_rows)
            yield pa.record_batch([conv.cast(pa.large_string()), images], names=["conversations", "image_bytes"])


def _jsonl_batches(path: Path):
    conv: list[str] = []
    images: list[list[str] | None] = []

    def flush():
        batch = pa.record_batch([pa.array(conv, pa.large_string()), pa.array(images, pa.list_(pa.large_string()))],
                                names=["conversations", "image"])
        conv.clear(), images.clear()
        return batch

    with open(path, "rb") as f:
        for raw in tqdm(f, desc=f"indexing {path.name}", unit="row", leave=False):
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:  # a malformed line is kept as is: it becomes a counted bad row when read
                obj = json.loads(line)
                c, names = obj["conversations"], obj.get("image")
                conv.append(c if isinstance(c, str) else json.dumps(c, ensure_ascii=False))
                if isinstance(names, str):
                    names = [n.strip() for n in names.split(",") if n.strip()]
                images.append(list(names) if names else None)
            except (json.JSONDecodeError, KeyError, TypeError):
                conv.append(line)
                images.append(None)
            if len(conv) >= BATCH:
                yield flush()
    if conv:
        yield flush()


def build_cache(data_path: Path, out: Path) -> Path:
    """Stream `data_path` (.parquet or .jsonl) into the Arrow file `out`, atomically."""
    batches = _parquet_batches(data_path) if data_path.suffix == ".parquet" else _jsonl_batches(data_path)
    try:
        with atomic_write(out) as f:  # concurrent builders (DDP ranks) each write their own temporary
            writer = None
            for batch in batches:
                if writer is None:
                    writer = pa.ipc.new_file(f, batch.schema)
                writer.write_batch(batch)
            if writer is None:
                raise ValueError(f"{data_path}: the file holds no rows")
            writer.close()
    finally:
        pa.default_memory_pool().release_unused()  # hand the conversion buffers back to the OS
    current = out.name.removesuffix(".arrow")
    for old in out.parent.glob(f"{data_path.name}.*"):  # caches (rows, lengths) of earlier versions of the file
        if not old.name.startswith(current):
            old.unlink(missing_ok=True)
    return out


class RowStore:
    """Read-only random access to the rows of a .parquet or .jsonl data file.

    Picklable and fork-safe: the memory map is opened lazily, once per process.
    """

    def __init__(self, data_path: str | Path, cache_dir: str | Path | None = None):
        self.path = Path(data_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data file not found: {self.path}")
        if self.path.suffix not in (".parquet", ".jsonl"):
            raise ValueError(f"{self.path}: unsupported data file (expected .parquet or .jsonl)")
        self.cache = cache_path(self.path, Path(cache_dir) if cache_dir else None)
        if not self.cache.exists():
            build_cache(self.path, self.cache)
        self._pid, self._table = None, None
        table = self.table
        self.num_rows = table.num_rows
        self.image_kind = "image_bytes" if "image_bytes" in table.schema.names else "image"

    @property
    def table(self) -> pa.Table:
        if self._pid != os.getpid():
            self._table = pa.ipc.open_file(pa.memory_map(str(self.cache), "r")).read_all()
            self._pid = os.getpid()
        return self._table

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": None, "_table": None}

    def __len__(self) -> int:
        return self.num_rows

    def conversations(self, i: int) -> str:
        return self.table.column("conversations")[i].as_py()

    def images(self, i: int) -> list[bytes] | list[str]:
        """The row's image bytes (Parquet) or image names (JSONL), nulls dropped."""
        refs = self.table.column(self.image_kind)[i]
        # .values (a zero-copy slice) then to_pylist: ListScalar.as_py() allocates far more than the row
        return [] if not refs.is_valid else [r for r in refs.values.to_pylist() if r is not None]

    def iter_conversations(self, batch_size: int = 4096):
        """All conversation strings, in order, a batch at a time (for length computation)."""
        col = self.table.column("conversations")
        for start in range(0, self.num_rows, batch_size):
            yield col.slice(start, batch_size).to_pylist()
