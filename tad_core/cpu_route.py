"""Which matmul the paired forward uses for its rows on the CPU, decided by a measurement on this machine.

A paired decoding step has twice the rows of the fine-tuned one (2 at batch 1, 16 at batch 8). On some CPUs fp32
`F.linear` with a few rows leaves BLAS's fast kernels: on a 2-core AMD EPYC it cost ~1.6x the one-row call at 2
rows, and `weight @ x.T` (the same product, the other operand order) ran 2-4 rows at a fraction of it (0.15-0.4x
over SmolLM2's layer shapes, still 0.85x at 16 rows); on a Xeon with AVX-512/AMX the same route made TaD/ft worse,
not better. So the route is not fixed: when a pair is first used on the CPU, both are timed on the model's own
Linear shapes at 2, 4, 8, 16 and 32 rows, round-robin, and `weight @ x.T` is kept for the counts where it wins
clearly (a call's row count is judged by the next measured count up). The measurement and the choice are kept in
`pair.info["few_rows_route"]` and printed by the benchmarks.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

ROUTES = ("linear", "mm")
ROWS = (2, 4, 8, 16, 32)  # the row counts measured; a paired step has 2 rows per prompt
MARGIN = 0.9  # `mm` is taken only when it costs < 90% of `linear` (a tie keeps transformers' own path)


@dataclass(frozen=True)
class RouteChoice:
    """The chosen route and what was measured: `measured` holds (rows, F.linear ms, weight @ x.T ms) for one pass
    over the sampled layers, median of rounds. `rows`: the measured counts where `weight @ x.T` is taken."""

    route: str
    rows: tuple[int, ...] = (2, 4)
    measured: tuple[tuple[int, float, float], ...] = ()
    reason: str = ""

    def takes(self, rows: int) -> bool:
        """Whether a call with `rows` rows takes the route: the next measured count up won."""
        if self.route != "mm" or rows < 2:
            return False
        counts = sorted(n for n, _, _ in self.measured) or ROWS
        return next((n for n in counts if n >= rows), None) in self.rows

    def describe(self) -> str:
        if not self.measured:
            return f"{self.route} ({self.reason})"
        where = f" at {', '.join(map(str, self.rows))} rows" if self.route == "mm" else ""
        per = "; ".join(f"{r} rows {lin:.2f} / {mm:.2f}" for r, lin, mm in self.measured)
        return (f"{self.route}{where} (measured on this CPU, ms per pass over the sampled layers, F.linear / "
                f"weight @ x.T: {per})")


def _sample_layers(model: Any, limit: int = 4) -> list[torch.nn.Linear]:
    """The model's fp32 Linear layers, one per weight shape, largest first (the ones a decode step is made of)."""
    by_shape: dict[tuple[int, ...], torch.nn.Linear] = {}
    for m in model.modules():
        if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu":
            by_shape.setdefault(tuple(m.weight.shape), m)
    return sorted(by_shape.values(), key=lambda m: -m.weight.numel())[:limit]


def measure(model: Any, rows: tuple[int, ...] = ROWS, rounds: int = 5) -> RouteChoice:
    """Time `F.linear` and `weight @ x.T` at each row count on the model's own layer shapes, round-robin (5
    rounds over its 4 largest layer shapes per count: about 1 s for SmolLM2-135M on a quiet 2-core CPU)."""
    layers = _sample_layers(model)
    if not layers:
        return RouteChoice("linear", (), reason="no fp32 CPU Linear layers")
    measured = []
    with torch.no_grad():
        for n in rows:
            xs = [torch.randn(n, m.in_features) for m in layers]

            def linear() -> None:
                for m, x in zip(layers, xs):
                    torch.nn.functional.linear(x, m.weight, m.bias)

            def mm() -> None:
                for m, x in zip(layers, xs):
                    torch.mm(m.weight, x.t()).t()

            times: dict[str, list[float]] = {"linear": [], "mm": []}
            linear(), mm()  # warm caches and kernels
            for _ in range(rounds):
                for name, fn in (("linear", linear), ("mm", mm)):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1000)
            measured.append((n, statistics.median(times["linear"]), statistics.median(times["mm"])))
    wins = tuple(n for n, lin, m in measured if m < MARGIN * lin)
    return RouteChoice("mm" if wins else "linear", wins, tuple(measured))
