"""Loading a pair in bfloat16: the paired engine's ft and base logits are those of plain bf16 forwards."""
from __future__ import annotations

import pytest
import torch

from tad_core.dtypes import canonical_dtype, resolve_dtype, torch_dtype
from tad_core.engine import PairedRunner, left_pad, positions_from_mask
from tad_core.evaluate import EvalConfig
from tad_core.models import load_pair
from tad_core.samples import Sample
from tad_core.scoring import _encode, score_mc
from tad_core.strategies import build, parse_strategy_arg

PROMPTS = ["Hello there, how are", "The capital of France is a city called", "1+1="]


def _paired_logits(pair, ids, mask):
    runner = PairedRunner(pair, need_ft=[True] * len(ids), need_base=[True] * len(ids))
    with torch.no_grad():
        return runner.forward(ids, mask, positions_from_mask(mask), logits_to_keep=0)


def test_bf16_lora_pair_equals_plain_bf16_forwards(tiny_model_dir, tiny_lora_dir, tiny_pair):
    pair = load_pair(str(tiny_model_dir), adapter=tiny_lora_dir, dtype=torch.bfloat16)
    assert pair.path == "mixed" and {p.dtype for p in pair.model.parameters()} == {torch.bfloat16}
    tok = pair.tokenizer
    for prompt in PROMPTS:  # one prompt a batch: the plain forwards see the same shapes as each side's rows
        ids, mask = left_pad([tok(prompt)["input_ids"]], tok.pad_token_id)
        z_b, z_f = _paired_logits(pair, ids, mask)
        assert z_f.dtype == torch.bfloat16
        with torch.no_grad():
            ft = pair.model(input_ids=ids, attention_mask=mask).logits
            with pair.model.disable_adapter():
                base = pair.model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(z_f, ft) and torch.equal(z_b, base)
        # the dtype took effect: fp32 logits of the same pair differ in the low digits
        z_b32, z_f32 = _paired_logits(tiny_pair, ids, mask)
        assert not torch.equal(z_f.float(), z_f32) and torch.allclose(z_f.float(), z_f32, atol=0.5, rtol=0.05)


def test_bf16_mc_scores_equal_plain_bf16_forward(tiny_model_dir, tiny_lora_dir):
    pair = load_pair(str(tiny_model_dir), adapter=tiny_lora_dir, dtype=torch.bfloat16)
    sample = Sample("a", "Question: what is the sky color?\nAnswer:", ("blue", "green light"), answer=0)
    (res,) = score_mc(pair, [sample], [build(s) for s in parse_strategy_arg("ft") + parse_strategy_arg("base")])
    for ci, (ctx, cont) in enumerate(sample.contexts_and_continuations()):
        c, k = _encode(pair.tokenizer, ctx, cont)
        with torch.no_grad():
            ids = torch.tensor([c + k])
            lp = torch.log_softmax(pair.model(input_ids=ids).logits.float(), -1)[0]
            with pair.model.disable_adapter():
                lpb = torch.log_softmax(pair.model(input_ids=ids).logits.float(), -1)[0]
        assert res.scores["ft"][ci] == pytest.approx(sum(lp[len(c) - 1 + j, t].item() for j, t in enumerate(k)),
                                                     abs=2e-2)
        assert res.scores["base"][ci] == pytest.approx(sum(lpb[len(c) - 1 + j, t].item() for j, t in enumerate(k)),
                                                       abs=2e-2)


def test_bf16_two_models_pair_equals_each_model(tmp_path, tiny_model_dir):
    from tests.conftest import build_tiny_model

    ft_dir = build_tiny_model(tmp_path / "ft", seed=3)
    pair = load_pair(str(tiny_model_dir), finetuned=ft_dir, dtype=torch.bfloat16)
    assert pair.path == "two_models" and pair.base_model.dtype == torch.bfloat16 == pair.model.dtype
    tok = pair.tokenizer
    ids, mask = left_pad([tok(p)["input_ids"] for p in PROMPTS], tok.pad_token_id)
    z_b, z_f = _paired_logits(pair, ids, mask)
    pos = positions_from_mask(mask)
    with torch.no_grad():
        ft = pair.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        base = pair.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert torch.equal(z_f[real], ft[real]) and torch.equal(z_b[real], base[real])


def test_dtype_names_and_auto():
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bf16", "cpu") == "bfloat16" and canonical_dtype("FP16") == "float16"
    assert torch_dtype("bfloat16") is torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_dtype("auto", "cuda") == "float32"  # no CUDA here: auto never picks what cannot run
    with pytest.raises(ValueError, match="dtype must be one of"):
        canonical_dtype("int8")
    with pytest.raises(ValueError, match="dtype must be one of"):
        EvalConfig(dtype="auto")  # a stored config is always concrete
    assert "dtype" not in EvalConfig().to_json()  # float32 configs keep their earlier identity
    bf = EvalConfig(dtype="bf16")
    assert bf.dtype == "bfloat16" and EvalConfig.from_json(bf.to_json()) == bf
