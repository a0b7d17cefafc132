"""Opt-in on-disk cache of the frozen vision encoder's patch features (`--feature_cache DIR`).

The vision tower is frozen, so an image's [patches, width] features never change: a multi-epoch run
computes them once (first epoch) and reads them back afterwards. One `.npy` file (fp16, [N, patches, width]) per
dataset row, in folders of 4096 rows, each written atomically; `meta.json` fingerprints the data
file and the encoder so a cache is never reused for other data.

Cached and freshly computed features are both rounded to fp16, so a run gives the same result
whichever rows happened to be cached already (resume equivalence holds with the cache on).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROWS_PER_FOLDER = 4096


def fingerprint(data_path: str | Path, vision_model_path: str | Path) -> dict[str, object]:
    """What the cached features depend on: the data file's identity and the encoder's weights."""
    data, vision = Path(data_path).resolve(), Path(vision_model_path).resolve()
    weights = sorted(vision.glob("*.safetensors")) + sorted(vision.glob("*.bin"))
    return {"data": str(data), "data_size": data.stat().st_size, "data_mtime_ns": data.stat().st_mtime_ns,
            "vision_model": str(vision), "vision_weights_size": sum(w.stat().st_size for w in weights)}


class FeatureCache:
    def __init__(self, root: str | Path, fp: dict[str, object]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        meta = self.root / "meta.json"
        if meta.exists():
            old = json.loads(meta.read_text())
            if old != fp:
                raise RuntimeError(f"feature cache {self.root} was built for other data or another vision "
                                   f"encoder ({old} vs {fp}): delete it or choose another --feature_cache folder")
        else:
            self._write(meta, json.dumps(fp, indent=1).encode())

    def _file(self, index: int) -> Path:
        return self.root / f"{index // ROWS_PER_FOLDER:05d}" / f"{index}.npy"

    @staticmethod
    def _write(path: Path, payload: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, index: int) -> torch.Tensor | None:
        f = self._file(index)
        return torch.from_numpy(np.load(f)) if f.exists() else None

    def put(self, index: int, features: torch.Tensor) -> None:
        buf = io.BytesIO()
        np.save(buf, features.detach().to("cpu", torch.float16).numpy())
        self._write(self._file(index), buf.getvalue())

    def features(self, indices: list[int], num_images: torch.Tensor, pixel_values: torch.Tensor | None,
                 encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """[B, Nmax, patches, width] fp16 features of a batch: cached rows are read, the others encoded in
        one call (`encode(pixel_values[rows], num_images[rows])`) and stored. None without images."""
        n_max = int(num_images.max()) if len(num_images) else 0
        if n_max == 0:
            return None
        cached = [self.get(i) if n > 0 else None for i, n in zip(indices, num_images.tolist())]
        misses = [b for b, (c, n) in enumerate(zip(cached, num_images.tolist())) if n > 0 and c is None]
        if misses:
            fresh = encode(pixel_values[misses], num_images[misses]).to("cpu", torch.float16)
            for j, b in enumerate(misses):
                cached[b] = fresh[j, : int(num_images[b])].clone()
                self.put(indices[b], cached[b])
        shape = next(c for c in cached if c is not None).shape[1:]
        out = torch.zeros(len(indices), n_max, *shape, dtype=torch.float16)
        for b, c in enumerate(cached):
            if c is not None:
                out[b, : c.shape[0]] = c
        return out
