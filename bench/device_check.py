"""Checks that need a GPU, as one short script (the CPU tests cover the same properties on the CPU).

    bench/gpu_run.sh LOGDIR        # on the GPU machine: this script, then bench/bench_gpu.py

On CUDA, with a tiny random Llama + LoRA (built from a config, no files):
1. bf16: the paired forward's ft and base logits equal plain bf16 forwards of the fine-tuned and base model;
2. float32: greedy decoding on the compiled path (captured CUDA graphs, `mode="reduce-overhead"`) and on the eager
   static path gives the same tokens as the eager dynamic path, for ft, base, tad, tad_log and contrastive; the
   compiled forward and the compiled step of all strategies (`tad_core.fused_step`) ran every decoding step and
   did not fall back; a second batch of the same layout compiles nothing new and decodes the dynamic path's
   tokens. (float32, because paths that attend over different cache lengths round differently, and in bf16 a
   random model's near-tied logits then flip tokens: on the CPU the bf16 static path already differs from the
   dynamic one. bf16 is checked to compile and run without falling back, its token agreement printed.)
3. no compiled graph ran without CUDA graphs (torch counts `cudagraph_skips`: a mutated input that is not a static
   address, a CPU tensor, ...).
Exits 1 with the failing check named; prints each check's result. `--cpu` runs the same script on the CPU (a dry
run: there the compiled path has no CUDA graphs to skip).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_gpu import build_pair  # noqa: E402
from bench.common import machine  # noqa: E402
from tad_core.decode_path import choose  # noqa: E402
from tad_core.engine import PairedRunner, left_pad, positions_from_mask  # noqa: E402
from tad_core.generation import GenConfig, generate_texts  # noqa: E402
from tad_core.models import PairedModel  # noqa: E402
from tad_core.strategies import build, parse_strategy_arg  # noqa: E402


def _paths(pair: PairedModel, prompts: list[str], strategies: list, paths: tuple[str, ...]) -> dict[str, list]:
    return {path: [[g.token_ids for g in row] for row in generate_texts(
        pair, prompts, strategies, GenConfig(max_new_tokens=24, ignore_eos=True, decode=path))] for path in paths}


def _compiled_ran(pair: PairedModel, steps: int) -> str | None:
    """Why the pair's compiled forward or strategy step did not run every decoding step (None: they did)."""
    compiled, fused = choose(pair, "compiled"), list(pair.info.get("fused_steps", {}).values())
    print(f"  compiled path: {compiled.describe()}; compiled forwards {getattr(compiled.step, 'calls', 0)}; "
          f"compiled strategy steps: {[(f.compiled.calls, f.compiled.failed) for f in fused]}")
    if compiled.path != "compiled" or compiled.step is None or compiled.step.failed or compiled.step.calls < steps - 1:
        return "compiled forward fell back or did not run"
    if len(fused) != 1 or fused[0].compiled.failed or fused[0].compiled.calls < steps:
        return "compiled strategy step fell back or did not run"
    return None


def main() -> int:
    cpu = "--cpu" in sys.argv[1:]  # a dry run of this script on the CPU, before the device's few minutes
    if not cpu and not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the CPU tests cover the CPU; --cpu dry-runs this script)")
        return 1
    device = "cpu" if cpu else "cuda"
    print(f"machine: {machine()}")
    failures = []
    prompts = ["t5 t6 t7 t8 t9", "t10 t11", "t12 t13 t14 t15 t16 t17 t18"]
    other = ["t20 t21 t22 t23", "t24 t25 t26 t27 t28 t29", "t30"]  # a second batch, same layout
    strategies = [build(s) for s in (*parse_strategy_arg("ft"), *parse_strategy_arg("base"),
                                     *parse_strategy_arg("tad:alpha=1"), *parse_strategy_arg("tad_log"),
                                     *parse_strategy_arg("contrastive"))]

    pair = build_pair(True, device, torch.bfloat16)
    tok = pair.tokenizer
    ids, mask = left_pad([tok(p)["input_ids"] for p in prompts[:1]], tok.pad_token_id)
    runner = PairedRunner(pair, need_ft=[True], need_base=[True])
    with torch.no_grad():
        z_b, z_f = runner.forward(ids, mask, positions_from_mask(mask), logits_to_keep=0)
        ids, mask = ids.to(device), mask.to(device)
        ft = pair.model(input_ids=ids, attention_mask=mask).logits
        with pair.model.disable_adapter():
            base = pair.model(input_ids=ids, attention_mask=mask).logits
    ok = torch.equal(z_f, ft) and torch.equal(z_b, base)
    print(f"1. bf16 paired logits == plain bf16 forwards: {ok} (max diff ft {(z_f - ft).abs().max().item():.3g}, "
          f"base {(z_b - base).abs().max().item():.3g})")
    if not ok:
        failures.append("bf16 paired logits")
    out = _paths(pair, prompts, strategies, ("dynamic", "compiled"))
    same = sum(a == b for ra, rb in zip(out["dynamic"], out["compiled"]) for sa, sb in zip(ra, rb)
               for a, b in zip(sa, sb))
    print(f"   bf16 compiled path: {same} of {3 * 5 * 24} tokens as the dynamic path's (rounding, not checked)")
    if (why := _compiled_ran(pair, 24)) is not None:
        failures.append(f"bf16: {why}")

    pair = build_pair(True, device, torch.float32)
    out = _paths(pair, prompts, strategies, ("dynamic", "static", "compiled"))
    for path in ("static", "compiled"):
        same = out[path] == out["dynamic"]
        print(f"2. float32 greedy tokens, {path} == dynamic, 5 strategies x 3 prompts x 24 tokens: {same}")
        if not same:
            failures.append(f"{path} tokens")
    if (why := _compiled_ran(pair, 24)) is not None:
        failures.append(why)
    graphs = counters["stats"]["unique_graphs"]
    again = _paths(pair, other, strategies, ("compiled", "dynamic"))
    new_graphs = counters["stats"]["unique_graphs"] - graphs
    print(f"   second batch: compiled == dynamic tokens: {again['compiled'] == again['dynamic']}; "
          f"graphs compiled for it: {new_graphs}")
    if again["compiled"] != again["dynamic"] or new_graphs:
        failures.append("second batch")

    skips = counters["inductor"]["cudagraph_skips"]  # reduce-overhead runs a graph without CUDA graphs silently
    print(f"3. CUDA graphs skipped (torch's cudagraph_skips counter): {skips}")
    if skips:
        failures.append("CUDA graphs skipped")
    print("FAILED: " + ", ".join(failures) if failures else "all device checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
