"""The compile-or-eager wrapper: a real compile failure (an op whose fake kernel raises, as an op that cannot be
captured does) falls back to the same function eagerly, is recorded and reported once, and is not retried."""
from __future__ import annotations

import torch

from tad_core.compiled import CompiledOrEager


@torch.library.custom_op("tadtest::uncapturable", mutates_args=())
def _uncapturable(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_uncapturable.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("this op cannot be traced")


def test_a_function_that_compiles_runs_compiled() -> None:
    step = CompiledOrEager(lambda x: torch.softmax(x, -1).argmax(-1), "a step", torch.device("cpu"))
    x = torch.randn(3, 7)
    for _ in range(3):
        assert torch.equal(step(x), x.argmax(-1))
    assert step.failed is None and step.calls == 3


def test_a_compile_failure_falls_back_to_eager_once() -> None:
    eager_calls: list[int] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            eager_calls.append(1)
        return _uncapturable(x + 1)

    reported: list[str] = []
    step = CompiledOrEager(fn, "a step", torch.device("cpu"), on_fail=reported.append)
    x = torch.ones(4)
    for _ in range(3):
        assert torch.equal(step(x), torch.full((4,), 4.0))  # the eager result, every time
    assert step.calls == 0
    assert step.failed is not None and "fake tensor" in step.failed
    assert reported == [step.failed]  # reported once, not at every step
    assert len(eager_calls) == 3  # one eager call per step: the compiled function is not retried


def test_a_graph_break_is_a_failure_not_silent_eager_fragments() -> None:
    """A Python branch on a tensor's value cannot be traced: with `fullgraph=True` the compile fails and the
    wrapper says so, instead of torch running the function as eager pieces between small graphs."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 0:  # data-dependent control flow: a graph break
            return x * 2
        return x

    step = CompiledOrEager(fn, "a step", torch.device("cpu"))
    assert torch.equal(step(torch.ones(3)), torch.full((3,), 2.0))
    assert step.calls == 0 and step.failed is not None


def test_more_shapes_than_the_recompile_limit_is_reported() -> None:
    import torch._dynamo.config as dynamo_config

    step = CompiledOrEager(lambda x: x.softmax(-1), "a step", torch.device("cpu"))
    assert dynamo_config.recompile_limit >= 64  # raised for the compiled path's few shapes
    with dynamo_config.patch(recompile_limit=2):
        for n in range(1, 5):
            x = torch.randn(n, 3)
            assert torch.allclose(step(x), x.softmax(-1))
    assert step.calls == 2 and "RecompileLimit" in (step.failed or "")


def test_outputs_are_copied_out_where_graphs_are_captured() -> None:
    """On CUDA a captured graph's outputs are overwritten by later graph calls, so the wrapper copies them out
    (`copy_outputs`, on by default only on CUDA); a model output keeps its class and its non-tensor fields."""
    from transformers import DynamicCache
    from transformers.modeling_outputs import CausalLMOutputWithPast

    cache = DynamicCache()
    kept: list[torch.Tensor] = []

    def forward(x: torch.Tensor) -> CausalLMOutputWithPast:
        logits = x * 2
        kept.append(logits)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache, hidden_states=(x + 1, x - 1))

    assert CompiledOrEager(forward, "a forward", torch.device("cpu")).copy_outputs is False
    assert CompiledOrEager(forward, "a forward", torch.device("cuda")).copy_outputs is True  # compiles lazily
    step = CompiledOrEager(torch.compiler.disable(forward), "a forward", torch.device("cpu"), copy_outputs=True)
    x = torch.randn(2, 5)
    out = step(x)
    assert step.failed is None and step.calls == 1
    assert type(out) is CausalLMOutputWithPast and out.past_key_values is cache
    assert torch.equal(out.logits, x * 2) and torch.equal(out.hidden_states[1], x - 1)
    assert out.logits.data_ptr() != kept[0].data_ptr()  # a copy, not the function's own tensor
