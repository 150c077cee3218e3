"""Beam search for any strategy: `ft` equals transformers' beam search, TaD equals a naive uncached reference,
one beam is greedy decoding, and bad arguments are refused."""
from __future__ import annotations

from typing import Sequence

import pytest
import torch

from tad_core.beam import beam_search, strategy_log_scores
from tad_core.early_exit import output_head, step_extras
from tad_core.generation import GenConfig, Generated, _eos_ids, generate_texts
from tad_core.models import PairedModel, load_pair
from tad_core.strategies import Step, Strategy, StrategySpec, build, canonical, parse_strategy_arg

PROMPTS = ["Hello there, how are", "The capital of France is a city called", "1+1="]
MAX_NEW = 8


def _add_eos(pair: PairedModel, monkeypatch: pytest.MonkeyPatch, tokens: Sequence[int]) -> None:
    """Make tokens the random model likes EOS tokens too (for both transformers' generate and ours)."""
    monkeypatch.setattr(pair.model.generation_config, "eos_token_id", sorted({*_eos_ids(pair), *tokens}))


@pytest.fixture
def extra_eos(tiny_pair, monkeypatch) -> int:
    """One more EOS, so hypotheses end early and the finished-hypothesis logic runs.

    The token is the second greedy token of the first prompt: beams reach it within a few steps.
    """
    greedy = generate_texts(tiny_pair, PROMPTS[:1], [build(StrategySpec("ft"))], GenConfig(max_new_tokens=3))
    token = greedy[0][0].token_ids[1]
    _add_eos(tiny_pair, monkeypatch, [token])
    return token


@pytest.fixture
def eos_at_the_top(tiny_pair, monkeypatch) -> list[int]:
    """The first prompt's three likeliest first tokens become EOS: more candidates end than there are beams, so
    the open beams must come from below the top K (transformers keeps (1 + #eos) * K candidates for that)."""
    with torch.no_grad():
        ids = torch.tensor([tiny_pair.tokenizer(PROMPTS[0])["input_ids"]])
        tokens = torch.topk(tiny_pair.model(input_ids=ids).logits[0, -1], 3).indices.tolist()
    _add_eos(tiny_pair, monkeypatch, tokens)
    return tokens


def _as_full(g: Generated, continuation: Sequence[int], eos: set[int]) -> list[int]:
    """Our tokens with the EOS that ended them (ours drops it, as greedy decoding does), taken from `continuation`."""
    if g.finish_reason != "eos":
        return list(g.token_ids)
    end = continuation[len(g.token_ids)]
    assert end in eos
    return list(g.token_ids) + [end]


def _hf_beam(pair: PairedModel, prompts: Sequence[str], num_beams: int, **kw) -> list[list[int]]:
    tok = pair.tokenizer
    enc = tok(list(prompts), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = pair.model.generate(**enc, max_new_tokens=MAX_NEW, num_beams=num_beams, do_sample=False,
                                  pad_token_id=tok.pad_token_id, **kw)
    width = enc["input_ids"].shape[1]
    return [row[width:].tolist() for row in out]


@pytest.mark.parametrize("num_beams,early_stopping,length_penalty",
                         [(2, False, 1.0), (4, False, 1.0), (4, True, 1.0), (3, "never", 2.0), (4, False, -0.5)])
@pytest.mark.parametrize("eos", [None, "extra_eos", "eos_at_the_top"])
def test_ft_equals_transformers_beam_search(request, tiny_pair, num_beams, early_stopping, length_penalty, eos):
    if eos:
        request.getfixturevalue(eos)
    tok = tiny_pair.tokenizer
    assert len({len(tok(p)["input_ids"]) for p in PROMPTS}) > 1  # unequal lengths: left padding is exercised
    mine = beam_search(tiny_pair, PROMPTS, build(StrategySpec("ft")), num_beams, MAX_NEW,
                       length_penalty=length_penalty, early_stopping=early_stopping)
    ref = _hf_beam(tiny_pair, PROMPTS, num_beams, early_stopping=early_stopping, length_penalty=length_penalty)
    eos_ids = _eos_ids(tiny_pair)
    for g, row in zip(mine, ref):
        full = _as_full(g, row, eos_ids)
        assert row[: len(full)] == full
        assert g.finish_reason == "eos" or len(full) == MAX_NEW
    if eos and length_penalty <= 1.0:  # a penalty > 1 favours the longer, unfinished hypotheses
        assert any(g.finish_reason == "eos" for g in mine)  # the finished-hypothesis path did run


@pytest.mark.parametrize("adapter", ["tiny_prefix_dir", "tiny_ia3_dir"])
def test_ft_equals_transformers_on_two_pass_adapters(request, tiny_model_dir, adapter):
    pair = load_pair(str(tiny_model_dir), adapter=request.getfixturevalue(adapter))
    assert pair.path == "two_pass"
    mine = beam_search(pair, PROMPTS, build(StrategySpec("ft")), 3, MAX_NEW)
    ref = _hf_beam(pair, PROMPTS, 3)
    eos = _eos_ids(pair)
    for g, row in zip(mine, ref):
        full = _as_full(g, row, eos)
        assert row[: len(full)] == full


def _naive_log_scores(pair: PairedModel, strategy: Strategy, ids: list[int]) -> torch.Tensor:
    """The strategy's log-scores for the token after `ids`, from full uncached base and fine-tuned forwards."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = pair.model(input_ids=x, output_hidden_states=strategy.needs_hidden, logits_to_keep=1)
        with pair.model.disable_adapter():
            z_b = pair.model(input_ids=x, logits_to_keep=1).logits[:, -1]
    extras: dict = {}
    if strategy.needs_hidden:
        head = output_head(pair.model)
        layers = strategy.hidden_layers(head.num_layers, head.tied_embeddings)
        extras = step_extras(head, {layer: out.hidden_states[layer][:, -1] for layer in layers})
    if strategy.needs_history:
        extras["seen_tokens"] = torch.zeros((1, z_b.shape[-1]), dtype=torch.bool)
        extras["seen_tokens"][0, ids] = True
    return torch.log_softmax(strategy.scores_from(Step(z_b, out.logits[:, -1], extras))[0], dim=-1)


def _naive_beam(pair: PairedModel, prompt: str, strategy: Strategy, num_beams: int, max_new: int,
                stop: tuple[str, ...] = (), length_penalty: float = 1.0) -> list[int]:
    """Slow reference: full uncached forwards of every hypothesis at every step, plain lists, one prompt.

    Keep the best 2K (more with several EOS) candidates; one that ends (EOS, stop string, length) and ranks in
    the top K is a finished hypothesis scored sum / len**length_penalty; the best K open ones continue; stop once
    K finished and the best open beam at its current length cannot beat the worst finished one (transformers'
    default `early_stopping=False`).
    """
    tok = pair.tokenizer
    eos = _eos_ids(pair)
    keep = max(2, 1 + len(eos)) * num_beams
    prompt_ids = tok(prompt)["input_ids"]
    running: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[float, list[int]]] = []
    for length in range(1, max_new + 1):
        cands: list[tuple[float, list[int]]] = []
        for toks, score in running:
            vals, idx = torch.topk(_naive_log_scores(pair, strategy, prompt_ids + toks), keep)
            cands += [(score + v, toks + [t]) for v, t in zip(vals.tolist(), idx.tolist())]
        cands = sorted(cands, key=lambda c: -c[0])[:keep]
        running = []
        for rank, (score, toks) in enumerate(cands):
            text = tok.decode(toks, skip_special_tokens=True)
            ends = toks[-1] in eos or length == max_new or any(s in text for s in stop)
            if ends and rank < num_beams:
                finished.append((score / length ** length_penalty, toks))
            elif not ends and len(running) < num_beams:
                running.append((toks, score))
        finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
        if running and len(finished) == num_beams and running[0][1] / length ** length_penalty <= finished[-1][0]:
            break
    return finished[0][1]


def _check_against_naive(pair: PairedModel, strategy: Strategy, num_beams: int,
                         stop: tuple[str, ...] = ()) -> list[Generated]:
    mine = beam_search(pair, PROMPTS, strategy, num_beams, MAX_NEW, stop=stop)
    eos_ids = _eos_ids(pair)
    for prompt, g in zip(PROMPTS, mine):
        ref = _naive_beam(pair, prompt, strategy, num_beams, MAX_NEW, stop=stop)
        assert _as_full(g, ref, eos_ids) == ref
    return mine


@pytest.mark.parametrize("num_beams,eos", [(2, None), (4, "extra_eos"), (3, "eos_at_the_top")])
def test_tad_equals_naive_reference(request, tiny_pair, num_beams, eos):
    if eos:
        request.getfixturevalue(eos)
    strategy = build(parse_strategy_arg("tad:alpha=1")[0])
    mine = _check_against_naive(tiny_pair, strategy, num_beams)
    greedy = generate_texts(tiny_pair, PROMPTS, [strategy], GenConfig(max_new_tokens=MAX_NEW))
    assert any(g.token_ids != gr[0].token_ids for g, gr in zip(mine, greedy))  # beams do change outputs


def test_tad_with_stop_strings_equals_naive_reference(tiny_pair):
    strategy = build(parse_strategy_arg("tad:alpha=1")[0])
    free = beam_search(tiny_pair, PROMPTS, strategy, 3, MAX_NEW)
    stop = (free[1].text[4:7],)
    mine = _check_against_naive(tiny_pair, strategy, 3, stop=stop)
    assert any(g.finish_reason == "stop" for g in mine)
    assert all(not any(s in g.text for s in stop) for g in mine)


@pytest.mark.parametrize("spec", ["contrastive", "dola"])
def test_other_strategies_equal_naive_reference(tiny_pair, spec):
    _check_against_naive(tiny_pair, build(parse_strategy_arg(spec)[0]), 3)


@pytest.mark.parametrize("spec", ["ft", "base", "tad:alpha=1", "tad:alpha=2,beta=0.1", "contrastive", "dola"])
def test_one_beam_is_greedy(tiny_pair, spec):
    strategy = build(parse_strategy_arg(spec)[0])
    greedy = generate_texts(tiny_pair, PROMPTS, [strategy], GenConfig(max_new_tokens=MAX_NEW))
    mine = beam_search(tiny_pair, PROMPTS, strategy, 1, MAX_NEW)
    for g, gr in zip(mine, greedy):
        assert (g.token_ids, g.text, g.finish_reason) == (gr[0].token_ids, gr[0].text, gr[0].finish_reason)


def test_one_beam_is_greedy_with_eos_and_stop(tiny_pair, extra_eos):
    strategy = build(StrategySpec("tad", {"alpha": 1.0}))
    plain = generate_texts(tiny_pair, PROMPTS, [strategy], GenConfig(max_new_tokens=MAX_NEW))
    stop = (plain[1][0].text[3:6],)
    greedy = generate_texts(tiny_pair, PROMPTS, [strategy], GenConfig(max_new_tokens=MAX_NEW, stop=stop))
    mine = beam_search(tiny_pair, PROMPTS, strategy, 1, MAX_NEW, stop=stop)
    assert {gr[0].finish_reason for gr in greedy} >= {"stop"}
    for g, gr in zip(mine, greedy):
        assert (g.token_ids, g.text, g.finish_reason) == (gr[0].token_ids, gr[0].text, gr[0].finish_reason)


def test_ignore_eos_decodes_max_new_tokens(tiny_pair, extra_eos):
    out = beam_search(tiny_pair, PROMPTS, build(StrategySpec("ft")), 2, MAX_NEW, ignore_eos=True)
    assert all(len(g.token_ids) == MAX_NEW and g.finish_reason == "length" for g in out)


def test_ft_scores_are_the_model_log_probs_bit_for_bit():
    z = torch.randn(4, 1000) * 5
    ft = build(StrategySpec("ft"))
    assert torch.equal(strategy_log_scores(ft, ft(None, z)), torch.log_softmax(z, -1))
    tad = build(StrategySpec("tad", {"alpha": 1.0, "beta": 0.1}))
    s = strategy_log_scores(tad, tad(z.flip(0), z))
    assert torch.allclose(torch.logsumexp(s, -1), torch.zeros(4), atol=1e-5)
    assert torch.isneginf(s).any()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_num_beams_is_refused(tiny_pair, bad):
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(tiny_pair, PROMPTS, build(StrategySpec("ft")), bad, MAX_NEW)


def test_bad_early_stopping_is_refused(tiny_pair):
    with pytest.raises(ValueError, match="early_stopping"):
        beam_search(tiny_pair, PROMPTS, build(StrategySpec("ft")), 2, MAX_NEW, early_stopping="sometimes")


def test_evaluate_batch_with_num_beams_uses_beam_search(tiny_pair):
    """`EvalConfig(num_beams=K)` routes every strategy of a generation batch through beam search."""
    from tad_core.evaluate import EvalConfig, evaluate_batch
    from tad_core.samples import Sample
    from tad_core.strategies import StrategySpec

    pair = tiny_pair
    samples = [Sample("a", "one two", reference="x"), Sample("b", "three", reference="y", stop=("\n",))]
    specs = [StrategySpec("ft"), StrategySpec("tad", {"alpha": 1.0})]
    beams = evaluate_batch(pair, samples, specs, EvalConfig(max_new_tokens=4, num_beams=3))
    for res, sample in zip(beams, samples):
        for spec in specs:
            strat = build(spec)
            (ref,) = beam_search(pair, [sample.prompt], strat, num_beams=3, max_new_tokens=4, stop=sample.stop)
            assert res.outcomes[canonical(spec).key].output == ref.text
    with pytest.raises(ValueError, match="num_beams"):
        EvalConfig(num_beams=0)
