"""How paired generation runs its decoding steps, chosen once per loaded pair and reported.

- `dynamic`: transformers' growing `DynamicCache`, eager. The CPU default: there the measured fast route is the
  few-rows matmul of `tad_core.engine.SmallRowsLinear`, and a static cache would attend over every preallocated
  position at every step.
- `static`: a preallocated `StaticCache` (prompt + new tokens, rounded up to a multiple of 64 by
  `tad_core.generation.static_length` so that batches share compiled graphs) with the attention mask padded to it,
  eager: every step has the same shapes and tensor addresses. Greedy outputs are token-identical to `dynamic` (tests).
- `compiled`: `static` with the single-token steps of the paired forward run by `torch.compile` (on CUDA with
  `mode="reduce-overhead"`, i.e. captured CUDA graphs: one graph launch per step instead of hundreds of kernel
  launches from Python), and every strategy of the batch stepped by one compiled function (`tad_core.fused_step`:
  next tokens, flips and kv statistics of all rows, one host read per step; greedy strategies that read only the
  two logit tensors, the eager strategy loop otherwise). Both are compiled whole (`fullgraph=True`, no graph
  breaks: `tad_core.compiled`). The CUDA default where the pair allows it.

Where a path is impossible the next one down is used and the reason kept: prefix-tuning pairs start their cache
from the learned prefix (a dynamic cache), so they decode `dynamic`; a compile or capture that fails on its first
step falls back to `static` for the rest of the process. `pair.info["decode_path"]` holds the choice and the
reason; benchmarks print it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from tad_core.compiled import CompiledOrEager
from tad_core.models import PairedModel

log = logging.getLogger(__name__)

DecodePath = Literal["dynamic", "static", "compiled"]
PATHS: tuple[str, ...] = ("dynamic", "static", "compiled")


@dataclass
class DecodeChoice:
    """The decoding path of a pair, why it was chosen, and (compiled) the step callable the runner uses."""

    path: str
    reason: str
    step: Any = None

    def describe(self) -> str:
        return f"{self.path} ({self.reason})"


def _static_possible(pair: PairedModel) -> str | None:
    """Why this pair cannot decode with a static cache (None: it can)."""
    if pair.path == "two_pass" and pair.model.peft_config["default"].is_prompt_learning:
        return "prefix tuning starts the fine-tuned cache from its learned prefix (a dynamic cache)"
    return None


def choose(pair: PairedModel, requested: str | None = None) -> DecodeChoice:
    """The pair's decoding path: `requested` when given and possible, else the device's default; the default
    choice is made once and kept in `pair.info["decode_path"]` (a request for another path builds its own)."""
    if requested is not None and requested not in PATHS:
        raise ValueError(f"decode must be one of {', '.join(PATHS)}, got {requested!r}")
    cached = pair.info.get("decode_path")
    if cached is not None and (requested is None or requested == cached.path):
        return cached
    if requested is not None:
        key = f"decode_path:{requested}"
        if key not in pair.info:
            pair.info[key] = _build(pair, requested, "requested")
        return pair.info[key]
    cuda = pair.device.type == "cuda"
    choice = _build(pair, "compiled" if cuda else "dynamic",
                    "CUDA: captured graphs" if cuda else "CPU: eager steps with the few-rows matmul route")
    pair.info["decode_path"] = choice
    log.info("decoding path: %s", choice.describe())
    return choice


def _build(pair: PairedModel, path: str, reason: str) -> DecodeChoice:
    if path != "dynamic" and (why := _static_possible(pair)) is not None:
        return DecodeChoice("dynamic", why)
    if path == "compiled" and pair.path == "two_pass":
        return DecodeChoice("static", "the base rows run the fine-tuned module with its adapter switched off, "
                                      "which a captured graph cannot follow")
    choice = DecodeChoice(path, reason)
    if path == "compiled":
        def fall_back(why: str) -> None:
            choice.path, choice.reason = "static", f"compile failed: {why}"
        choice.step = CompiledOrEager(pair.model, "the paired forward", pair.device, fall_back)
    return choice
