"""Accuracy study: does TaD (and each baseline) beat plain fine-tuned decoding on a dataset, with statistics?

For each dataset named, through the real CLI (so the runs land in the results DB and the dashboard shows them):
1. `tad train` a LoRA adapter on the dataset's train split (reused when it exists);
2. `tad run` ft, base, a TaD alpha sweep, tad_log, contrastive, dola and svdecode on the validation split,
   once with the literal definitions and once with `--mc-floor` (a finite log-prob for an excluded token);
3. print one markdown table per (dataset, scoring): acc ± stderr, acc_norm, fixed/broken vs ft, exact McNemar p
   (raw and Holm-adjusted over the job's comparisons), and how many samples had every choice at -inf (the literal definitions' ties, decided by choice 0).

    python bench/study_accuracy.py --dataset arc_easy --dataset openbookqa [--limit 300] [--steps 200]

The adapter is the demo's recipe (LoRA r=8, `--train-size 500`, seed 0) unless told otherwise. Whether TaD wins is
the finding this prints, not something tuned for.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tad_core.paths import cache_subdir  # noqa: E402

STRATEGIES = ["ft", "base", "tad:alpha=0.25,0.5,1,2,4", "tad_log", "contrastive", "dola", "svdecode"]


def tad(*args: str, capture: bool = False) -> str:
    cmd = [str(Path(sys.executable).with_name("tad")), *args]
    print("$ tad " + " ".join(args), file=sys.stderr, flush=True)
    res = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return res.stdout or ""


def all_inf(samples: list[dict]) -> int:
    """Samples whose every choice scored -inf (stored as None / non-finite)."""
    def dead(v: object) -> bool:
        return v is None or (isinstance(v, float) and not math.isfinite(v))
    return sum(1 for r in samples if r.get("scores") and all(dead(v) for v in r["scores"]))


def table(payload: dict, title: str) -> list[str]:
    lines = [f"**{title}**", "", "| strategy | acc ± stderr | acc_norm | fixed/broken vs ft | McNemar p | Holm p | "
             "all choices -inf |", "|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(["ft", "base", "tad", "tad_log", "contrastive", "dola", "svdecode"])}
    rows = sorted(payload["leaderboard"], key=lambda r: (order.get(r["strategy"], 99), r["key"]))
    for r in rows:
        key = r["key"] + (f" (mu={r['info']['mu']:.3g})" if "mu" in (r.get("info") or {}) else "")
        vs = f"{r['fixed']}/{r['broken']}" if r["fixed"] is not None else "-"
        p = "-" if r["mcnemar_p"] is None else f"{r['mcnemar_p']:.2g}"
        holm = "-" if r["mcnemar_p_holm"] is None else f"{r['mcnemar_p_holm']:.2g}"
        lines.append(f"| {key} | {r['acc']:.3f} ± {r['acc_stderr']:.3f} | {r['acc_norm']:.3f} | {vs} | {p} | {holm} | "
                     f"{all_inf(payload['samples'][r['key']])} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", action="append", required=True)
    ap.add_argument("--base", default="smollm2-135m-instruct", help="registered base model or local model dir")
    ap.add_argument("--limit", type=int, default=300, help="first N validation samples")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--train-size", type=int, default=500)
    ap.add_argument("--floor", type=float, default=-1000.0, help="the --mc-floor of the second run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adapter", action="append", default=[], metavar="DATASET=DIR",
                    help="use this trained adapter for DATASET (e.g. the demo's) instead of training one")
    args = ap.parse_args()
    given = dict(a.split("=", 1) for a in args.adapter)
    out: list[str] = []
    for ds in args.dataset:
        tag = "" if args.base == "smollm2-135m-instruct" else f"{Path(args.base).name}-"
        adapter = Path(given[ds]) if ds in given else (
            cache_subdir("adapters") / f"study-{tag}{ds}-lora-{args.steps}steps-{args.train_size}")
        if not (adapter / "tad_manifest.json").exists():
            tad("train", "--base", args.base, "--dataset", ds, "--method", "lora", "--steps", str(args.steps),
                "--train-size", str(args.train_size), "--seed", "0", "--threads", str(args.threads), "--out", str(adapter))
        manifest = json.loads((adapter / "tad_manifest.json").read_text())
        steps, size = manifest["steps"], manifest["train_size"]
        common = ["run", "--base", args.base, "--adapter", str(adapter), "--adapter-name", f"study-{tag}{ds}-lora",
                  "--dataset", ds, "--split", "val", "--limit", str(args.limit), "--json"]
        for s in STRATEGIES:
            common += ["--strategy", s]
        for label, extra in (("literal", []), (f"--mc-floor {args.floor:g}", ["--mc-floor", str(args.floor)])):
            payload = json.loads(tad(*common, *extra, capture=True))
            out += table(payload, f"{args.base}: {ds} val (first {payload['job']['n_samples']}), LoRA {steps} steps on "
                                  f"{size} {manifest['dataset']} train samples (mean loss of the last 10 steps "
                                  f"{manifest['mean_loss_last_10']:.2f}), "
                                  f"job {payload['job']['id']}, {label}") + [""]
            print("\n".join(out[-(len(payload['leaderboard']) + 5):]), flush=True)
    print("\n".join(out))


if __name__ == "__main__":
    main()
