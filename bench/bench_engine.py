"""Engine benchmarks (issue 3): ratios measured side by side in one run, never timed assertions.

    python bench/bench_engine.py gen   # TaD vs ft generation (batch 1 and 8, 64 new tokens) + the naive two-pass way
    python bench/bench_engine.py hf    # our ft greedy vs transformers' generate on the same fine-tuned model
    python bench/bench_engine.py mc    # MC scoring: 10 strategies (incl. a 6-point alpha sweep) vs ft + tad alone
    python bench/bench_engine.py mem   # peak memory: paired LoRA generation vs the fine-tuned model alone
    python bench/bench_engine.py prefill  # 10 strategies per sample: one shared prefill vs one per strategy
    python bench/bench_engine.py paths    # the decoding paths on this CPU: dynamic (default) vs static vs compiled
    python bench/bench_engine.py draw     # sampling one token per row: per-row inverse transform vs torch.multinomial

Uses the embedded SmolLM2-135M-Instruct with a random-weight LoRA (same compute as a trained one) unless
`--adapter DIR` is given.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import interleaved, machine, random_lora  # noqa: E402
from tad_core.engine import SmallRowsLinear  # noqa: E402
from tad_core.generation import GenConfig, generate_texts  # noqa: E402
from tad_core.models import load_pair, resolve_base_dir  # noqa: E402
from tad_core.paths import cache_subdir  # noqa: E402
from tad_core.strategies import StrategySpec, build, parse_strategy_arg  # noqa: E402

PROMPTS = [
    "Question: Which technology was developed most recently?\nAnswer:",
    "Question: A student is trying to identify a mineral that has a nonmetallic luster and is black.\nAnswer:",
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue.",
    "Question: What is the boiling point of water at sea level in Celsius?\nAnswer:",
    "List three uses of copper.",
    "Question: Plants make food by which process?\nAnswer:",
    "Describe the water cycle in two sentences.",
]


def _pair(args):
    base = args.base
    adapter = args.adapter or random_lora(resolve_base_dir(base), cache_subdir("bench") / "random_lora_r8")
    return load_pair(base, adapter=adapter)


def _route_line(pair) -> str:
    """Measure the few-rows route on this CPU (done when the pair is first used) and say what was chosen."""
    SmallRowsLinear.for_pair(pair)
    return f"few-rows route: {pair.info['few_rows_route'].describe()}"


def bench_gen(args) -> list[str]:
    pair = _pair(args)
    naive = dataclasses.replace(pair, path="two_pass")  # two separate forwards per step, adapter on / off
    cfg = GenConfig(max_new_tokens=args.tokens, ignore_eos=True, kv_steps=False)
    no_kv = dataclasses.replace(cfg, kv_stats=False)
    ft, tad = build(StrategySpec("ft")), build(StrategySpec("tad"))
    lines = [_route_line(pair)]
    for bs in (1, 8):
        prompts = PROMPTS[:bs]
        t = interleaved({
            "ft": lambda: generate_texts(pair, prompts, [ft], cfg),
            "tad": lambda: generate_texts(pair, prompts, [tad], cfg),
            "tad_no_kv": lambda: generate_texts(pair, prompts, [tad], no_kv),
            "tad_naive": lambda: generate_texts(naive, prompts, [tad], cfg),
        }, repeats=args.repeats)
        tok_s = bs * args.tokens / t["ft"]
        lines.append(f"| gen batch {bs}, {args.tokens} new tokens | ft {t['ft']:.2f} s ({tok_s:.0f} tok/s) | "
                     f"tad {t['tad']:.2f} s | **tad/ft = {t['tad'] / t['ft']:.2f}** (target <= 1.3) | "
                     f"tad without kv stats / ft = {t['tad_no_kv'] / t['ft']:.2f} | "
                     f"naive two-pass tad/ft = {t['tad_naive'] / t['ft']:.2f} |")
    return lines


def bench_draw(args) -> list[str]:
    """The sampling step alone (no model): one token for each of 80 rows (8 samples x 10 strategies) of a
    49,152-token distribution, per-row generators by inverse transform (tad_core.generation.draw) vs one batched
    torch.multinomial (what sampling did before each sequence had its own generator)."""
    from tad_core.generation import draw

    probs = torch.softmax(torch.randn(80, 49152, generator=torch.Generator().manual_seed(0)) * 3, -1)
    gens = [torch.Generator().manual_seed(i) for i in range(80)]
    one = torch.Generator().manual_seed(0)
    t = interleaved({"multinomial": lambda: [torch.multinomial(probs, 1, generator=one) for _ in range(10)],
                     "draw": lambda: [draw(probs, gens) for _ in range(10)]}, args.repeats)
    return ["| sampling, 80 rows x 49,152 | batched multinomial ms/step | per-row draw ms/step | multinomial / draw |",
            "|---|---|---|---|",
            f"| median of {args.repeats} x 10 steps | {t['multinomial'] * 100:.1f} | {t['draw'] * 100:.1f} | "
            f"{t['multinomial'] / t['draw']:.2f} |"]


def bench_paths(args) -> list[str]:
    """The three decoding paths of `tad_core.decode_path` on this CPU, side by side: `dynamic` (the CPU default),
    `static` (eager, preallocated cache) and `compiled` (the CUDA default: the paired forward and every strategy
    in `torch.compile`d functions, inductor on the CPU). Greedy tokens must agree; the compile happens in the
    untimed warm-up run."""
    pair = _pair(args)
    cfg = GenConfig(max_new_tokens=args.tokens, ignore_eos=True, kv_steps=False)
    paths = {p: dataclasses.replace(cfg, decode=p) for p in ("dynamic", "static", "compiled")}
    ft, tad = build(StrategySpec("ft")), build(StrategySpec("tad"))
    ten = [build(s) for arg in TEN for s in parse_strategy_arg(arg)]
    lines = [_route_line(pair)]
    cases = {f"ft b{bs}": (PROMPTS[:bs], [ft]) for bs in (1, 8)}
    cases |= {f"tad b{bs}": (PROMPTS[:bs], [tad]) for bs in (1, 8)}
    cases["10 strategies b8"] = (PROMPTS, [s for s in ten if not s.needs_hidden])  # dola runs eagerly anyway
    lines.append("| case | dynamic s | static s | compiled s | compiled / dynamic | same tokens |")
    lines.append("|---|---|---|---|---|---|")
    for name, (prompts, strats) in cases.items():
        outs: dict[str, object] = {}

        def run(p: str):
            return lambda: outs.__setitem__(p, generate_texts(pair, prompts, strats, paths[p]))
        t = interleaved({p: run(p) for p in paths}, repeats=args.repeats)
        toks = {p: [[o.token_ids for o in row] for row in outs[p]] for p in paths}  # type: ignore[union-attr]
        same = toks["dynamic"] == toks["static"] == toks["compiled"]
        lines.append(f"| {name}, {args.tokens} new tokens | {t['dynamic']:.2f} | {t['static']:.2f} | "
                     f"{t['compiled']:.2f} | **{t['compiled'] / t['dynamic']:.2f}** | {same} |")
    compiled = pair.info.get("decode_path:compiled")
    fused = list(pair.info.get("fused_steps", {}).values())
    lines.append(f"compiled path: {compiled.describe() if compiled else '-'}; compiled forward steps "
                 f"{compiled.step.calls if compiled and compiled.step else 0}; compiled strategy steps "
                 f"{[(f.compiled.calls, f.compiled.failed) for f in fused]}")
    return lines


TEN = ("ft", "base", "tad:alpha=0.5,1,2,4", "tad_log", "contrastive", "dola", "tad_log:beta=0.5")


def bench_prefill(args) -> list[str]:
    """A worker's generation shard under the published protocol: ARC-Easy val samples rendered by the
    `llm-adapters` instruction format (prompts of ~100-200 tokens), 12 new tokens, 10 strategies per sample,
    decoded together. Shared = every prompt encoded once per side (ft, base) for all 10 strategies; per strategy =
    each (sample, strategy) sequence encodes its prompt (generation before the sharing, `share_prefill=False`)."""
    from tad_core.datasets import load_dataset
    from tad_core.formats import format_context, parse_format

    pair = _pair(args)
    fmt = parse_format("llm-adapters")
    ctx = format_context(fmt, "arc_easy")
    samples = [fmt.render(s, ctx) for s in load_dataset("arc_easy", "val", limit=8).samples]
    specs = [s for arg in TEN for s in parse_strategy_arg(arg)]
    strategies = [build(s) for s in specs]
    assert len(strategies) == 10, len(strategies)
    lens = [len(pair.tokenizer(s.prompt)["input_ids"]) for s in samples]
    cfg = GenConfig(max_new_tokens=12, kv_steps=False)  # EOS and the stop rules as a worker decodes
    lines = [f"prompts: ARC-Easy val as llm-adapters instructions, {min(lens)}-{max(lens)} tokens; 12 new tokens; "
             f"strategies: {', '.join(s.key for s in specs)}"]
    for bs in (1, 4):
        prompts = [s.prompt for s in samples[:bs]]
        same = ([[g.token_ids for g in row] for row in generate_texts(pair, prompts, strategies, cfg)]
                == [[g.token_ids for g in row] for row in generate_texts(
                    pair, prompts, strategies, dataclasses.replace(cfg, share_prefill=False))])
        t = interleaved({
            "shared": lambda: generate_texts(pair, prompts, strategies, cfg),
            "per_strategy": lambda: generate_texts(pair, prompts, strategies,
                                                   dataclasses.replace(cfg, share_prefill=False)),
        }, repeats=args.repeats)
        lines.append(f"| {bs} sample(s) x 10 strategies | per-strategy prefill {t['per_strategy']:.2f} s | shared "
                     f"prefill {t['shared']:.2f} s | **speed-up {t['per_strategy'] / t['shared']:.2f}x** (target "
                     f">= 1.3) | same tokens: {same} |")
    return lines


def bench_hf(args) -> list[str]:
    pair = _pair(args)
    tok = pair.tokenizer
    ft = build(StrategySpec("ft"))
    cfg = GenConfig(max_new_tokens=args.tokens, ignore_eos=True, kv_steps=False)
    lines = []
    for bs in (1, 8):
        prompts = PROMPTS[:bs]
        enc = tok(prompts, return_tensors="pt", padding=True)

        def hf() -> None:
            with torch.no_grad():
                pair.model.generate(**enc, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id)

        t = interleaved({"ours": lambda: generate_texts(pair, prompts, [ft], cfg), "hf": hf}, repeats=args.repeats)
        lines.append(f"| ft greedy batch {bs}, {args.tokens} tokens | ours {t['ours']:.2f} s | transformers generate "
                     f"{t['hf']:.2f} s | **ours/hf = {t['ours'] / t['hf']:.2f}** (target <= 1.1) |")
    return lines


def bench_mc(args) -> list[str]:
    from tad_core.datasets import load_dataset
    from tad_core.evaluate import EvalConfig, evaluate

    pair = _pair(args)
    samples = load_dataset("arc_easy", "val", limit=args.samples).samples
    many = ["ft", "base", "tad:alpha=0,0.25,0.5,1,2,4", "tad_log", "contrastive"]
    cfg = EvalConfig(batch_size=8)
    t = interleaved({
        "ft_paired": lambda: evaluate(pair, samples, ["ft", "tad"], cfg, progress=False),
        "all": lambda: evaluate(pair, samples, many, cfg, progress=False),
        "ft_alone": lambda: evaluate(pair, samples, ["ft"], cfg, progress=False),  # no base rows needed
    }, repeats=args.repeats)
    n_strat = len(evaluate(pair, samples[:1], many, cfg, progress=False).specs)
    return [f"| MC scoring, {len(samples)} ARC-Easy val samples | ft alone (no base rows) {t['ft_alone']:.1f} s | "
            f"one paired forward, ft+tad {t['ft_paired']:.1f} s | {n_strat} strategies incl. 6-point alpha sweep "
            f"{t['all']:.1f} s | **all/paired = {t['all'] / t['ft_paired']:.2f}** (target <= 1.1); "
            f"all/ft-alone = {t['all'] / t['ft_alone']:.2f} |"]


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _mem_child(kind: str, base: str, adapter: str, tokens: int) -> None:
    """Peak RSS of the whole process, and of the decoding phase alone: after loading, the kernel's high-water mark
    is reset (`/proc/self/clear_refs` = 5), so VmHWM then measures what generation itself adds."""
    pair = load_pair(base, adapter=adapter)
    strat = build(StrategySpec("tad" if kind == "tad" else "ft"))
    cfg = GenConfig(max_new_tokens=tokens, ignore_eos=True, kv_steps=False)
    whole = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the load's peak (weights, conversion)
    Path("/proc/self/clear_refs").write_text("5")
    loaded = _rss_mb("VmRSS")
    generate_texts(pair, PROMPTS, [strat], cfg)
    peak = _rss_mb("VmHWM")
    print(json.dumps({"loaded_mb": loaded, "decode_peak_mb": peak,
                      "whole_mb": max(whole, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def bench_mem(args) -> list[str]:
    adapter = args.adapter or str(random_lora(resolve_base_dir(args.base), cache_subdir("bench") / "random_lora_r8"))
    out = {}
    for kind in ("ft", "tad"):
        res = subprocess.run([sys.executable, __file__, "_mem", kind, "--base", args.base, "--adapter", adapter,
                              "--tokens", str(args.tokens)], capture_output=True, text=True, check=True)
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    ft, tad = out["ft"], out["tad"]
    return [f"| peak RSS during decoding, batch 8, {args.tokens} tokens (model loaded: ft {ft['loaded_mb']:.0f} MB, "
            f"tad {tad['loaded_mb']:.0f} MB) | ft alone {ft['decode_peak_mb']:.0f} MB | paired LoRA tad "
            f"{tad['decode_peak_mb']:.0f} MB | **paired/ft = {tad['decode_peak_mb'] / ft['decode_peak_mb']:.2f}** "
            f"(target <= 1.1); decoding's own growth ft {ft['decode_peak_mb'] - ft['loaded_mb']:.0f} MB, tad "
            f"{tad['decode_peak_mb'] - tad['loaded_mb']:.0f} MB; whole-process peak (the load) ft {ft['whole_mb']:.0f}"
            f" MB, tad {tad['whole_mb']:.0f} MB |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["gen", "hf", "mc", "mem", "prefill", "paths", "draw", "all", "_mem"])
    ap.add_argument("kind", nargs="?")
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--adapter")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.what == "_mem":
        _mem_child(args.kind, args.base, args.adapter, args.tokens)
        return
    print(f"machine: {machine()}")
    todo = ["gen", "hf", "mc", "mem"] if args.what == "all" else [args.what]
    for what in todo:
        for line in {"gen": bench_gen, "hf": bench_hf, "mc": bench_mc, "mem": bench_mem,
                     "prefill": bench_prefill, "paths": bench_paths, "draw": bench_draw}[what](args):
            print(line, flush=True)


if __name__ == "__main__":
    main()
