"""`torch.compile` with an eager fallback, shared by the compiled decoding path's two compiled functions (the paired
forward of `tad_core.decode_path` and the strategy step of `tad_core.fused_step`).

Compiled with `fullgraph=True`: a graph break (an operation torch cannot trace) is a failure, not a silent run of
eager fragments between small graphs. A compile or capture failure surfaces while the graph is traced or compiled,
before the function writes anything (a cache, an output), so the eager call that follows continues the same
sequence. The first failure is recorded and every later call is eager: a worker does not pay for the failed
compile at every step.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_map_only

log = logging.getLogger(__name__)

# Graphs are specialised to shapes (`dynamic=False`): a worker meets a few batch sizes times a few static-cache
# lengths (`tad_core.generation.static_length`). Past torch's default of 8 compiled versions per function, the
# call would fail (`fullgraph=True`) and the process would step eagerly from then on.
RECOMPILE_LIMIT = 64


class CompiledOrEager:
    """Calls `fn` compiled (on CUDA with `mode="reduce-overhead"`: captured CUDA graphs, whose tensor outputs are
    copied out of the graph's pool), or eagerly once the compiled call has failed. `calls` counts the compiled
    calls and `failed` says why it stopped (tests and benchmarks read both); `on_fail(why)` lets the owner report
    the fallback."""

    def __init__(self, fn: Callable[..., Any], what: str, device: torch.device,
                 on_fail: Callable[[str], None] | None = None, copy_outputs: bool | None = None) -> None:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self.eager = fn
        self.what = what
        graphs = device.type == "cuda"
        self.fn = torch.compile(fn, mode="reduce-overhead" if graphs else None, dynamic=False, fullgraph=True)
        # A captured graph's outputs live in its memory pool: cudagraph trees start a new generation at the next
        # call of any compiled function (the strategy step after the forward, the next step's forward) and that
        # call may overwrite them, or refuse access to them ("accessing tensor output of CUDAGraphs that has been
        # overwritten by a subsequent run"). The callers read the forward's logits in the strategy step, so the
        # tensors are copied out (a step's logits: one small copy) where graphs are captured.
        self.copy_outputs = graphs if copy_outputs is None else copy_outputs
        self.on_fail = on_fail
        self.calls = 0
        self.failed: str | None = None

    def __call__(self, *args: Any, **kw: Any) -> Any:
        if self.failed is None:
            try:
                out = self.fn(*args, **kw)
                self.calls += 1
                return tree_map_only(torch.Tensor, torch.Tensor.clone, out) if self.copy_outputs else out
            except Exception as e:  # noqa: BLE001 - any compile / capture failure: the same function, eagerly
                first = str(e).splitlines()[0][:200] if str(e) else ""
                self.failed = f"{type(e).__name__}: {first}"
                log.warning("%s failed to compile, running eagerly: %s", self.what, self.failed)
                if self.on_fail is not None:
                    self.on_fail(self.failed)
        return self.eager(*args, **kw)
