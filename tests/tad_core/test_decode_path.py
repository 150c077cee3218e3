"""Decoding paths: a static KV cache (and its compiled steps) decodes exactly what the growing cache decodes."""
from __future__ import annotations

import pytest

from tad_core.decode_path import choose
from tad_core.generation import GenConfig, generate_texts
from tad_core.models import load_pair
from tad_core.strategies import build, parse_strategy_arg

PROMPTS = ["Hello there, how are", "The capital of France is a city called", "1+1="]
EVERY = [*parse_strategy_arg("ft"), *parse_strategy_arg("base"), *parse_strategy_arg("tad:alpha=0.5,2"),
         *parse_strategy_arg("tad_log"), *parse_strategy_arg("contrastive"), *parse_strategy_arg("dola"),
         *parse_strategy_arg("svdecode:mu=0.5")]


def _tokens(pair, strategies, decode, n=8, prompts=PROMPTS):
    out = generate_texts(pair, prompts, strategies, GenConfig(max_new_tokens=n, ignore_eos=True, decode=decode))
    return [[g.token_ids for g in row] for row in out]


def test_static_cache_decodes_the_same_tokens_for_every_strategy(tiny_pair):
    strategies = [build(s) for s in EVERY]
    dynamic = _tokens(tiny_pair, strategies, "dynamic")
    static = _tokens(tiny_pair, strategies, "static")
    assert static == dynamic
    # the strategies do disagree, so the comparison covers different token paths
    assert len({tuple(map(tuple, (row[i] for row in dynamic))) for i in range(len(strategies))}) > 2
    assert choose(tiny_pair, "static").path == "static"
    assert choose(tiny_pair).path == "dynamic"  # the CPU default


def test_static_cache_with_two_models_and_fallback_for_prefix(tmp_path, tiny_model_dir, tiny_prefix_dir):
    from tests.conftest import build_tiny_model

    two = load_pair(str(tiny_model_dir), finetuned=build_tiny_model(tmp_path / "ft", seed=5))
    strategies = [build(s) for s in (*parse_strategy_arg("ft"), *parse_strategy_arg("tad"))]
    assert _tokens(two, strategies, "static") == _tokens(two, strategies, "dynamic")
    prefix = load_pair(str(tiny_model_dir), adapter=tiny_prefix_dir)
    choice = choose(prefix, "static")
    assert choice.path == "dynamic" and "prefix" in choice.reason  # impossible there: fallback, with the reason
    assert _tokens(prefix, strategies, "static") == _tokens(prefix, strategies, "dynamic")


def test_bad_decode_path_is_refused():
    with pytest.raises(ValueError, match="decode must be one of"):
        GenConfig(decode="graphs")


def test_compiled_steps_decode_the_same_tokens(tiny_model_dir, tiny_lora_dir):
    """torch.compile of the paired forward and of every strategy in one step function (default CPU backend here;
    reduce-overhead CUDA graphs on a GPU): the same tokens, flips, kv statistics and top tokens as the eager loop,
    including rows that finish early (a stop sequence) while the others go on."""
    pair = load_pair(str(tiny_model_dir), adapter=tiny_lora_dir)
    strategies = [build(s) for s in (*parse_strategy_arg("ft"), *parse_strategy_arg("tad:alpha=1"),
                                     *parse_strategy_arg("contrastive"))]
    eager = generate_texts(pair, PROMPTS, strategies, GenConfig(max_new_tokens=6, ignore_eos=True, decode="dynamic"))
    stop = pair.tokenizer.decode(eager[0][1].token_ids[2:3])  # row (prompt 0, tad) stops at its 3rd token
    runs = {}
    for decode in ("dynamic", "compiled"):
        runs[decode] = generate_texts(pair, PROMPTS, strategies, GenConfig(max_new_tokens=6, ignore_eos=True,
                                                                           decode=decode, stop=(stop,)))
    choice = choose(pair, "compiled")
    assert choice.step.failed is None and choice.path == "compiled", choice.reason
    assert choice.step.calls >= 5  # every decoding step after the prefill ran the compiled forward
    (fused,) = pair.info["fused_steps"].values()
    assert fused.compiled.failed is None and fused.compiled.calls >= 6  # and every strategy step, compiled
    assert any(g.finish_reason == "stop" for row in runs["dynamic"] for g in row)
    assert any(g.finish_reason == "length" for row in runs["dynamic"] for g in row)
    for row_d, row_c in zip(runs["dynamic"], runs["compiled"]):
        for d, c in zip(row_d, row_c):
            assert (d.token_ids, d.text, d.finish_reason) == (c.token_ids, c.text, c.finish_reason)
            assert (d.flip_rate is None) == (c.flip_rate is None)
            if d.flip_rate is not None:  # the paired rows (tad, contrastive) keep their statistics
                assert c.flip_rate == pytest.approx(d.flip_rate)
                assert c.kv["steps"] == d.kv["steps"]
                for k in ("kl_mean", "js_mean", "kv_l1_max", "h_b_mean"):
                    assert c.kv[k] == pytest.approx(d.kv[k], rel=1e-4, abs=1e-6)
                for sd, sc in zip(d.kv["per_step"], c.kv["per_step"]):
                    assert (sd["token"], sd["flip"]) == (sc["token"], sc["flip"])
                    assert [t[1] for t in sd["promoted"]] == [t[1] for t in sc["promoted"]]
                    assert [t[1] for t in sd["demoted"]] == [t[1] for t in sc["demoted"]]


def test_strategies_that_read_layers_or_history_step_eagerly_on_the_compiled_path(tiny_pair):
    """dola (premature layers) cannot be fused: the compiled path keeps the eager strategy loop for that batch."""
    from tad_core.fused_step import unfusable

    dola = [build(s) for s in (*parse_strategy_arg("ft"), *parse_strategy_arg("dola"))]
    assert "dola" in unfusable(dola, 0.0)
    assert "sampling" in unfusable([build(parse_strategy_arg("tad")[0])], 0.7)
    assert unfusable([build(parse_strategy_arg("tad")[0])], 0.0) is None


def test_compiled_graphs_are_reused_across_batches(tiny_model_dir, tiny_lora_dir):
    """A worker's batches differ in prompt length: the static cache is rounded up (`static_length`), so batches
    whose prompts differ by a few tokens run the same compiled forward and strategy step; the strategy step is
    one graph (no graph breaks: the compile would fail with `fullgraph=True`)."""
    from torch._dynamo.utils import counters

    from tad_core.generation import STATIC_LEN_MULTIPLE, static_length

    assert [static_length(n) for n in (1, STATIC_LEN_MULTIPLE, STATIC_LEN_MULTIPLE + 1)] == [
        STATIC_LEN_MULTIPLE, STATIC_LEN_MULTIPLE, 2 * STATIC_LEN_MULTIPLE]
    pair = load_pair(str(tiny_model_dir), adapter=tiny_lora_dir)
    strategies = [build(s) for s in (*parse_strategy_arg("ft"), *parse_strategy_arg("tad"))]
    cfg = GenConfig(max_new_tokens=4, ignore_eos=True, decode="compiled")
    batches = [["Hello there, how are you", "x"], ["What is two plus two? Answer:", "a b c d e f g h i j k l"]]
    lengths = [max(len(pair.tokenizer(p)["input_ids"]) for p in b) for b in batches]
    assert lengths[0] != lengths[1] and static_length(lengths[0] + 4) == static_length(lengths[1] + 4)
    generate_texts(pair, batches[0], strategies, cfg)
    graphs = counters["stats"]["unique_graphs"]
    out = generate_texts(pair, batches[1], strategies, cfg)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled for the second batch
    choice = choose(pair, "compiled")
    assert choice.step.failed is None and choice.step.calls == 6  # 3 decode steps per batch, all compiled
    (fused,) = pair.info["fused_steps"].values()
    assert fused.compiled.failed is None and fused.compiled.calls == 8
    eager = generate_texts(pair, batches[1], strategies, GenConfig(max_new_tokens=4, ignore_eos=True,
                                                                   decode="dynamic"))
    assert [[g.token_ids for g in row] for row in out] == [[g.token_ids for g in row] for row in eager]


def test_compiled_path_ignores_the_few_rows_cpu_route(tiny_model_dir, tiny_lora_dir):
    """Where the few-rows CPU route is taken (imposed here), the compiled forward must not trace it: its call
    counter would be a guard that changes at every step, recompiling the model at every step."""
    from torch._dynamo.utils import counters

    from tad_core.cpu_route import RouteChoice
    from tad_core.engine import SmallRowsLinear

    pair = load_pair(str(tiny_model_dir), adapter=tiny_lora_dir)
    pair.info["few_rows_route"] = RouteChoice("mm", reason="imposed by the test")
    few = SmallRowsLinear.for_pair(pair)
    assert few is not None
    tad = [build(s) for s in parse_strategy_arg("tad")]
    cfg = GenConfig(max_new_tokens=6, ignore_eos=True, decode="compiled")
    first = generate_texts(pair, PROMPTS[:1], tad, cfg)  # 2 rows (ft and base sides): the route's size
    graphs, prefill_calls = counters["stats"]["unique_graphs"], few.calls  # the eager prefill's output head
    again = generate_texts(pair, PROMPTS[:1], tad, cfg)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile: neither per step nor per batch
    assert few.calls == 2 * prefill_calls <= 2  # the compiled decode steps never took the route
    choice = choose(pair, "compiled")
    assert choice.step.failed is None and choice.step.calls == 10
    dynamic = generate_texts(pair, PROMPTS[:1], tad, GenConfig(max_new_tokens=6, ignore_eos=True, decode="dynamic"))
    assert few.calls - 2 * prefill_calls > 5  # the eager decode steps do take it
    assert first[0][0].token_ids == again[0][0].token_ids == dynamic[0][0].token_ids


def test_static_caches_are_reused_batch_after_batch(tiny_pair):
    """A captured graph reads and writes its cache at fixed addresses: the next batch of the same layout decodes in
    the same cache tensors (no re-recording per batch on CUDA), and what the last batch left there changes nothing
    (a batch of shorter prompts after longer ones decodes what the dynamic cache decodes). The pool is bounded."""
    from tad_core.static_cache import MAX_CACHES

    strategies = [build(s) for s in (*parse_strategy_arg("ft"), *parse_strategy_arg("tad"))]
    cfg = GenConfig(max_new_tokens=6, ignore_eos=True, decode="static")
    long = ["The capital of France is a city called", "Hello there, how are you doing today", "a b c d e f g"]
    short = ["Hi", "1+1=", "x y"]
    tiny_pair.info.pop("static_caches", None)  # the shared pair's earlier static batches
    generate_texts(tiny_pair, long, strategies, cfg)
    pool = tiny_pair.info["static_caches"]
    before = {key: [layer.keys for layer in cache.layers] for key, cache in pool.items()}  # kept alive here
    assert len(before) == 2  # the prompts' prefill rows, and the strategies' decoding rows
    out = generate_texts(tiny_pair, short, strategies, cfg)
    after = {key: [layer.keys for layer in cache.layers] for key, cache in pool.items()}
    assert after.keys() == before.keys()
    assert all(a is b for key in before for a, b in zip(after[key], before[key]))
    dynamic = generate_texts(tiny_pair, short, strategies, GenConfig(max_new_tokens=6, ignore_eos=True,
                                                                     decode="dynamic"))
    assert [[g.token_ids for g in row] for row in out] == [[g.token_ids for g in row] for row in dynamic]
    for n in range(1, 7):  # other layouts: the pool keeps the most recent ones only
        generate_texts(tiny_pair, short[:1] * n, strategies, GenConfig(max_new_tokens=2, decode="static"))
    assert len(pool) == MAX_CACHES


def test_static_cache_pool_stays_within_its_memory_budget(tiny_pair, monkeypatch):
    """Caches of many layouts are not all kept: past the budget (a fraction of the device's memory) the least
    recently used go, down to the newest one, and what is decoded does not change."""
    from tad_core import static_cache

    strategies = [build(s) for s in (*parse_strategy_arg("ft"), *parse_strategy_arg("tad"))]
    cfg = GenConfig(max_new_tokens=3, ignore_eos=True, decode="static")
    tiny_pair.info.pop("static_caches", None)
    generate_texts(tiny_pair, ["Hi"], strategies, cfg)
    pool = tiny_pair.info["static_caches"]
    sizes = [static_cache.cache_bytes(c) for c in pool.values()]
    assert len(sizes) == 2 and min(sizes) > 0  # prefill: 2 rows (ft and base sides); decoding: 3 (ft, tad's 2)
    assert sum(sizes) < static_cache.budget_bytes(tiny_pair.device)
    monkeypatch.setattr(static_cache, "budget_bytes", lambda device: max(sizes) + 1)  # room for one cache
    out = generate_texts(tiny_pair, ["Hi", "1+1=", "x y"], strategies, cfg)
    assert 1 <= len(pool) <= 2  # the 1-prompt layouts went; the newest cache stays
    assert {rows for _, rows, _ in pool} <= {3 * 2, 3 * 3}  # only the 3-prompt batch's prefill and decoding rows
    assert sum(static_cache.cache_bytes(c) for c in list(pool.values())[:-1]) <= max(sizes) + 1
    dynamic = generate_texts(tiny_pair, ["Hi", "1+1=", "x y"], strategies, GenConfig(
        max_new_tokens=3, ignore_eos=True, decode="dynamic"))
    assert [[g.token_ids for g in row] for row in out] == [[g.token_ids for g in row] for row in dynamic]


@pytest.fixture(scope="module")
def tiny_gemma_pair(tmp_path_factory):
    """A 2-layer random Gemma-3 (one sliding-window layer, window 8) with a random LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from tad_core.models import resolve_base_dir

    out = tmp_path_factory.mktemp("tiny_gemma")
    tok = AutoTokenizer.from_pretrained(str(resolve_base_dir("smollm2-135m-instruct")))
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, intermediate_size=64, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                            task_type="CAUSAL_LM"))
    lora.save_pretrained(str(out / "lora"))
    return load_pair(str(out), adapter=str(out / "lora"))


def test_sliding_window_layers_compile_once_and_keep_their_window(tiny_gemma_pair):
    """transformers' sliding static layer counts its fill level in a Python int that the compiled step guarded on
    (a recompile at every decoding step); the static cache's layers are all full-length, the window being applied by
    the attention mask. Compiled and static decode the dynamic cache's tokens past the window, and the compiled
    forward is one graph for every step."""
    from torch._dynamo.utils import counters

    strategies = [build(s) for s in (*parse_strategy_arg("ft"), *parse_strategy_arg("tad"))]
    prompts = PROMPTS[:2]
    n = 12
    assert max(len(tiny_gemma_pair.tokenizer(p)["input_ids"]) for p in prompts) + n > 2 * 8  # well past the window
    tokens = {}
    for decode in ("dynamic", "static", "compiled"):
        if decode == "compiled":
            graphs = counters["stats"]["unique_graphs"]
        tokens[decode] = _tokens(tiny_gemma_pair, strategies, decode, n=n, prompts=prompts)
    # the paired forward and the strategy step (which may reuse an earlier test's graph), once: not once per step
    assert counters["stats"]["unique_graphs"] - graphs <= 2
    choice = choose(tiny_gemma_pair, "compiled")
    assert choice.path == "compiled" and choice.step.failed is None and choice.step.calls == n - 1
    assert tokens["static"] == tokens["dynamic"] == tokens["compiled"]


def test_compiled_batches_are_padded_to_a_few_row_counts(tiny_model_dir, tiny_lora_dir):
    """A shard's last batch is usually smaller: on the compiled path a batch runs at a bucketed row count (copies of
    its last prompt), so it reuses the graphs of the full batches; the real prompts' outputs are unchanged."""
    from torch._dynamo.utils import counters

    from tad_core.generation import row_bucket

    assert [row_bucket(n) for n in (1, 2, 3, 5, 8, 9, 17)] == [1, 2, 4, 8, 8, 16, 24]
    pair = load_pair(str(tiny_model_dir), adapter=tiny_lora_dir)
    strategies = [build(s) for s in (*parse_strategy_arg("ft"), *parse_strategy_arg("tad"))]
    four = [*PROMPTS, "One more prompt"]
    cfg = GenConfig(max_new_tokens=4, ignore_eos=True, decode="compiled")
    generate_texts(pair, four, strategies, cfg)
    graphs = counters["stats"]["unique_graphs"]
    out = generate_texts(pair, PROMPTS, strategies, cfg, stops=[("zzz",)] * 3)  # 3 prompts: run as 4
    assert counters["stats"]["unique_graphs"] == graphs
    assert choose(pair, "compiled").step.calls == 6
    dynamic = _tokens(pair, strategies, "dynamic", n=4)
    assert len(out) == 3 and [[g.token_ids for g in row] for row in out] == dynamic
