"""MiniMind-V model code and the repository's default paths (all resolved from the repo root)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VISION_DIR = ROOT / "model" / "vision_model"
DEFAULT_CLIP = VISION_DIR / "clip-vit-base-patch16"        # the real openai/clip-vit-base-patch16
TINY_CLIP = VISION_DIR / "clip-tiny-random"                # offline stand-in for tests/quickstart
RANDOM_CLIP = VISION_DIR / "clip-vit-base-patch16-random"  # offline stand-in of the real geometry
DEFAULT_TOKENIZER = ROOT / "model" / "minimind_tokenizer"  # the published tokenizer (downloaded)
PROJECT_TOKENIZER = ROOT / "model" / "tokenizer"           # the project's own, shipped in git
OUT_DIR = ROOT / "out"
DATA_DIR = ROOT / "dataset"


def resolve(path: str | Path) -> Path:
    """A user path as given if absolute or existing from the working directory, else from the repo root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return ROOT / p
