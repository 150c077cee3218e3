"""SVDecode and DoLa against direct transcriptions of their formulas; calibration; end to end on the tiny pair."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tad_core import calibration as cal
from tad_core.early_exit import OutputHead, output_head, step_extras
from tad_core.evaluate import EvalConfig, evaluate, evaluate_batch
from tad_core.generation import GenConfig, generate_texts
from tad_core.samples import Sample
from tad_core.scoring import build_units, score_mc, teacher_force
from tad_core.strategies import (
    Step,
    StrategySpec,
    build,
    dola_candidate_layers,
    parse_strategy_arg,
)

V = 40
PROMPTS = ["Hello there, how are", "The capital of France is a city called", "1+1="]
MC = [
    Sample("a", "Question: what is the sky color?\nAnswer:", ("blue", "green light", "red"), answer=0),
    Sample("b", "Hi", ("x y z w", "q"), answer=1),
    Sample("w", choice_prompts=("Sarah was better than Maria so Sarah", "Sarah was better so Maria"),
           continuation="always got the easy cases.", answer=0),
]


def _same_scores(s: torch.Tensor, ref: torch.Tensor, atol: float = 1e-4) -> None:
    """Equal next-token distributions: same excluded set, same log_softmax on the rest."""
    assert torch.equal(torch.isinf(s), torch.isinf(ref))
    assert not torch.isnan(s).any()
    fin = ~torch.isinf(ref)
    assert torch.allclose(torch.log_softmax(s, -1)[fin], torch.log_softmax(ref, -1)[fin], atol=atol)


# ---- SVDecode ---------------------------------------------------------------------------------------------------
def _svdecode_ref(z_b, z_f, mu, beta):
    p_f, p_b = torch.softmax(z_f.double(), -1), torch.softmax(z_b.double(), -1)
    kl = (p_f * torch.log(p_f / p_b)).sum(-1, keepdim=True)
    delta = -p_f * (torch.log(p_f / p_b) - kl)
    # the Jacobian form in docs/strategies.md (svdecode) gives the same vector
    g = -(torch.log(p_f / p_b) + 1)
    assert torch.allclose(delta, p_f * (g - (p_f * g).sum(-1, keepdim=True)), atol=1e-12)
    s = z_f.double() + mu * delta
    keep = p_f >= beta * p_f.max(-1, keepdim=True).values
    return s.masked_fill(~keep, float("-inf")).float(), delta, keep


@pytest.mark.parametrize("mu,beta", [(1.0, 0.1), (-3.0, 0.1), (25.0, 0.0), (0.0, 0.5)])
def test_svdecode_matches_formula(mu, beta):
    g = torch.Generator().manual_seed(0)
    z_b, z_f = torch.randn(6, V, generator=g) * 3, torch.randn(6, V, generator=g) * 3
    s = build(StrategySpec("svdecode", {"mu": mu, "beta": beta}))(z_b, z_f)
    ref, _, _ = _svdecode_ref(z_b, z_f, mu, beta)
    _same_scores(s, ref)
    if mu == 0.0:
        _same_scores(s, torch.log_softmax(z_f, -1).masked_fill(torch.isinf(ref), float("-inf")))


def test_svdecode_params():
    with pytest.raises(ValueError, match="'mu'"):
        build(StrategySpec("svdecode", {"mu": "big"}))
    with pytest.raises(ValueError, match="'mu'"):
        build(StrategySpec("svdecode", {"mu": float("nan")}))
    auto = build(StrategySpec("svdecode"))
    assert auto.spec.key == "svdecode(beta=0.1,mu=auto)"
    with pytest.raises(ValueError, match="auto"):
        auto(torch.zeros(1, V), torch.zeros(1, V))
    spec = StrategySpec.from_json({"name": "svdecode", "params": {"mu": -0.25, "calibration": "ab12"}})
    assert spec.key == "svdecode(beta=0.1,mu=-0.25,calibration=ab12)"
    assert StrategySpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert parse_strategy_arg("svdecode:mu=auto")[0].params["mu"] == "auto"


# ---- DoLa -------------------------------------------------------------------------------------------------------
class _RMSNorm(torch.nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(h) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def _dola_ref(z_f, prem: dict[int, torch.Tensor], layers, penalty=1.0, seen=None):
    """Per row: JSD of final vs each candidate, pick the max, lp_f - lp_prem on head(0.1); HF repetition rule."""
    out = torch.empty_like(z_f, dtype=torch.float64)
    picks = []
    for i in range(z_f.shape[0]):
        p = torch.softmax(z_f[i].double(), -1)
        best, best_j = -1.0, None
        for j in layers:
            q = torch.softmax(prem[j][i].double(), -1)
            m = 0.5 * (p + q)
            jsd = 0.5 * float((p * torch.log(p / m)).sum()) + 0.5 * float((q * torch.log(q / m)).sum())
            if jsd > best:
                best, best_j = jsd, j
        picks.append(best_j)
        s = torch.log(p) - torch.log_softmax(prem[best_j][i].double(), -1)
        s[p < 0.1 * p.max()] = float("-inf")
        if seen is not None:
            for v in torch.nonzero(seen[i]).flatten().tolist():
                s[v] = s[v] / penalty if s[v] > 0 else s[v] * penalty
        out[i] = s
    return out.float(), picks


def _toy_head(h=8, n_layers=6, softcap=None, seed=0):
    torch.manual_seed(seed)
    lm_head = torch.nn.Linear(h, V, bias=False)
    with torch.no_grad():
        lm_head.weight.mul_(6.0)
    return OutputHead(_RMSNorm(h), lm_head, softcap, n_layers, tied_embeddings=False)


@pytest.mark.parametrize("layers,penalty", [("high", 1.2), ("low", 1.0), ([1, 4], 2.0)])
def test_dola_matches_formula(layers, penalty):
    head = _toy_head()
    g = torch.Generator().manual_seed(1)
    hidden = {j: torch.randn(7, 8, generator=g) * (1 + j) for j in range(6)}
    z_f = head.lm_head(head.norm(torch.randn(7, 8, generator=g))).detach()
    strat = build(StrategySpec("dola", {"layers": layers, "repetition_penalty": penalty}))
    cands = strat.hidden_layers(head.num_layers, head.tied_embeddings)
    extras = step_extras(head, {j: hidden[j] for j in cands})
    seen = torch.rand(7, V, generator=g) < 0.3
    extras["seen_tokens"] = seen
    s = strat.scores_from(Step(None, z_f, extras))
    prem = {j: head.lm_head(head.norm(hidden[j])).detach() for j in cands}
    ref, picks = _dola_ref(z_f, prem, cands, penalty, seen)
    assert torch.equal(torch.isinf(s), torch.isinf(ref))
    fin = ~torch.isinf(ref)
    assert torch.allclose(s[fin], ref[fin], atol=1e-4)  # raw scores (the penalty is not shift-invariant)
    if len(cands) > 1 and layers == "high":
        assert len(set(picks)) > 1  # the layer is chosen per position, not per batch


def test_dola_without_history_has_no_penalty():
    head = _toy_head()
    hidden = {j: torch.randn(3, 8) for j in range(6)}
    z_f = torch.randn(3, V) * 4
    strat = build(StrategySpec("dola", {"layers": [0, 2]}))
    s = strat.scores_from(Step(None, z_f, step_extras(head, {0: hidden[0], 2: hidden[2]})))
    prem = {j: head.lm_head(head.norm(hidden[j])).detach() for j in (0, 2)}
    ref, _ = _dola_ref(z_f, prem, [0, 2])
    fin = ~torch.isinf(ref)
    assert torch.allclose(s[fin], ref[fin], atol=1e-4)


def test_premature_logits_softcap():
    head = _toy_head(softcap=3.0)
    h = torch.randn(4, 8)
    got = step_extras(head, {1: h})["premature_logits"][1]
    raw = head.lm_head(head.norm(h)).detach()
    assert torch.allclose(got, torch.tanh(raw / 3.0) * 3.0, atol=1e-5)


def test_dola_candidate_layers_follow_transformers_convention():
    assert dola_candidate_layers("low", 30, True) == list(range(2, 15, 2))
    assert dola_candidate_layers("high", 30, True) == list(range(15, 30, 2))
    assert dola_candidate_layers("low", 32, False) == list(range(0, 16, 2))
    assert dola_candidate_layers("high", 32, False) == list(range(16, 32, 2))
    assert dola_candidate_layers("low", 48, False) == list(range(0, 20, 2))
    assert dola_candidate_layers("high", 48, False) == list(range(28, 48, 2))
    assert dola_candidate_layers("low", 2, True) == [1] and dola_candidate_layers("high", 2, True) == [1]
    with pytest.raises(ValueError, match="layers"):
        dola_candidate_layers([3, 40], 30, True)
    with pytest.raises(ValueError, match="'layers'"):
        build(StrategySpec("dola", {"layers": "middle"}))
    with pytest.raises(ValueError, match="'repetition_penalty'"):
        build(StrategySpec("dola", {"repetition_penalty": 0}))
    (spec,) = parse_strategy_arg("dola:layers=[4,0],repetition_penalty=1")
    assert spec.key == "dola(layers=[0,4],repetition_penalty=1.0)"
    assert StrategySpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


# ---- on the tiny pair -------------------------------------------------------------------------------------------
def _plain_ft(pair, ids: list[int]):
    with torch.no_grad():
        out = pair.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.logits[0], [h[0] for h in out.hidden_states]


@pytest.mark.parametrize("adapter", ["tiny_lora_dir", "tiny_prefix_dir"])
def test_mc_dola_scores_match_a_plain_forward(request, tiny_model_dir, adapter):
    """Teacher forcing with base rows in the same batch (mixed path) or a second pass (prefix tuning): the hidden
    states used are the fine-tuned rows', at the scored positions."""
    from tad_core.models import load_pair

    tiny_pair = load_pair(str(tiny_model_dir), adapter=request.getfixturevalue(adapter))
    assert tiny_pair.path == ("mixed" if adapter == "tiny_lora_dir" else "two_pass")
    head = output_head(tiny_pair.model)
    strat = build(StrategySpec("dola", {"layers": [0, 1]}))
    units = build_units(tiny_pair.tokenizer, MC)
    tf = teacher_force(tiny_pair, units, need_ft=True, need_base=True, hidden_layers=[0, 1])
    s = strat.scores_from(tf.step)
    i = 0
    for ui, _, cont, _ in tf.rows:
        ctx = units[ui][1]
        logits, hs = _plain_ft(tiny_pair, ctx + cont)
        at = list(range(len(ctx) - 1, len(ctx) + len(cont) - 1))
        prem = {j: head.lm_head(head.norm(hs[j][at])).detach() for j in (0, 1)}
        ref, _ = _dola_ref(logits[at], prem, [0, 1])
        got = s[i: i + len(cont)]
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        fin = ~torch.isinf(ref)
        assert torch.allclose(got[fin], ref[fin], atol=1e-3)
        i += len(cont)
    assert i == len(tf.targets)


def test_mc_and_generation_end_to_end(tiny_pair):
    specs = parse_strategy_arg("ft") + parse_strategy_arg("tad") + parse_strategy_arg("dola:layers=high,low") + \
        parse_strategy_arg("svdecode:mu=0.5,-2")
    gen = [Sample("g1", "Q: 2+2?\nA:", reference="4"), Sample("g2", "Say hi", reference="hi")]
    res = evaluate_batch(tiny_pair, MC + gen, specs, EvalConfig(max_new_tokens=4))
    for r in res:
        assert set(r.outcomes) == {s.key for s in specs}
    for r in res[:3]:
        for key, o in r.outcomes.items():
            assert len(o.scores) == len(r.outcomes["ft"].scores) and o.pred is not None
    for r in res[3:]:
        assert all(o.output is not None and o.tokens <= 4 for o in r.outcomes.values())


def test_generation_dola_matches_recomputed_greedy(tiny_pair):
    """Greedy DoLa in the batched, cached, mixed-path loop = recomputing each step from a plain full forward."""
    head = output_head(tiny_pair.model)
    dola = build(StrategySpec("dola", {"layers": [0, 1], "repetition_penalty": 1.5}))
    out = generate_texts(tiny_pair, PROMPTS, [build(StrategySpec("tad")), dola], GenConfig(max_new_tokens=5))
    tok = tiny_pair.tokenizer
    for p, row in zip(PROMPTS, out):
        ids = tok(p)["input_ids"]
        want: list[int] = []
        for _ in range(len(row[1].token_ids)):
            logits, hs = _plain_ft(tiny_pair, ids + want)
            prem = {j: head.lm_head(head.norm(hs[j][-1:])).detach() for j in (0, 1)}
            seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool)
            seen[0, ids + want] = True
            ref, _ = _dola_ref(logits[-1:], prem, [0, 1], 1.5, seen)
            want.append(int(ref.argmax()))
        assert row[1].token_ids == want


def _count_decoder_calls(pair):
    calls = []
    hook = pair.model.get_base_model().model.register_forward_hook(lambda *a: calls.append(1))
    return calls, hook


def test_dola_adds_no_forward_pass(tiny_pair):
    ft, dola = build(StrategySpec("ft")), build(StrategySpec("dola"))
    calls, hook = _count_decoder_calls(tiny_pair)
    try:
        score_mc(tiny_pair, MC, [ft])
        n_ft = len(calls)
        calls.clear()
        score_mc(tiny_pair, MC, [ft, dola])
        assert len(calls) == n_ft == 2  # contexts, then continuations
        calls.clear()
        generate_texts(tiny_pair, PROMPTS, [ft, dola], GenConfig(max_new_tokens=4))
        assert len(calls) <= 1 + 4  # the prompts, then at most one forward per new token for all rows
    finally:
        hook.remove()


# ---- calibration ------------------------------------------------------------------------------------------------
def test_mu_per_token_is_the_masked_least_squares_step():
    g = torch.Generator().manual_seed(3)
    z_b, z_f = torch.randn(5, V, generator=g) * 2, torch.randn(5, V, generator=g) * 2
    targets = torch.randint(0, V, (5,), generator=g)
    got = cal.svdecode_mu_per_token(Step(z_b, z_f), targets, beta=0.1)
    _, delta, keep = _svdecode_ref(z_b, z_f, 1.0, 0.1)
    p_f = torch.softmax(z_f.double(), -1)
    for i in range(5):
        e = torch.zeros(V, dtype=torch.float64)
        e[targets[i]] = 1.0
        d, r = delta[i][keep[i]], (e - p_f[i])[keep[i]]
        closed = float((r * d).sum() / ((d * d).sum() + 1e-12))
        lstsq = float(torch.linalg.lstsq(d[:, None], r[:, None]).solution)  # argmin_mu ||r - mu d||
        assert math.isclose(float(got[i]), closed, rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(closed, lstsq, rel_tol=1e-6, abs_tol=1e-9)


def test_mu_sign_is_not_clamped():
    # gold = the head token that the knowledge direction pushes down the most: every mu_t < 0
    g = torch.Generator().manual_seed(4)
    z_b, z_f = torch.randn(8, V, generator=g), torch.randn(8, V, generator=g)
    step = Step(z_b, z_f)
    _, delta, keep = _svdecode_ref(z_b, z_f, 1.0, 0.0)
    targets = delta.masked_fill(~keep, float("inf")).argmin(-1)
    mu_t = cal.svdecode_mu_per_token(step, targets, beta=0.0)
    assert (mu_t < 0).all()
    assert cal._reduce(mu_t, "mean") < 0 and cal._reduce(mu_t, "median") < 0


def _mc_jsonl(tmp_path, n=6):
    rows = [{"id": f"s{i}", "prompt": f"Question: item {i} is?\nAnswer:", "choices": ["red", "blue box", "green"],
             "answer": i % 3} for i in range(n)]
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_calibration_equals_transcription_from_plain_forwards(tiny_pair, tmp_path):
    samples = [Sample.from_dict(json.loads(x)) for x in _mc_jsonl(tmp_path).read_text().splitlines()]
    samples.append(Sample("g", "Q: 2+2?\nA:", reference="4"))
    res = cal.calibrate_svdecode_mu(tiny_pair, samples, beta=0.1, n=7, reduce="mean", batch_size=3)
    mus = []
    tok = tiny_pair.tokenizer
    for u in build_units(tok, samples, gold_only=True):
        ctx, ((_, cont, _),) = u[1], u[2]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            zf = tiny_pair.model(input_ids=ids).logits[0]
            with tiny_pair.model.disable_adapter():
                zb = tiny_pair.model(input_ids=ids).logits[0]
        at = list(range(len(ctx) - 1, len(ctx) + len(cont) - 1))
        _, delta, keep = _svdecode_ref(zb[at], zf[at], 1.0, 0.1)
        p_f = torch.softmax(zf[at].double(), -1)
        for k, y in enumerate(cont):
            r = -p_f[k]
            r[y] += 1
            d = delta[k].masked_fill(~keep[k], 0.0)
            mus.append(float((r * d).sum() / ((d * d).sum() + 1e-12)))
    assert res.n_samples == 7 and res.n_tokens == len(mus)
    assert math.isclose(res.mu, sum(mus) / len(mus), rel_tol=1e-3, abs_tol=1e-6)


def test_cached_calibration_is_stored_and_reused(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("TAD_CACHE_DIR", str(tmp_path / "cache"))
    data = _mc_jsonl(tmp_path)
    first = cal.cached_calibration(tiny_pair, str(data), split="train", n=4, beta=0.1)
    stored = tmp_path / "cache" / "calibrations" / f"{first.key}.json"
    assert stored.is_file() and json.loads(stored.read_text())["mu"] == first.mu
    assert first.n_samples == 4 and first.dataset == "calib" and first.pair

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(cal, "calibrate_svdecode_mu", boom)
    assert cal.cached_calibration(tiny_pair, str(data), split="train", n=4, beta=0.1) == first
    with pytest.raises(AssertionError):  # another n is another calibration
        cal.cached_calibration(tiny_pair, str(data), split="train", n=3, beta=0.1)


def test_evaluate_resolves_mu_auto(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("TAD_CACHE_DIR", str(tmp_path / "cache"))
    data = _mc_jsonl(tmp_path)
    with pytest.raises(ValueError, match="calibration dataset"):
        evaluate(tiny_pair, MC, ["svdecode:mu=auto"], progress=False)
    report = evaluate(tiny_pair, MC, ["ft", "svdecode:mu=auto"], progress=False, calibration_dataset=str(data),
                      calibration_n=4)
    (spec,) = [s for s in report.specs if s.name == "svdecode"]
    stored = cal.cached_calibration(tiny_pair, str(data), split="train", n=4)
    assert spec.params["calibration"] == stored.key and math.isclose(spec.params["mu"], stored.mu, rel_tol=1e-5)
    assert spec.key in report.results[0].outcomes
