"""Where TaD-Eval keeps downloaded packages, converted models, datasets and the embedded DB."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: `TAD_CACHE_DIR` or `~/.cache/tad`; created on first use."""
    root = Path(os.environ.get("TAD_CACHE_DIR") or Path.home() / ".cache" / "tad").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_subdir(*parts: str) -> Path:
    path = cache_dir().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
