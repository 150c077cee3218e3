"""Each strategy equals a direct transcription of its formula (docs/strategies.md, "Strategies") on random logits."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tad_core.strategies import REGISTRY, StrategySpec, build, describe_strategies, parse_strategy_arg

torch.manual_seed(0)
V = 97
ZB = torch.randn(6, V) * 3
ZF = torch.randn(6, V) * 3


def _head(zf: torch.Tensor, a: float) -> torch.Tensor:
    p = torch.softmax(zf, -1)
    return p >= a * p.max(-1, keepdim=True).values


def _tad_ref(zb, zf, alpha, beta):
    pf, pb = torch.softmax(zf.double(), -1), torch.softmax(zb.double(), -1)
    q = (pf + alpha * (pf - pb)).clamp(min=0)
    s = torch.log(q / q.sum(-1, keepdim=True))
    if beta > 0:
        s = s.masked_fill(~_head(zf.double(), beta), -math.inf)
    return s


@pytest.mark.parametrize("alpha,beta", [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0), (4.0, 0.0), (1.0, 0.1), (2.0, 0.5)])
def test_tad_matches_formula(alpha, beta):
    s = build(StrategySpec("tad", {"alpha": alpha, "beta": beta}))(ZB, ZF)
    ref = _tad_ref(ZB, ZF, alpha, beta)
    assert torch.equal(torch.isinf(s), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(s[fin].double(), ref[fin], atol=1e-4)
    assert not torch.isnan(s).any()
    assert (torch.isfinite(s).sum(-1) >= 1).all()  # at least one token survives clamping and masking
    assert not torch.isposinf(s).any()


def test_tad_alpha_zero_is_ft_exactly():
    s = build(StrategySpec("tad", {"alpha": 0.0}))(ZB, ZF)
    assert torch.equal(s, build(StrategySpec("ft"))(ZB, ZF))


def test_tad_clamps_negative_mass():
    # a token the fine-tuning demoted strongly gets negative p_f + alpha*kv: it must be excluded (-inf)
    zb = torch.tensor([[5.0, 0.0, 0.0]])
    zf = torch.tensor([[0.0, 5.0, 0.0]])
    s = build(StrategySpec("tad", {"alpha": 1.0}))(zb, zf)
    assert torch.isneginf(s[0, 0])
    assert torch.isclose(torch.softmax(s, -1).sum(), torch.tensor(1.0))


def test_ft_and_base():
    assert torch.allclose(build(StrategySpec("ft"))(ZB, ZF), torch.log_softmax(ZF, -1))
    assert torch.allclose(build(StrategySpec("base"))(ZB, ZF), torch.log_softmax(ZB, -1))


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.1), (1.0, 0.0), (2.0, 0.3)])
def test_tad_log_matches_formula(alpha, beta):
    lpf, lpb = torch.log_softmax(ZF, -1), torch.log_softmax(ZB, -1)
    ref = lpf + alpha * (lpf - lpb)
    if beta > 0:
        ref = ref.masked_fill(~_head(ZF, beta), -math.inf)
    s = build(StrategySpec("tad_log", {"alpha": alpha, "beta": beta}))(ZB, ZF)
    assert torch.equal(torch.isinf(s), torch.isinf(ref))
    assert torch.allclose(s[torch.isfinite(ref)], ref[torch.isfinite(ref)], atol=1e-5)


@pytest.mark.parametrize("beta,tau", [(0.1, 1.0), (0.5, 0.5), (0.0, 2.0)])
def test_contrastive_matches_formula(beta, tau):
    lpf, lpb = torch.log_softmax(ZF, -1), torch.log_softmax(ZB, -1)
    ref = lpf - lpb / tau
    if beta > 0:
        ref = ref.masked_fill(~_head(ZF, beta), -math.inf)
    s = build(StrategySpec("contrastive", {"beta": beta, "tau": tau}))(ZB, ZF)
    assert torch.equal(torch.isinf(s), torch.isinf(ref))
    assert torch.allclose(s[torch.isfinite(ref)], ref[torch.isfinite(ref)], atol=1e-5)


def test_head_mask_keeps_argmax_even_at_beta_one():
    s = build(StrategySpec("tad_log", {"beta": 1.0}))(ZB, ZF)
    assert torch.equal(s.argmax(-1), ZF.argmax(-1))
    assert (torch.isfinite(s).sum(-1) == 1).all()


def test_no_in_place_edits():
    zb, zf = ZB.clone(), ZF.clone()
    for name in ("ft", "base", "tad", "tad_log", "contrastive"):
        build(StrategySpec(name))(zb, zf)
    assert torch.equal(zb, ZB) and torch.equal(zf, ZF)


@pytest.mark.parametrize("spec,param", [
    ({"name": "tad", "params": {"alpha": -1}}, "alpha"),
    ({"name": "tad", "params": {"alpha": float("nan")}}, "alpha"),
    ({"name": "tad", "params": {"alpha": "big"}}, "alpha"),
    ({"name": "tad", "params": {"alpha": True}}, "alpha"),
    ({"name": "tad", "params": {"beta": 1.5}}, "beta"),
    ({"name": "contrastive", "params": {"tau": 0}}, "tau"),
    ({"name": "tad", "params": {"gamma": 1}}, "gamma"),
])
def test_bad_parameters_name_the_parameter(spec, param):
    with pytest.raises(ValueError, match=param):
        StrategySpec.from_json(spec)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        parse_strategy_arg("nope:alpha=1")


def test_spec_json_round_trip():
    spec = StrategySpec.from_json({"name": "tad", "params": {"alpha": 1}})
    again = StrategySpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert again == spec and again.key == "tad(alpha=1.0,beta=0.0)"


def test_parse_sweep_and_grid():
    keys = [s.key for s in parse_strategy_arg("tad:alpha=0.5,1,2,beta=0,0.1")]
    assert len(keys) == 6 and "tad(alpha=2.0,beta=0.1)" in keys
    assert [s.key for s in parse_strategy_arg("ft")] == ["ft"]


def test_every_registered_strategy_is_described():
    names = {d["name"] for d in describe_strategies()}
    assert names == set(REGISTRY) and {"ft", "base", "tad", "tad_log", "contrastive"} <= names


@pytest.mark.parametrize("arg", ["ft", "base", "tad:alpha=0,0.5,1,4", "tad:alpha=1,2,beta=0.1,0.5", "tad_log",
                                 "contrastive", "svdecode:mu=0.5"])
def test_target_scores_equal_the_scores_log_softmax_at_the_targets(arg):
    """MC scoring reads `target_scores`; the overrides that skip the full-vocabulary scores (ft, base, TaD in
    probability space) give the default's log-probs at the targets (-inf where the default is -inf) and argmax.
    Targets include tokens TaD's clamp or head mask excludes."""
    from tad_core.strategies import Step, Strategy

    from_default = Strategy.target_scores
    step_logits = (torch.randn(64, V) * 4, torch.randn(64, V) * 4)
    lp_f = torch.log_softmax(step_logits[1], -1)
    targets = torch.cat([torch.randint(0, V, (32,)), lp_f[32:].argmin(-1)])  # the least likely: often excluded
    for spec in parse_strategy_arg(arg):
        strat = build(spec)
        lp, top = strat.target_scores(Step(*step_logits), targets)
        ref_lp, ref_top = from_default(strat, Step(*step_logits), targets)
        assert torch.equal(torch.isinf(lp), torch.isinf(ref_lp)), spec.key
        fin = torch.isfinite(ref_lp)
        assert torch.allclose(lp[fin], ref_lp[fin], atol=1e-5, rtol=1e-5), spec.key
        assert torch.equal(top, ref_top), spec.key
    if arg.startswith("tad:alpha=1,2"):
        assert torch.isinf(ref_lp).any()  # the excluded case was exercised


@pytest.mark.parametrize("arg", ["ft", "base", "tad:alpha=0,0.5,1,4", "tad:alpha=0,1,2,beta=0.1,0.5", "tad_log",
                                 "contrastive", "svdecode:mu=0.5"])
def test_greedy_is_the_argmax_of_the_scores(arg):
    """Greedy generation reads `greedy`; the overrides (ft's memoised argmax, TaD's argmax of q without the log)
    pick what the argmax of `scores_from` picks, also where TaD's head mask or clamp excludes p_f's favourites."""
    from tad_core.strategies import Step, Strategy

    step_logits = (torch.randn(64, V) * 4, torch.randn(64, V) * 4)
    for spec in parse_strategy_arg(arg):
        strat = build(spec)
        assert torch.equal(strat.greedy(Step(*step_logits)), Strategy.greedy(strat, Step(*step_logits))), spec.key
    z_f = step_logits[1]
    z_b = z_f + 10 * torch.nn.functional.one_hot(z_f.argmax(-1), V)  # the base favours ft's top token even more
    for spec in parse_strategy_arg("tad:alpha=1,4,beta=0,0.1"):  # so TaD moves away from it, within the head
        strat = build(spec)
        picked = strat.greedy(Step(z_b, z_f))
        none_left = ~strat.scores_from(Step(z_b, z_f)).isfinite().any(-1)  # the clip emptied the head: ft's token
        expected = torch.where(none_left, z_f.argmax(-1), Strategy.greedy(strat, Step(z_b, z_f)))
        assert torch.equal(picked, expected), spec.key
        assert (picked != z_f.argmax(-1)).any(), spec.key


def test_a_step_with_no_candidate_takes_fts_token():
    """TaD with a head (beta > 0) can clip every head token to 0 (docs/strategies.md, edge cases): every score is
    -inf. Greedy then takes ft's token (the argmax of all -inf was token 0, a token neither model proposed)."""
    from tad_core.strategies import Step

    p_f, p_b = torch.tensor([[0.25, 0.40, 0.35]]), torch.tensor([[0.05, 0.90, 0.05]])
    step = Step(p_b.log(), p_f.log())
    tad = build(parse_strategy_arg("tad:alpha=1,beta=0.9")[0])
    assert torch.isneginf(tad.scores_from(step)).all()
    assert tad.greedy(step).tolist() == [1]


def test_minus_inf_logits_give_no_nan():
    """A token at -inf in both models (a masked vocabulary slot) has probability 0 and no NaN score or statistic:
    `lp_f - lp_b` was -inf - -inf = NaN, which argmax picked in tad_log and contrastive."""
    from tad_core import kvstats
    from tad_core.strategies import Step

    z_f, z_b = torch.randn(3, V), torch.randn(3, V)
    z_f[:, 5] = z_b[:, 5] = float("-inf")
    step = Step(z_b, z_f)
    for arg in ("ft", "base", "tad:alpha=1,beta=0", "tad_log:beta=0", "contrastive:beta=0", "svdecode:mu=0.5"):
        strat = build(parse_strategy_arg(arg)[0])
        s = strat.scores_from(Step(z_b, z_f))
        assert not s.isnan().any(), arg
        assert (strat.greedy(Step(z_b, z_f)) != 5).all() and (s.argmax(-1) != 5).all(), arg
    assert step.p_f[:, 5].eq(0).all()
    for name, v in kvstats.step_stats(step).items():
        assert v.isfinite().all(), name
