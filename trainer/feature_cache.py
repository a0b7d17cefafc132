"""Opt-in on-disk cache of the frozen vision encoder's patch features (`--feature_cache DIR`).

The vision tower is frozen, so an image's [patches, width] features never change: a multi-epoch run
computes them once (first epoch) and reads them back afterwards. One `.npy` file (fp16, [N, patches, width]) per
dataset row, in folders of 4096 rows, each written atomically; `meta.json` fingerprints the data
file and the encoder so a cache is never reused for other data.

Cached and freshly computed features are both rounded to fp16, so a run gives the same result
whichever rows happened to be cached already (resume equivalence holds with the cache on).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from model.files import atomic_write

ROWS_PER_FOLDER = 4096


class FeatureCacheMismatch(RuntimeError):
    """A --feature_cache folder built for other data or another encoder."""


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
                raise FeatureCacheMismatch(f"feature cache {self.root} was built for other data or another vision "
                                           f"encoder ({old} vs {fp}): delete it or choose another --feature_cache folder")
        else:
            with atomic_write(meta) as f:
                f.write(json.dumps(fp, indent=1).encode())

    def _file(self, index: int) -> Path:
        return self.root / f"{index // ROWS_PER_FOLDER:05d}" / f"{index}.npy"

    def get(self, index: int) -> torch.Tensor | None:
        try:
            return torch.from_numpy(np.load(self._file(index)))
        except (FileNotFoundError, EOFError, ValueError):  # not cached yet, or emptied by a power cut (no fsync)
            return None

    def put(self, index: int, features: torch.Tensor) -> None:
        # No fsync per entry (thousands a minute): a killed run still never leaves a partial file.
        with atomic_write(self._file(index), fsync=False) as f:
            np.save(f, features.detach().to("cpu", torch.float16).numpy())

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
