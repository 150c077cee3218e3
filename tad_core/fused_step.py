"""Every strategy of a generation batch as one function of the step's logits, for the compiled decoding path.

The eager loop of `tad_core.generation` steps strategy by strategy over the rows still decoding: a few small
kernels per strategy, one device sync per strategy, and shapes that shrink as rows finish. On a GPU that is launch
overhead, and a shape that changes is a graph that cannot be replayed. Here every row is computed at every step
(finished rows too: their tokens are ignored), with each strategy's rows fixed when the batch is built, so one
compiled function returns the next token of every row plus the paired rows' flips, knowledge-vector statistics
and top promoted / demoted tokens, and the host reads them once per step. On CUDA it is compiled with
`mode="reduce-overhead"` (captured as a CUDA graph, like the paired forward of `tad_core.decode_path`).

Greedy decoding only, and only strategies that read nothing but the two logit tensors (no premature layers, no
token history): the eager loop serves the others. Outputs equal the eager loop's (tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from tad_core import kvstats
from tad_core.compiled import CompiledOrEager
from tad_core.strategies import Step, Strategy


def unfusable(strategies: Sequence[Strategy], temperature: float) -> str | None:
    """Why these strategies cannot be stepped as one function (None: they can)."""
    if temperature != 0:
        return "sampling draws from a generator outside the graph"
    for s in strategies:
        if s.needs_hidden or s.needs_history:
            return f"strategy {s.name!r} reads premature layers or the token history"
    return None


@dataclass
class StepOut:
    """One step on the host: the next token of every row, and per paired row (in `FusedStep.paired_rows` order)
    `[flip, *STEP_STATS]` and its top-k promoted / demoted (ids, values)."""

    tokens: list[int]
    stats: list[list[float]]
    top: list[tuple[list[int], list[float], list[int], list[float]]]


class FusedStep:
    """The strategies of one batch, rows fixed: `groups[g] = (strategy, rows)`; `paired[g]`: whether group g's rows
    have both sides (their kv statistics are kept)."""

    def __init__(self, groups: Sequence[tuple[Strategy, Sequence[int]]], paired: Sequence[bool], topk: int,
                 device: torch.device) -> None:
        self.groups = [(s, torch.tensor(list(rows), dtype=torch.long, device=device)) for s, rows in groups]
        self.paired = list(paired)
        self.paired_rows = [r for (_, rows), p in zip(groups, paired) if p for r in rows]
        self.n = sum(len(rows) for _, rows in groups)
        self.topk = topk
        self.compiled = CompiledOrEager(self._step, "the strategy step", device)

    def _step(self, z_b: torch.Tensor | None, z_f: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        ref = z_f if z_f is not None else z_b
        assert ref is not None
        nxt = torch.zeros(self.n, dtype=torch.long, device=ref.device)
        stats, up_i, up_v, dn_i, dn_v = [], [], [], [], []
        for (strat, rows), paired in zip(self.groups, self.paired):
            step = Step(None if z_b is None else z_b[rows], None if z_f is None else z_f[rows])
            picked = strat.greedy(step)
            nxt[rows] = picked
            if paired:
                st = kvstats.step_stats(step)
                flip = (picked != step.argmax_f).float()
                stats.append(torch.stack([flip, *st.values()], dim=-1))
                if self.topk:
                    k = min(self.topk, step.kv.shape[-1])
                    up, down = torch.topk(step.kv, k), torch.topk(-step.kv, k)
                    up_i.append(up.indices), up_v.append(up.values), dn_i.append(down.indices)
                    dn_v.append(-down.values)
        if not stats:
            return (nxt,)
        out = [nxt, torch.cat(stats)]
        if self.topk:
            out += [torch.cat(up_i), torch.cat(up_v), torch.cat(dn_i), torch.cat(dn_v)]
        return tuple(out)

    def __call__(self, z_b: torch.Tensor | None, z_f: torch.Tensor | None) -> StepOut:
        out = self.compiled(z_b, z_f)
        host: list[Any] = [t.tolist() for t in out]  # the step's one read from the device (in a few copies)
        tokens = host[0]
        stats = host[1] if len(host) > 1 else []
        top = list(zip(*host[2:6])) if len(host) > 2 else [([], [], [], [])] * len(stats)
        return StepOut(tokens, stats, top)
