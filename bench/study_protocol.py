"""The published protocol study: one multi-task adapter per train size, 8 commonsense sets, every strategy, greedy.

TaD and its successors report commonsense accuracy under the LLM-Adapters protocol: one adapter fine-tuned on the
union of the eight training sets rendered as instructions, then *generation* of "the correct answer is answer2",
scored by the first label match. This script reproduces that protocol at CPU scale, through the real CLI (so every
run lands in the results DB and the dashboard's Study page shows it):

1. for each train size S (samples per set, seeded): `tad train --datasets <8 sets> --format llm-adapters
   --train-size S --steps T` (reused when the adapter exists);
2. for each set: `tad run --format llm-adapters --split val --limit N` with ft, base, a TaD alpha sweep, tad_log,
   contrastive, dola and svdecode (mu calibrated on 16 train samples of the set by default: the forward over
   BoolQ/HellaSwag train contexts makes the usual 128 cost hours per adapter on a CPU), greedy,
   `--max-new-tokens 12` (the target is 6-7 tokens; an output with no label by then is unparsed and wrong);
3. prints the study tables (services.study): per set and 8-set average per strategy, acc ± stderr, unparsed rate,
   fixed/broken vs ft and McNemar p (Holm-adjusted over the strategies of one train size).

    python bench/study_protocol.py --base smollm2-135m-instruct --sizes 4,8,16 --steps 20,20,40 --limit 15
    python bench/study_protocol.py --tables-only   # print the tables of what is in the DB

Whether TaD wins is the finding this prints, not something tuned for.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tad_core.paths import cache_subdir  # noqa: E402

SETS = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
STRATEGIES = ["ft", "base", "tad:alpha=0.5,1,2", "tad_log", "contrastive", "dola", "svdecode"]


def tad(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [str(Path(sys.executable).with_name("tad")), *args]
    print("$ tad " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def adapter_dir(base: str, size: int, steps: int, seed: int) -> Path:
    return cache_subdir("study") / f"{base}-llm-adapters-8sets-{size}x-{steps}steps-seed{seed}"


def evaluated(base: str) -> set[tuple[str, str]]:
    """(adapter name, dataset) pairs whose study runs are already in the results DB."""
    from services.db.schema import upgrade_if_embedded
    from services.db.session import session_scope
    from services.settings import get_settings
    from services.study import study_cells

    upgrade_if_embedded(get_settings().database_url)  # a fresh machine's embedded DB has no tables yet
    with session_scope() as s:
        return {(c.adapter.rsplit(":", 1)[0], c.dataset) for c in study_cells(s, base=base, fmt="llm-adapters@1")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--sizes", default="4,8,16", help="train samples per set, one adapter each")
    ap.add_argument("--steps", default="20,20,40", help="optimizer steps for each size (batch 8)")
    ap.add_argument("--limit", type=int, default=15, help="validation samples per set (the first N)")
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--calibration-samples", type=int, default=16,
                    help="train samples svdecode's mu is calibrated on, per set and adapter (TAD_CALIBRATION_SAMPLES)")
    ap.add_argument("--tables-only", action="store_true")
    args = ap.parse_args()
    sets = [s for s in args.sets.split(",") if s]
    if not args.tables_only:
        sizes = [int(x) for x in args.sizes.split(",")]
        steps = [int(x) for x in args.steps.split(",")]
        if len(sizes) != len(steps):
            ap.error("--sizes and --steps need the same number of entries")
        done = evaluated(args.base)
        for size, n_steps in zip(sizes, steps):
            out = adapter_dir(args.base, size, n_steps, args.seed)
            if not (out / "tad_manifest.json").is_file():
                tad("train", "--base", args.base, "--datasets", ",".join(SETS), "--format", "llm-adapters",
                    "--train-size", str(size), "--steps", str(n_steps), "--seed", str(args.seed),
                    "--threads", str(args.threads), "--no-progress", "--out", str(out))
            for name in sets:
                if (out.name, name) in done:
                    continue  # evaluated in an earlier invocation (the DB has its runs)
                strategy_args = [x for s in STRATEGIES for x in ("-s", s)]
                tad("run", "--base", args.base, "--adapter", str(out), "--adapter-name", out.name,
                    "--dataset", name, "--split", "val", "--limit", str(args.limit), "--format", "llm-adapters",
                    "--max-new-tokens", "12", "--batch-size", str(args.batch_size), *strategy_args,
                    env={"TAD_CALIBRATION_SAMPLES": str(args.calibration_samples)})
    from services.db.session import session_scope
    from services.study import markdown_tables, study_cells

    with session_scope() as s:
        cells = study_cells(s, base=args.base, fmt="llm-adapters@1")
    print("\n".join(markdown_tables(cells, sets)))


if __name__ == "__main__":
    main()
