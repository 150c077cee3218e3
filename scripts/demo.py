"""`make demo`: the main job on the embedded default, end to end, through the real CLI.

1. train (or reuse) a LoRA adapter on ARC-Easy with `tad train`;
2. `tad run` (in-process, SQLite in the cache) evaluates ft, base, a TaD alpha sweep, tad_log, contrastive and
   the two baselines dola and svdecode (calibrated on 128 ARC-Easy train samples, once) on ARC-Easy validation
   samples, streaming per-sample results into the DB, and prints the leaderboard with stderr
   and the McNemar p-value of each strategy against ft;
3. prints the command that opens the dashboard on these results.
Environment knobs: TAD_DEMO_LIMIT (samples, default 300), TAD_DEMO_STEPS (training steps, default 200).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tad_core.paths import cache_subdir


def tad(*args: str) -> None:
    cmd = [str(Path(sys.executable).with_name("tad")), *args]
    print("$ tad " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    limit = os.environ.get("TAD_DEMO_LIMIT", "300")
    steps = os.environ.get("TAD_DEMO_STEPS", "200")
    adapter = cache_subdir("adapters") / f"demo-arc_easy-lora-{steps}steps"
    t0 = time.time()
    if (adapter / "tad_manifest.json").exists():
        print(f"reusing the demo adapter {adapter}")
    else:
        tad("train", "--dataset", "arc_easy", "--method", "lora", "--steps", steps, "--train-size", "500",
            "--seed", "0", "--threads", "2", "--out", str(adapter))
    tad("run", "--base", "smollm2-135m-instruct", "--adapter", str(adapter), "--adapter-name", "demo-arc_easy-lora",
        "--dataset", "arc_easy", "--split", "val", "--limit", limit,
        "--strategy", "ft", "--strategy", "base", "--strategy", "tad:alpha=0.25,0.5,1,2,4",
        "--strategy", "tad_log", "--strategy", "contrastive", "--strategy", "dola", "--strategy", "svdecode")
    print(f"\ndemo finished in {time.time() - t0:.0f} s. Open the dashboard on these results with:\n"
          f"  .venv/bin/tad dashboard    (or: make dashboard)\n")


if __name__ == "__main__":
    main()
