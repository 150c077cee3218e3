"""Model dtypes by name: what a worker loads its weights in, and how `auto` picks one for a device.

The dtype is part of a run's identity (a bf16 run's scores differ from an fp32 run's in the last digits, and
greedy outputs can diverge), so it is resolved to a concrete name (`float32`, `bfloat16`, `float16`) before a job
is stored; `auto` exists only on the way in (a setting or a command-line option) and never in a stored config.
"""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
CHOICES = ("auto", *DTYPES)


def canonical_dtype(name: str, field: str = "dtype") -> str:
    """A concrete dtype name (`fp32`, `bf16`, `fp16` accepted as spellings); ValueError naming `field` otherwise.

    `auto` is refused here: it depends on the device and must be resolved first (`resolve_dtype`)."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise ValueError(f"{field} must be one of {', '.join(DTYPES)} (or auto before submission), got {name!r}")
    return key


def resolve_dtype(name: str, device: str, field: str = "dtype") -> str:
    """`name` as a concrete dtype for `device`: `auto` is bfloat16 on a CUDA device that supports it (Ampere and
    later), float32 elsewhere (CPU kernels for bf16 matmuls are slower than fp32 ones on most CPUs)."""
    if str(name).lower() != "auto":
        return canonical_dtype(name, field)
    if str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a concrete name (as `canonical_dtype` accepts)."""
    return DTYPES[canonical_dtype(name)]
