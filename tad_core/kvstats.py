"""Knowledge-vector statistics of a decoding step, computed from the same logits the strategies use."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from tad_core.strategies import Step

STEP_STATS = ("kl", "js", "kv_l1", "kv_max", "h_f", "h_b")


def step_stats(step: Step) -> dict[str, torch.Tensor]:
    """Per-position statistics (each a tensor of the step's leading shape)."""
    lp_f, lp_b, p_f, p_b = step.lp_f, step.lp_b, step.p_f, step.p_b
    kl = (p_f * (lp_f - lp_b)).sum(-1)
    m = 0.5 * (p_f + p_b)
    log_m = torch.log(m.clamp_min(1e-38))
    js = 0.5 * (p_f * (lp_f - log_m)).sum(-1) + 0.5 * (p_b * (lp_b - log_m)).sum(-1)
    kv_abs = step.kv.abs()
    return {
        "kl": kl,
        "js": js,
        "kv_l1": kv_abs.sum(-1),
        "kv_max": kv_abs.amax(-1),
        "h_f": -(p_f * lp_f).sum(-1),
        "h_b": -(p_b * lp_b).sum(-1),
    }


def top_tokens(kv_sum: torch.Tensor, k: int, decode) -> dict[str, list[list[Any]]]:
    """Top-k promoted (largest kv) and demoted (smallest kv) tokens as [token string, id, value]."""
    k = min(k, kv_sum.numel())
    up = torch.topk(kv_sum, k)
    down = torch.topk(-kv_sum, k)
    return top_entries(up.indices.tolist(), up.values.tolist(), down.indices.tolist(), (-down.values).tolist(),
                       decode)


def top_entries(up_ids: Sequence[int], up_values: Sequence[float], down_ids: Sequence[int],
                down_values: Sequence[float], decode) -> dict[str, list[list[Any]]]:
    """The stored form of top promoted / demoted tokens (also built from a fused step's host copies)."""
    return {
        "promoted": [[decode(int(i)), int(i), round(float(v), 6)] for i, v in zip(up_ids, up_values)],
        "demoted": [[decode(int(i)), int(i), round(float(v), 6)] for i, v in zip(down_ids, down_values)],
    }


def aggregate(per_pos: dict[str, torch.Tensor], idx: Sequence[int] | torch.Tensor | None = None) -> dict[str, float]:
    """Mean and max of each statistic over the selected positions (all when idx is None)."""
    out: dict[str, float] = {}
    for name, t in per_pos.items():
        v = t if idx is None else t[idx]
        if v.numel() == 0:
            continue
        out[f"{name}_mean"] = float(v.mean())
        out[f"{name}_max"] = float(v.max())
    if idx is None:
        n = next(iter(per_pos.values())).numel()
    else:
        n = len(idx)
    out["steps"] = int(n)
    return out
