"""Which matmul the paired forward uses for its few rows on the CPU, decided by a measurement on this machine.

At batch 1-2 a paired decoding step has 2-4 rows. On the CPU where the engine was first tuned (2-core AMD EPYC)
fp32 `F.linear` with 2-4 rows left BLAS's matrix-vector kernel and cost ~1.6x the one-row call, while
`weight @ x.T` on the same rows cost what one row did; on another machine (Xeon with AVX-512/AMX) the same
route made TaD/ft worse, not better. So the route is not fixed: when a pair is first used on the CPU, both are timed
on the model's own Linear shapes with the row count of a batch-1 paired step, round-robin, and the faster one is
kept (`weight @ x.T` only when it wins clearly). The measurement and the choice are kept in
`pair.info["few_rows_route"]` and printed by the benchmarks.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

ROUTES = ("linear", "mm")
MARGIN = 0.9  # `mm` is taken only when it costs < 90% of `linear` (a tie keeps transformers' own path)


@dataclass(frozen=True)
class RouteChoice:
    """The chosen route and what was measured (ms for one pass over the sampled layers, median of rounds)."""

    route: str
    linear_ms: float | None = None
    mm_ms: float | None = None
    reason: str = ""

    def describe(self) -> str:
        if self.linear_ms is None:
            return f"{self.route} ({self.reason})"
        return (f"{self.route} (measured on this CPU: F.linear {self.linear_ms:.2f} ms, weight @ x.T "
                f"{self.mm_ms:.2f} ms per pass over the sampled layers, 2 rows)")


def _sample_layers(model: Any, limit: int = 4) -> list[torch.nn.Linear]:
    """The model's fp32 Linear layers, one per weight shape, largest first (the ones a decode step is made of)."""
    by_shape: dict[tuple[int, ...], torch.nn.Linear] = {}
    for m in model.modules():
        if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu":
            by_shape.setdefault(tuple(m.weight.shape), m)
    return sorted(by_shape.values(), key=lambda m: -m.weight.numel())[:limit]


def measure(model: Any, rows: int = 2, rounds: int = 5, inner: int = 1) -> RouteChoice:
    """Time `F.linear` and `weight @ x.T` with `rows` rows on the model's own layer shapes, round-robin (about
    10 passes over its 4 largest layer shapes: ~2 s for SmolLM2-135M on a heavily loaded 2-core CPU)."""
    layers = _sample_layers(model)
    if not layers:
        return RouteChoice("linear", reason="no fp32 CPU Linear layers")
    xs = [torch.randn(rows, m.in_features) for m in layers]

    def linear() -> None:
        for m, x in zip(layers, xs):
            torch.nn.functional.linear(x, m.weight, m.bias)

    def mm() -> None:
        for m, x in zip(layers, xs):
            torch.mm(m.weight, x.t()).t()

    times: dict[str, list[float]] = {"linear": [], "mm": []}
    with torch.no_grad():
        linear(), mm()  # warm caches and kernels
        for _ in range(rounds):
            for name, fn in (("linear", linear), ("mm", mm)):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[name].append((time.perf_counter() - t0) * 1000 / inner)
    lin, m = statistics.median(times["linear"]), statistics.median(times["mm"])
    return RouteChoice("mm" if m < MARGIN * lin else "linear", lin, m)
