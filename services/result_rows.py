"""Engine results as `sample_results` rows: one row per (sample, run), JSON-safe, and the rows that record why a
sample has no result."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):  # NaN / inf (an excluded choice) are not JSON
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item"):
        return _json_safe(value.item())
    return value


def result_rows(results: Sequence[Any], first_index: int, run_ids: dict[str, int]) -> list[dict[str, Any]]:
    """Engine SampleResults (one per sample, in order from `first_index`) -> sample_results rows, one per run."""
    rows = []
    for offset, res in enumerate(results):
        for key, run_id in run_ids.items():
            o = res.outcomes.get(key)
            if o is None:
                continue
            kv_src = getattr(o, "kv", None) or res.kv
            kv = _json_safe(dict(kv_src)) if kv_src else None
            rows.append({
                "run_id": run_id, "sample_index": first_index + offset, "sample_id": str(res.sample_id),
                "output": o.output, "extracted": o.extracted, "pred": o.pred, "pred_norm": o.pred_norm,
                "scores": _json_safe(list(o.scores)) if o.scores is not None else None,
                "correct": o.correct, "correct_norm": o.correct_norm, "flip_rate": _json_safe(o.flip_rate),
                "vs_ft": o.vs_ft, "latency_s": float(o.latency_s or 0.0), "tokens": int(o.tokens or 0), "kv": kv,
                "tie": getattr(o, "tie", None),
            })
    return rows


def error_rows(index: int, sample_id: str, run_ids: dict[str, int], error: str) -> list[dict[str, Any]]:
    """The rows of a sample that has no result, one per run, recording why (over budget, evaluation raised)."""
    return [{"run_id": run_id, "sample_index": index, "sample_id": str(sample_id), "error": error[:2000],
             "latency_s": 0.0, "tokens": 0} for run_id in run_ids.values()]
