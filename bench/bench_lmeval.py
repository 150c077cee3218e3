"""Our `base` vs lm-evaluation-harness' `hf` backend on the embedded model and a real task, side by side in one run.

Both score the same requests (ARC-Easy validation from the cached data, written as a local lm-eval task YAML over
the cached JSONL, zero-shot): per-sample agreement (max |delta log-likelihood| over every choice, acc and acc_norm
per sample) and the wall time of each evaluation with the model already loaded, same batch size, same threads.
The samples are cut in two halves timed in ABBA order (ours, lm-eval, lm-eval, ours) after a warm-up of each, so
a change in machine load during the run hits both alike.
lm-eval runs through its Python API (`simple_evaluate`, `log_samples=True`) offline on the fp32 safetensors
directory `tad fetch` converted into the cache.

Note on batch size: lm-eval batches *requests* (one per choice), we batch *samples* (all choices of a sample in
one forward); `--batch-size` is passed to both as it is, as a user would.

    python bench/bench_lmeval.py [--limit 570] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=570, help="first N validation samples (570: all)")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="tad_bench_lmeval_"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf_datasets"))

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tad_core.datasets import load_dataset
    from tad_core.paths import cache_subdir
    from tad_core.evaluate import EvalConfig, evaluate
    from tad_core.models import DEFAULT_BASE, load_pair, resolve_base_dir

    model_dir = resolve_base_dir(DEFAULT_BASE)
    data = load_dataset("arc_easy", "val", limit=args.limit)
    lines = (cache_subdir("datasets") / "arc_easy" / "val.jsonl").read_text().splitlines()[:len(data.samples)]
    half = len(lines) // 2
    parts = {"warmup": (0, 4), "a": (0, half), "b": (half, len(lines))}
    for name, (lo, hi) in parts.items():
        (work / f"{name}.jsonl").write_text("\n".join(lines[lo:hi]) + "\n")
        (work / f"{name}.yaml").write_text(TASK_YAML.format(task=f"bench_arc_easy_{name}", data=work / f"{name}.jsonl"))
    print(f"machine: {machine()}; model {model_dir}; {len(data.samples)} ARC-Easy val samples; "
          f"batch size {args.batch_size}")

    t0 = time.perf_counter()
    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=args.batch_size)
    t_load_theirs = time.perf_counter() - t0
    t0 = time.perf_counter()
    pair = load_pair(DEFAULT_BASE)
    t_load_ours = time.perf_counter() - t0
    manager = TaskManager(include_path=str(work))
    cfg = EvalConfig(batch_size=args.batch_size)

    def ours(name: str) -> tuple[list, float]:
        lo, hi = parts[name]
        t = time.perf_counter()
        rep = evaluate(pair, data.samples[lo:hi], ["base"], cfg, progress=False)
        return rep.results, time.perf_counter() - t

    def theirs(name: str) -> tuple[list, float]:
        t = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=[f"bench_arc_easy_{name}"], log_samples=True,
                                      task_manager=manager, batch_size=args.batch_size)
        elapsed = time.perf_counter() - t
        assert res is not None
        return sorted(res["samples"][f"bench_arc_easy_{name}"], key=lambda r: r["doc_id"]), elapsed

    ours("warmup"), theirs("warmup")
    ours_a, t_ours_a = ours("a")
    theirs_a, t_theirs_a = theirs("a")
    theirs_b, t_theirs_b = theirs("b")
    ours_b, t_ours_b = ours("b")
    results, rows = ours_a + ours_b, theirs_a + theirs_b
    t_ours, t_theirs = t_ours_a + t_ours_b, t_theirs_a + t_theirs_b

    assert len(rows) == len(results) == len(data.samples), (len(rows), len(results))
    max_delta, same_requests, acc_diff, norm_diff = 0.0, 0, 0, 0
    for row, sample, res in zip(rows, data.samples, results):
        same_requests += [tuple(a[:2]) for a in row["arguments"]] == list(sample.contexts_and_continuations())
        o = res.outcomes["base"]
        lls = [r[0][0] for r in row["resps"]]
        max_delta = max(max_delta, *(abs(a - b) for a, b in zip(o.scores, lls)))
        acc_diff += bool(o.correct) != bool(row["acc"])
        norm_diff += bool(o.correct_norm) != bool(row["acc_norm"])
    n = len(rows)

    def mean(xs: list) -> float:
        return sum(map(float, xs)) / len(xs)

    print(f"identical requests (context, continuation of every choice): {same_requests}/{n}")
    print(f"max |delta loglik| over every choice: {max_delta:.3g}")
    print(f"samples whose acc / acc_norm differ: {acc_diff} / {norm_diff}")
    print(f"{'':>10} {'acc':>8} {'acc_norm':>9} {'eval s (a+b)':>16} {'load s':>7}")
    print(f"{'tad base':>10} {mean([r.outcomes['base'].correct for r in results]):8.4f} "
          f"{mean([r.outcomes['base'].correct_norm for r in results]):9.4f} "
          f"{t_ours:7.1f} ({t_ours_a:.0f}+{t_ours_b:.0f}) {t_load_ours:7.1f}")
    print(f"{'lm-eval hf':>10} {mean([r['acc'] for r in rows]):8.4f} {mean([r['acc_norm'] for r in rows]):9.4f} "
          f"{t_theirs:7.1f} ({t_theirs_a:.0f}+{t_theirs_b:.0f}) {t_load_theirs:7.1f}")
    print(f"wall-time ratio ours / lm-eval (evaluation, model loaded): {t_ours / t_theirs:.2f} "
          f"(half a: {t_ours_a / t_theirs_a:.2f}, half b: {t_ours_b / t_theirs_b:.2f}); "
          f"torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
