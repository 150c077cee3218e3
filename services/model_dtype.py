"""The dtype of a job's models: filled in and resolved at submission, read back by the worker that loads them.

A job's config carries a concrete dtype (`float32`, `bfloat16`, `float16`; never `auto`) because the dtype is part
of each run's identity: the submission resolves `--dtype` (or `TAD_DTYPE` when the request names none) against the
deployment's device (`TAD_DEVICE`), and the worker loads exactly that.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from tad_core.dtypes import resolve_dtype, torch_dtype

from services.settings import Settings


def resolve_config_dtype(config: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """`config` with its `dtype` concrete: the request's own (`auto` resolved for `settings.device`), else
    `TAD_DTYPE`'s. A name that is no dtype is left as given, so the config check reports it with its field."""
    out = dict(config)
    name = out.get("dtype") or settings.dtype
    try:
        out["dtype"] = resolve_dtype(name, settings.device)
    except ValueError:
        out["dtype"] = name
    return out


def job_dtype(spec: Mapping[str, Any]) -> torch.dtype:
    """The torch dtype a stored job's models load in (float32 for jobs stored before there was a choice)."""
    return torch_dtype((spec.get("config") or {}).get("dtype") or "float32")
