"""Checks that need a GPU, as one short script (the CPU tests cover the same properties on the CPU).

    python bench/device_check.py && python bench/bench_gpu.py --repeats 2

On CUDA, with a tiny random Llama + LoRA in bf16 (built from a config, no files):
1. the paired forward's ft and base logits equal plain bf16 forwards of the fine-tuned and base model;
2. greedy decoding on the compiled path (captured CUDA graphs, `mode="reduce-overhead"`) and on the eager static
   path gives the same tokens as the eager dynamic path, for ft, base, tad, tad_log and contrastive; the compiled
   forward and the compiled step of all strategies (`tad_core.fused_step`) ran every decoding step and did not
   fall back.
Exits 1 with the failing check named; prints each check's result.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_gpu import build_pair  # noqa: E402
from bench.common import machine  # noqa: E402
from tad_core.decode_path import choose  # noqa: E402
from tad_core.engine import PairedRunner, left_pad, positions_from_mask  # noqa: E402
from tad_core.generation import GenConfig, generate_texts  # noqa: E402
from tad_core.strategies import build, parse_strategy_arg  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the CPU tests cover the CPU)")
        return 1
    print(f"machine: {machine()}")
    pair = build_pair(True, "cuda", torch.bfloat16)
    tok = pair.tokenizer
    failures = []
    prompts = ["t5 t6 t7 t8 t9", "t10 t11", "t12 t13 t14 t15 t16 t17 t18"]
    ids, mask = left_pad([tok(p)["input_ids"] for p in prompts[:1]], tok.pad_token_id)
    runner = PairedRunner(pair, need_ft=[True], need_base=[True])
    with torch.no_grad():
        z_b, z_f = runner.forward(ids, mask, positions_from_mask(mask), logits_to_keep=0)
        ids, mask = ids.cuda(), mask.cuda()
        ft = pair.model(input_ids=ids, attention_mask=mask).logits
        with pair.model.disable_adapter():
            base = pair.model(input_ids=ids, attention_mask=mask).logits
    ok = torch.equal(z_f, ft) and torch.equal(z_b, base)
    print(f"bf16 paired logits == plain bf16 forwards: {ok} (max diff ft {(z_f - ft).abs().max().item():.3g}, "
          f"base {(z_b - base).abs().max().item():.3g})")
    if not ok:
        failures.append("bf16 paired logits")
    specs = [*parse_strategy_arg("ft"), *parse_strategy_arg("base"), *parse_strategy_arg("tad:alpha=1"),
             *parse_strategy_arg("tad_log"), *parse_strategy_arg("contrastive")]
    strategies = [build(s) for s in specs]
    out = {}
    for path in ("dynamic", "static", "compiled"):
        res = generate_texts(pair, prompts, strategies, GenConfig(max_new_tokens=24, ignore_eos=True, decode=path))
        out[path] = [[g.token_ids for g in row] for row in res]
    compiled = choose(pair, "compiled")
    for path in ("static", "compiled"):
        same = out[path] == out["dynamic"]
        print(f"greedy tokens, {path} == dynamic, 5 strategies x 3 prompts x 24 tokens: {same}")
        if not same:
            failures.append(f"{path} tokens")
    step = compiled.step
    print(f"compiled path: {compiled.describe()}; compiled steps run: {getattr(step, 'calls', 0)}")
    if compiled.path != "compiled" or step is None or step.failed or step.calls < 23:
        failures.append("compiled path fell back or did not run")
    fused = list(pair.info.get("fused_steps", {}).values())
    print(f"compiled strategy steps: {[(f.compiled.calls, f.compiled.failed) for f in fused]}")
    if len(fused) != 1 or fused[0].compiled.failed or fused[0].compiled.calls < 24:
        failures.append("compiled strategy step fell back or did not run")
    print("FAILED: " + ", ".join(failures) if failures else "all device checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
