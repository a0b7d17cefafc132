"""Files that must never be half-written: weights, resume files, caches, rewritten logs.

    with atomic_write(path) as f:     # f: a binary file in path's folder
        np.save(f, array)             # or torch.save(obj, f), pq.write_table(table, f), f.write(data)

The data goes to a temporary file next to `path` (same file system, so the final rename is atomic),
is flushed to disk, gets the permissions a plain `open()` would give, and replaces `path` in one
rename. A crash or kill at any moment leaves the previous file or the new one, never a truncated
one; a failure removes the temporary. A SIGKILL can still leave a temporary behind:
`remove_stale_temporaries` deletes those of one path.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str | Path, fsync: bool = True) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` when the block ends without an exception.

    `fsync=False` skips the flush to disk: a killed process still never leaves a partial file (the
    rename happens after the last write), only a power cut could. For caches that can recompute an entry.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file is as readable as any other
        os.replace(tmp, path)  # concurrent writers (DDP ranks) each have their own temporary; the last wins
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: object, path: str | Path) -> None:
    """`torch.save` through `atomic_write`."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def remove_stale_temporaries(path: str | Path) -> None:
    """Delete the temporaries a killed `atomic_write` of `path` left behind (never the file itself)."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
