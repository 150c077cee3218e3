"""How runs are named in tables: a strategy key plus the scoring settings that change its results.

One home for the rule, so the CLI, the dashboard and the exports name a run the same way.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def scoring_variant(spec: Mapping[str, Any] | None) -> str:
    """What in a job's config makes its runs score differently from the same strategy key elsewhere: the prompt
    format when not the default (`llm-adapters@1`), beam width, extraction override and the MC floor
    (`mc_floor=-1000`); "" for the default, literal setting. Tables name runs by key + variant so a literal
    and a floored run of the same strategy never hide one another."""
    from tad_core.formats import DEFAULT_FORMAT, canonical_format

    config = (spec or {}).get("config") or {}
    parts = []
    if config.get("format") and config["format"] != canonical_format(DEFAULT_FORMAT):
        parts.append(str(config["format"]))
    if config.get("num_beams", 1) != 1:
        parts.append(f"beams={config['num_beams']}")
    if config.get("extract"):
        parts.append(f"extract={config['extract']}")
    if config.get("mc_floor") is not None:
        parts.append(f"mc_floor={float(config['mc_floor']):g}")
    return ",".join(parts)


def with_variant(name: str, variant: str) -> str:
    """A strategy key (or series name) with the scoring variant when there is one: how runs are named in tables."""
    return f"{name} [{variant}]" if variant else name
