"""The model pair a worker process keeps loaded between shards (one at a time: a worker serves one model)."""
from __future__ import annotations

import threading
from typing import Any

from services.settings import Settings


_pair_lock = threading.Lock()
_pair_cache: dict[tuple[Any, ...], Any] = {}


def get_pair(spec: dict[str, Any], settings: Settings) -> Any:
    """The job's model pair, loaded once per process (one pair kept: a worker serves one model at a time)."""
    from tad_core.models import load_pair

    from services.model_dtype import job_dtype

    dtype = job_dtype(spec)
    key = (spec["base"], spec.get("adapter"), spec.get("finetuned"), settings.device, dtype)
    with _pair_lock:
        pair = _pair_cache.get(key)
        if pair is None:
            _pair_cache.clear()
            pair = load_pair(spec["base"], adapter=spec.get("adapter"), finetuned=spec.get("finetuned"),
                             allow_pickle=settings.allow_pickle, device=settings.device, dtype=dtype)
            _pair_cache[key] = pair
        return pair


def clear_pair_cache() -> None:
    with _pair_lock:
        _pair_cache.clear()
