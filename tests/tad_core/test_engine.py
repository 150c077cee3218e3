"""The paired engine on a tiny random Llama: paths agree, generation matches transformers, MC matches a forward."""
from __future__ import annotations

import shutil

import pytest
import torch

from tad_core.engine import PairedRunner, left_pad, positions_from_mask
from tad_core.evaluate import EvalConfig, evaluate, evaluate_batch, generate
from tad_core.extraction import answers_match, extract_answer
from tad_core.generation import GenConfig, generate_texts
from tad_core.models import ModelLoadError, load_pair
from tad_core.samples import Sample
from tad_core.scoring import _encode, score_mc
from tad_core.strategies import StrategySpec, build, parse_strategy_arg

PROMPTS = ["Hello there, how are", "The capital of France is a city called", "1+1="]
SAMPLES = [
    Sample("a", "Question: what is the sky color?\nAnswer:", ("blue", "green light", "red"), answer=0),
    Sample("b", "Hi", ("x y z w", "q"), answer=1),
    Sample("w", choice_prompts=("Sarah was better than Maria so Sarah", "Sarah was better so Maria"),
           continuation="always got the easy cases.", answer=0),
]
ALL = parse_strategy_arg("ft") + parse_strategy_arg("base") + parse_strategy_arg("tad:alpha=0,1") + \
    parse_strategy_arg("tad_log") + parse_strategy_arg("contrastive")


def _last_logits(pair, runner_kwargs, ids, mask):
    runner = PairedRunner(pair, **runner_kwargs)
    with torch.no_grad():
        return runner.forward(ids, mask, positions_from_mask(mask), logits_to_keep=0)


def test_mixed_batch_equals_two_passes(tiny_pair):
    assert tiny_pair.path == "mixed"
    tok = tiny_pair.tokenizer
    ids, mask = left_pad([tok(p)["input_ids"] for p in PROMPTS], tok.pad_token_id)
    z_b, z_f = _last_logits(tiny_pair, {"need_ft": [True] * 3, "need_base": [True] * 3}, ids, mask)
    with torch.no_grad():
        ft = tiny_pair.model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        with tiny_pair.model.disable_adapter():
            base = tiny_pair.model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    real = mask.bool()
    assert torch.allclose(z_f[real], ft[real], atol=1e-4)
    assert torch.allclose(z_b[real], base[real], atol=1e-4)
    assert not torch.allclose(z_f[real], z_b[real], atol=1e-2)  # the adapter does change the logits


@pytest.mark.parametrize("adapter", ["tiny_lora_dir", "tiny_prefix_dir", "tiny_ia3_dir"])
def test_greedy_ft_and_base_match_transformers_generate(request, tiny_model_dir, adapter):
    pair = load_pair(str(tiny_model_dir), adapter=request.getfixturevalue(adapter))
    strategies = [build(StrategySpec("ft")), build(StrategySpec("base")), build(StrategySpec("tad"))]
    out = generate_texts(pair, PROMPTS, strategies, GenConfig(max_new_tokens=10))
    tok = pair.tokenizer
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert len(set(enc["attention_mask"].sum(-1).tolist())) > 1  # prompts of unequal length
    with torch.no_grad():
        hf_ft = pair.model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
        with pair.model.disable_adapter():
            hf_base = pair.model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    width = enc["input_ids"].shape[1]
    for i in range(len(PROMPTS)):
        for j, ref in ((0, hf_ft), (1, hf_base)):
            mine = out[i][j].token_ids
            assert mine == ref[i, width: width + len(mine)].tolist()
            assert len(mine) == 10 or out[i][j].finish_reason == "eos"
    assert pair.path == ("two_pass" if adapter != "tiny_lora_dir" else "mixed")


def test_mc_ft_scores_equal_plain_forward(tiny_pair):
    res = score_mc(tiny_pair, SAMPLES, [build(s) for s in ALL])
    tok = tiny_pair.tokenizer
    for sample, r in zip(SAMPLES, res):
        for ci, (ctx, cont) in enumerate(sample.contexts_and_continuations()):
            c, k = _encode(tok, ctx, cont)
            with torch.no_grad():
                ids = torch.tensor([c + k])
                lp = torch.log_softmax(tiny_pair.model(input_ids=ids).logits.float(), -1)[0]
                with tiny_pair.model.disable_adapter():
                    lpb = torch.log_softmax(tiny_pair.model(input_ids=ids).logits.float(), -1)[0]
            want = sum(lp[len(c) - 1 + j, t].item() for j, t in enumerate(k))
            want_b = sum(lpb[len(c) - 1 + j, t].item() for j, t in enumerate(k))
            assert r.scores["ft"][ci] == pytest.approx(want, abs=1e-3)
            assert r.scores["base"][ci] == pytest.approx(want_b, abs=1e-3)
            assert r.scores["tad(alpha=0.0,beta=0.0)"][ci] == r.scores["ft"][ci]
        assert r.kv["kl_mean"] > 0 and len(r.kv["promoted"]) == 5
        assert 0.0 <= r.flip_rate["tad(alpha=1.0,beta=0.0)"] <= 1.0


def test_mc_scores_do_not_depend_on_batch_composition(tiny_pair):
    specs = [build(s) for s in ALL]
    together = score_mc(tiny_pair, SAMPLES, specs)
    for i, s in enumerate(SAMPLES):
        alone = score_mc(tiny_pair, [s], specs)[0]
        for key, vals in alone.scores.items():
            assert vals == pytest.approx(together[i].scores[key], abs=1e-3, nan_ok=True)


def test_evaluate_batch_outcomes(tiny_pair):
    res = evaluate_batch(tiny_pair, SAMPLES, ALL, EvalConfig())
    for sample, r in zip(SAMPLES, res):
        assert set(r.outcomes) == {s.key for s in ALL}
        ft = r.outcomes["ft"]
        assert ft.correct == (ft.pred == sample.answer)
        for o in r.outcomes.values():
            assert len(o.scores) == sample.n_choices
            expected = None if o.correct == ft.correct else ("fixed" if o.correct else "broken")
            assert o.vs_ft == expected
            import json
            json.dumps(o.to_json(), allow_nan=False)  # -inf scores are stored as null


def test_evaluate_report_and_generation_samples(tiny_pair):
    gen = [Sample("g1", "2+2=", reference="4"), Sample("g2", "Say yes:", reference="yes", answer_pattern=r"(yes|no)")]
    rep = evaluate(tiny_pair, SAMPLES + gen, ["ft", "tad:alpha=1"], EvalConfig(batch_size=2, max_new_tokens=5),
                   progress=False)
    assert len(rep.results) == 5
    summary = {r.key: r for r in rep.summary()}
    assert summary["ft"].acc.n == 5 and summary["tad(alpha=1.0,beta=0.0)"].vs_ft is not None
    g = rep.results[3].outcomes["ft"]
    assert g.output is not None and g.tokens <= 5
    tad = rep.results[3].outcomes["tad(alpha=1.0,beta=0.0)"]
    assert tad.kv["steps"] >= 1 and "per_step" in tad.kv and "promoted" in tad.kv["per_step"][0]
    assert "strategy" in rep.table()


def test_sampling_is_seeded(tiny_pair):
    cfg = EvalConfig(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=8)
    a = generate(tiny_pair, PROMPTS, "tad", cfg)
    b = generate(tiny_pair, PROMPTS, "tad", cfg)
    c = generate(tiny_pair, PROMPTS, "tad", EvalConfig(temperature=1.0, top_p=0.9, seed=8, max_new_tokens=8))
    assert a == b and a != c


def test_stop_strings_cut_output(tiny_pair):
    full = generate_texts(tiny_pair, PROMPTS[:1], [build(StrategySpec("ft"))], GenConfig(max_new_tokens=12))[0][0]
    assert len(full.text) > 2
    stop = full.text[2:4]
    cut = generate_texts(tiny_pair, PROMPTS[:1], [build(StrategySpec("ft"))],
                         GenConfig(max_new_tokens=12, stop=(stop,)))[0][0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)


def test_full_finetuned_checkpoint_two_models(tmp_path, tiny_model_dir):
    from tests.conftest import build_tiny_model

    ft_dir = build_tiny_model(tmp_path / "ft", seed=5)
    pair = load_pair(str(tiny_model_dir), finetuned=ft_dir)
    assert pair.path == "two_models"
    res = score_mc(pair, SAMPLES[:1], [build(StrategySpec("ft")), build(StrategySpec("base"))])[0]
    assert res.scores["ft"] != res.scores["base"]


def test_tokenizer_mismatch_is_refused(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["<brand-new-token>"])
    tok.save_pretrained(str(other))
    with pytest.raises(ModelLoadError, match="different tokenizers"):
        load_pair(str(tiny_model_dir), finetuned=other)


def test_adapter_for_another_base_is_refused(tmp_path, tiny_lora_dir):
    from tests.conftest import build_tiny_model

    from transformers import AutoConfig, LlamaForCausalLM

    wide = build_tiny_model(tmp_path / "wide")  # same tokenizer, wider layers than the adapter was made for
    cfg = AutoConfig.from_pretrained(str(wide))
    cfg.hidden_size, cfg.intermediate_size = 64, 128
    LlamaForCausalLM(cfg).save_pretrained(str(wide))
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_pair(str(wide), adapter=tiny_lora_dir)


def test_pickled_adapter_refused_unless_allowed(tmp_path, tiny_lora_dir, tiny_model_dir):
    from safetensors.torch import load_file

    pkl = tmp_path / "pkl"
    shutil.copytree(tiny_lora_dir, pkl)
    torch.save(load_file(str(pkl / "adapter_model.safetensors")), pkl / "adapter_model.bin")
    (pkl / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="pickled"):
        load_pair(str(tiny_model_dir), adapter=pkl)
    assert load_pair(str(tiny_model_dir), adapter=pkl, allow_pickle=True).path == "mixed"


def test_hub_id_is_refused():
    with pytest.raises(ModelLoadError, match="nothing is downloaded"):
        load_pair("HuggingFaceTB/SmolLM2-135M")


def test_extract_answer():
    assert extract_answer("so the answer is 1,234.", Sample("x", "q", reference="1234")) == "1234"
    assert answers_match("1234", "1234.0")
    mc = Sample("y", "q", ("red", "blue"), answer=1)
    assert extract_answer("B) blue", mc) == "blue"
    assert extract_answer("I think blue", mc) == "blue"
    assert extract_answer("ans=7 end", Sample("z", "q", reference="7", answer_pattern=r"ans=(\d+)")) == "7"


def test_row_gate_equals_peft_adapter_names(tiny_pair):
    """The vectorised LoRA row gate and PEFT's adapter_names mixed batch give the same logits."""
    import dataclasses

    from tad_core.engine import RowGate

    assert RowGate.for_pair(tiny_pair) is not None
    tok = tiny_pair.tokenizer
    ids, mask = left_pad([tok(p)["input_ids"] for p in PROMPTS], tok.pad_token_id)
    gated = _last_logits(tiny_pair, {"need_ft": [True] * 3, "need_base": [True] * 3}, ids, mask)
    plain = dataclasses.replace(tiny_pair, info={"row_gate": None})  # forces the adapter_names path
    peft_path = _last_logits(plain, {"need_ft": [True] * 3, "need_base": [True] * 3}, ids, mask)
    real = mask.bool()
    for a, b in zip(gated, peft_path):
        assert torch.allclose(a[real], b[real], atol=1e-5)


def test_few_rows_cpu_route_gives_the_same_decoding_steps(tiny_pair):
    """Batch-1 paired decoding (2 rows per step) takes the CPU few-rows matmul route, with the logits of plain
    forwards of the fine-tuned and base models over the whole sequence."""
    import dataclasses

    from tad_core.cpu_route import RouteChoice
    from tad_core.engine import SmallRowsLinear

    pair = dataclasses.replace(tiny_pair, info={"few_rows_route": RouteChoice("mm", reason="imposed by the test")})
    few = SmallRowsLinear.for_pair(pair)
    assert few is not None
    tok = pair.tokenizer
    ids = torch.tensor([tok(PROMPTS[1])["input_ids"]])
    mask = torch.ones_like(ids)
    runner = PairedRunner(pair, need_ft=[True], need_base=[True])
    seq = ids
    with torch.no_grad():
        runner.forward(ids, mask, positions_from_mask(mask), logits_to_keep=1)  # prefill: many rows, usual route
        before = few.calls
        for t in (5, 17, 3):
            seq = torch.cat([seq, torch.tensor([[t]])], dim=1)
            mask = torch.ones_like(seq)
            z_b, z_f = runner.forward(torch.tensor([[t]]), mask, positions_from_mask(mask)[:, -1:], logits_to_keep=1)
            ft = pair.model(input_ids=seq).logits[:, -1]
            with pair.model.disable_adapter():
                base = pair.model(input_ids=seq).logits[:, -1]
            assert torch.allclose(z_f[:, -1], ft, atol=1e-5) and torch.allclose(z_b[:, -1], base, atol=1e-5)
    assert few.calls > before  # the decode steps did take the route
    assert not few.active  # and it is off outside the paired forward


def test_mc_floor_replaces_excluded_tokens(tiny_pair):
    """With mc_floor, a choice containing a token the strategy excludes is finite and ranked; ft is unchanged."""
    import math

    specs = parse_strategy_arg("ft") + parse_strategy_arg("tad_log:beta=0.9")
    literal = evaluate_batch(tiny_pair, SAMPLES, specs, EvalConfig())
    floored = evaluate_batch(tiny_pair, SAMPLES, specs, EvalConfig(mc_floor=-1000.0))
    key = specs[1].key
    excluded = [s for r in literal for s in r.outcomes[key].scores if math.isinf(s)]
    assert excluded  # beta=0.9 keeps only the top tokens, so some continuation tokens are excluded
    for a, b in zip(literal, floored):
        assert a.outcomes["ft"].scores == b.outcomes["ft"].scores
        for x, y in zip(a.outcomes[key].scores, b.outcomes[key].scores):
            assert math.isfinite(y) and y >= -1000.0 * 40
            if math.isfinite(x):
                assert y == pytest.approx(x)
    with pytest.raises(ValueError, match="mc_floor"):
        EvalConfig(mc_floor=float("nan"))


def test_one_prefill_per_prompt_serves_every_strategy(tiny_pair):
    """Three strategies on two prompts: the prompts are encoded once (one model call whose batch has one row
    per prompt and side), and each strategy's output equals decoding it alone."""
    from tad_core.strategies import build, parse_strategy_arg

    strategies = [build(s) for s in (*parse_strategy_arg("ft"), *parse_strategy_arg("tad:alpha=1,2"))]
    prompts = ["one two three", "four"]
    batch_rows: list[int] = []
    hook = tiny_pair.model.register_forward_pre_hook(
        lambda _m, _a, kw: batch_rows.append(int(kw["input_ids"].shape[0])), with_kwargs=True)
    try:
        together = generate_texts(tiny_pair, prompts, strategies, GenConfig(max_new_tokens=5, ignore_eos=True))
    finally:
        hook.remove()
    assert batch_rows[0] == 2 * len(prompts)  # prefill: each prompt once per side (ft and base), not per strategy
    assert batch_rows[1] == len(prompts) * (1 + 2 * 2)  # decode: ft rows for ft, both sides for each TaD
    for si, strat in enumerate(strategies):
        alone = generate_texts(tiny_pair, prompts, [strat], GenConfig(max_new_tokens=5, ignore_eos=True))
        assert [row[si].token_ids for row in together] == [row[0].token_ids for row in alone]


def test_shared_prefill_decodes_what_per_sequence_prefill_decodes(tiny_pair):
    """The unshared reference (`share_prefill=False`: each (prompt, strategy) sequence encodes its prompt, as
    generation did before) decodes the same tokens and kv statistics for strategies of every kind (ft only, base
    only, paired, premature layers), with a prefill batch one row per sequence and side instead of per prompt."""
    from tad_core.strategies import build, parse_strategy_arg

    strategies = [build(s) for arg in ("ft", "base", "tad:alpha=0.5,2", "tad_log", "contrastive", "dola")
                  for s in parse_strategy_arg(arg)]
    prompts = ["one two three four five", "six", "seven eight"]
    rows: dict[bool, list[int]] = {}
    out = {}
    for shared in (True, False):
        rows[shared] = []
        hook = tiny_pair.model.register_forward_pre_hook(
            lambda _m, _a, kw, acc=rows[shared]: acc.append(int(kw["input_ids"].shape[0])), with_kwargs=True)
        try:
            out[shared] = generate_texts(tiny_pair, prompts, strategies,
                                         GenConfig(max_new_tokens=6, ignore_eos=True, share_prefill=shared))
        finally:
            hook.remove()
    n_ft = sum("ft" in s.needs for s in strategies)
    n_base = sum("base" in s.needs for s in strategies)
    assert rows[True][0] == 2 * len(prompts)
    assert rows[False][0] == (n_ft + n_base) * len(prompts)
    assert rows[True][1:] == rows[False][1:]  # the decoding steps are the same batches
    for a, b in zip(out[True], out[False]):
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids and x.text == y.text
            assert (x.flip_rate is None) == (y.flip_rate is None)
            if x.flip_rate is not None:
                assert x.flip_rate == pytest.approx(y.flip_rate)
            assert x.kv.keys() == y.kv.keys()
            for k in ("kl_mean", "js_mean"):
                if k in x.kv:
                    assert x.kv[k] == pytest.approx(y.kv[k], rel=1e-4, abs=1e-6)


def test_mc_outcomes_flag_all_inf_ties(tiny_pair):
    """A strategy that excludes every choice's tokens scores every choice -inf: the outcome says it was a tie
    (predicted by the tie-break to choice 0); ft never ties."""
    from tad_core.evaluate import EvalConfig, evaluate_batch
    from tad_core.strategies import parse_strategy_arg

    samples = [Sample(f"m{i}", f"Question {i}: pick", choices=(" alpha beta", " gamma delta", " eps"), answer=1)
               for i in range(4)]
    specs = [*parse_strategy_arg("ft"), *parse_strategy_arg("tad:alpha=1,beta=0.9")]
    res = evaluate_batch(tiny_pair, samples, specs, EvalConfig())
    for r in res:
        ft, tad = r.outcomes["ft"], r.outcomes[specs[1].key]
        assert ft.tie is False
        assert tad.tie == all(x == float("-inf") for x in tad.scores)
        if tad.tie:
            assert tad.pred == 0
    assert any(r.outcomes[specs[1].key].tie for r in res)


def test_acc_norm_divides_by_the_choice_text_as_lm_eval(tiny_pair):
    """lm-evaluation-harness normalises by `len(choice)` of the choice as listed, not by the continuation with
    its target delimiter: " blue" is scored but 4 characters count."""
    from tad_core.scoring import score_mc
    from tad_core.strategies import build, parse_strategy_arg

    samples = [Sample("c", "Sky colour:", choices=("blue", "dark red", " grey"), answer=0),
               Sample("w", choice_prompts=("Ann won so Ann", "Ann won so Bo"), continuation="was glad.", answer=0)]
    (mc, wino) = score_mc(tiny_pair, samples, [build(s) for s in parse_strategy_arg("ft")])
    assert mc.cont_chars == [4, 8, 5] and wino.cont_chars == [9, 9]


def test_default_stop_is_decided_per_sample(tiny_pair, monkeypatch):
    """Only a bare-reference sample gets the default stop at `\\nQuestion:`; a sample with its own answer pattern or
    extraction does not, whatever shares its batch (it used to be put on the whole batch's config)."""
    import tad_core.evaluate as ev

    seen: dict[str, tuple[str, ...]] = {}
    real = ev.generate_texts

    def spy(pair, prompts, strategies, cfg, stops=None):
        for prompt, st in zip(prompts, stops):
            seen[prompt] = tuple(cfg.stop) + tuple(st)
        return real(pair, prompts, strategies, cfg, stops=stops)

    monkeypatch.setattr(ev, "generate_texts", spy)
    patterned = Sample("p", "Q1 ", reference="x", answer_pattern=r"(\w+)")
    bare = Sample("b", "Q2 ", reference="4")
    own_extract = Sample("e", "Q3 ", reference="4", extract="first-line")
    cfg = EvalConfig(max_new_tokens=2)
    ft = [StrategySpec("ft")]
    evaluate_batch(tiny_pair, [patterned], ft, cfg)
    assert seen["Q1 "] == ()
    evaluate_batch(tiny_pair, [patterned, bare, own_extract], ft, cfg)
    assert seen == {"Q1 ": (), "Q2 ": ev.DEFAULT_STOP, "Q3 ": ()}
    evaluate_batch(tiny_pair, [bare], ft, EvalConfig(max_new_tokens=2, stop=("\n",)))
    assert seen["Q2 "] == ("\n",)  # a run's own stop replaces the default


def test_sampled_outputs_do_not_depend_on_the_batch(tiny_pair):
    """Each (prompt, strategy) sequence samples from its own seeded generator: the same prompt and seed give the
    same text alone, in a batch of three, and beside other strategies."""
    tad, ft = build(StrategySpec("tad")), build(StrategySpec("ft"))
    cfg = GenConfig(max_new_tokens=8, temperature=1.0, seed=3)
    alone = generate_texts(tiny_pair, PROMPTS[1:2], [tad], cfg)[0][0].token_ids
    batched = generate_texts(tiny_pair, PROMPTS, [ft, tad], cfg)[1][1].token_ids
    assert alone == batched
    other_seed = generate_texts(tiny_pair, PROMPTS[1:2], [tad], GenConfig(max_new_tokens=8, temperature=1.0, seed=4))
    assert other_seed[0][0].token_ids != alone


def test_inverse_transform_draw_follows_the_distribution():
    """`draw` samples each row from its own generator: the frequencies over many seeds match the probabilities, a
    token of probability 0 is never drawn, and a row's draw depends only on its generator."""
    from tad_core.generation import draw

    p = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    counts = torch.bincount(torch.cat([draw(p, [torch.Generator().manual_seed(i)]) for i in range(4000)]),
                            minlength=4)
    assert counts[1] == 0 and torch.allclose(counts / 4000, p[0], atol=0.03), counts
    two = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.2, 0.8]])
    alone = draw(two[1:], [torch.Generator().manual_seed(5)])
    together = draw(two, [torch.Generator().manual_seed(9), torch.Generator().manual_seed(5)])
    assert together[1] == alone[0]
