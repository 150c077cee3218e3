"""Cost of the baselines `dola` and `svdecode` relative to `ft` in MC scoring, measured side by side in one run.

SmolLM2-135M + a LoRA adapter, ARC-Easy val samples, batches of 8 (as `evaluate` runs them). Every case scores the
same samples with `score_mc`; the cases are timed round-robin after a warm-up call each, median of `--repeats`.
SVDecode's one-off calibration (stored and reused afterwards) is timed separately.

    python bench/bench_baselines.py [--adapter DIR] [--samples 50] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import interleaved, machine, random_lora  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", help="LoRA adapter dir (default: a random LoRA on the base)")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    from tad_core.calibration import calibrate_svdecode_mu
    from tad_core.datasets import load_dataset
    from tad_core.models import DEFAULT_BASE, load_pair, resolve_base_dir
    from tad_core.scoring import score_mc
    from tad_core.strategies import build, parse_strategy_arg

    adapter = Path(args.adapter) if args.adapter else random_lora(
        resolve_base_dir(DEFAULT_BASE), Path(tempfile.gettempdir()) / "tad_bench_lora_r8")
    pair = load_pair(DEFAULT_BASE, adapter=adapter)
    samples = load_dataset("arc_easy", "val", limit=args.samples).samples
    batches = [samples[i: i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    cases = {
        "ft": ["ft"],
        "ft + dola(high)": ["ft", "dola:layers=high"],
        "ft + dola(low)": ["ft", "dola:layers=low"],
        "ft + svdecode(mu=1)": ["ft", "svdecode:mu=1.0"],
        "ft + tad (reference)": ["ft", "tad"],
    }

    def runner(args_: list[str]) -> Callable[[], object]:
        strategies = [build(s) for a in args_ for s in parse_strategy_arg(a)]
        return lambda: [score_mc(pair, b, strategies) for b in batches]

    times = interleaved({k: runner(v) for k, v in cases.items()}, args.repeats)
    t0 = time.perf_counter()
    train = load_dataset("arc_easy", "train").samples
    cal = calibrate_svdecode_mu(pair, train, beta=0.1, n=128)
    t_cal = time.perf_counter() - t0
    print(f"machine: {machine()}")
    print(f"MC scoring, {len(samples)} ARC-Easy val samples, batch {args.batch_size}, median of {args.repeats}, "
          f"adapter {adapter.name}")
    print(f"| case | s / run | ratio vs ft |\n|---|---|---|")
    for k, t in times.items():
        print(f"| {k} | {t:.2f} | {t / times['ft']:.2f} |")
    print(f"svdecode calibration (once per adapter x dataset, then reused): {t_cal:.1f} s for {cal.n_samples} "
          f"train samples / {cal.n_tokens} tokens (mu = {cal.mu:.4g}), = {t_cal / times['ft']:.1f}x one ft run above")


if __name__ == "__main__":
    main()
