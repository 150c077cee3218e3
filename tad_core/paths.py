"""Where TaD-Eval keeps downloaded packages, converted models, datasets and the embedded DB, and how it writes there."""
from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """A private temporary path beside `path` to write a file or a directory into; renamed onto `path` when the
    block succeeds, removed when it fails.

    Why: one cache is shared by every process of a machine (workers, the dashboard's threads, concurrent test
    runs), so two of them may build the same entry at once. Each writes its own temporary (named by process and
    thread), and a reader only ever sees a complete entry (a rename within one filesystem is atomic). When another
    writer finished a directory first, that one is kept and ours discarded: both hold the same content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    _remove(tmp)
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            if not (tmp.is_dir() and path.is_dir()):
                raise
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
