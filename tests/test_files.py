"""model/files.py: the one way files that must never be half-written are written."""
import os
import stat

import numpy as np
import pytest
import torch

from model.files import atomic_save, atomic_write, remove_stale_temporaries


def test_atomic_write_replaces_the_file_readably(tmp_path):
    path = tmp_path / "sub" / "x.npy"  # the folder is created
    with atomic_write(path) as f:
        np.save(f, np.arange(5))
    with atomic_write(path) as f:
        np.save(f, np.arange(3))
    assert np.load(path).tolist() == [0, 1, 2]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["x.npy"]  # no temporary left


@pytest.mark.parametrize("fsync", [True, False])
def test_a_failed_write_keeps_the_previous_file(tmp_path, fsync):
    path = tmp_path / "w.pth"
    atomic_save({"a": torch.ones(2)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path, fsync=fsync) as f:
            f.write(b"half of a new file")
            raise RuntimeError("disk full")
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]


def test_stale_temporaries_of_one_path_are_removed(tmp_path):
    for name in (".w.pth.abc123.tmp", ".w.pth.x.tmp", ".other.pth.abc.tmp", "w.pth"):
        (tmp_path / name).write_bytes(b"")
    remove_stale_temporaries(tmp_path / "w.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pth.abc.tmp", "w.pth"]
