"""A stored job as lm-evaluation-harness 0.4 output, so tooling that reads lm-eval runs reads ours.

lm-eval writes `OUTPUT/<model>/results_<date>.json` and `OUTPUT/<model>/samples_<task>_<date>.jsonl`; here each
strategy of the job plays the model (the task keeps its name, so two strategies' sample files pair up by task
and `doc_id` exactly as two lm-eval runs do). The sample records follow `lm_eval.evaluator.evaluate` + the
`EvaluationTracker.save_results_samples` serialisation: `arguments` as `{"gen_args_<i>": {"arg_<j>": ...}}`,
`target` as a string, `resps` / `filtered_resps`, the metric values, `doc_hash` / `prompt_hash` / `target_hash`
(sha256 of the document as indented JSON, of the first request's context, of the target).

What we do not have is written as null rather than invented: the `is_greedy` flag of a log-likelihood
response. An excluded choice's log-likelihood (-inf) is written as `-Infinity`, as Python's json (and so lm-eval)
writes it. Metric values come from the stored per-sample rows, not recomputed.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from services.settings import Settings

LMEVAL_LAYOUT_VERSION = "0.4"
INVALID = "[invalid]"  # lm-eval's RegexFilter fallback: what an unparsed output is filtered to


class ExportError(ValueError):
    """The job cannot be written as lm-eval output (the message says why)."""


@dataclass(frozen=True)
class ExportedRun:
    """One strategy's files."""

    key: str
    directory: Path
    results: Path
    samples: Path


def hash_string(text: str) -> str:
    """lm-eval's `hash_string`: the sha256 hex digest of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def date_id(now: datetime) -> str:
    """lm-eval's file date: ISO time (no zone) with `:` replaced (`2026-11-30T13-05-12.123456`)."""
    return now.replace(tzinfo=None).isoformat().replace(":", "-")


def _dir_name(label: str) -> str:
    """A strategy label as a directory name (lm-eval sanitises model names the same way: no path separators)."""
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", label).strip("_") or "run"


def _doc(sample: dict[str, Any]) -> dict[str, Any]:
    """The lm-eval document: the original row for imported lm-eval tasks, else our canonical sample."""
    meta = sample.get("metadata") or {}
    if "lmeval" in meta and isinstance(meta.get("doc"), dict):
        return meta["doc"]
    return {k: v for k, v in sample.items() if k != "metadata"}


def _score(value: float | None) -> float:
    return float("-inf") if value is None else float(value)


def _mc_record(sample: Any, row: dict[str, Any]) -> dict[str, Any]:
    pairs = sample.contexts_and_continuations()
    scores = row.get("scores") or []
    if len(scores) != len(pairs):
        raise ExportError(f"sample {sample.id!r}: {len(scores)} stored scores for {len(pairs)} choices")
    responses = [[_score(s), None] for s in scores]
    return {
        "target": sample.answer,
        "arguments": [[ctx, cont] for ctx, cont in pairs],
        "resps": [[r] for r in responses],
        "filtered_resps": responses,
        "acc": 1.0 if row["correct"] else 0.0,
        "acc_norm": 1.0 if row["correct_norm"] else 0.0,
    }


def _gen_record(sample: Any, row: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    until = list(dict.fromkeys([*sample.stop, *(config.get("stop") or [])]))
    gen_kwargs = {"until": until, "do_sample": float(config.get("temperature") or 0.0) > 0,
                  "temperature": float(config.get("temperature") or 0.0),
                  "max_gen_toks": int(config.get("max_new_tokens") or 0)}
    output = row.get("output") or ""
    extracted = row.get("extracted")
    return {
        "target": sample.reference,
        "arguments": [[sample.prompt, gen_kwargs]],
        "resps": [[output]],
        "filtered_resps": [INVALID if extracted is None else extracted],
        "exact_match": 1.0 if row["correct"] else 0.0,
    }


def filter_key(raw: dict[str, Any]) -> str:
    """The lm-eval filter name the metrics are reported under (`exact_match,<filter>`): the imported task's."""
    return str(((raw.get("metadata") or {}).get("lmeval") or {}).get("filter") or "none")


def sample_record(doc_id: int, raw: dict[str, Any], rendered: Any, row: dict[str, Any],
                  config: dict[str, Any]) -> dict[str, Any]:
    """One line of `samples_<task>_<date>.jsonl`, serialised as lm-eval's tracker writes it."""
    body = _mc_record(rendered, row) if rendered.kind == "mc" else _gen_record(rendered, row, config)
    doc = _doc(raw)
    metrics = [m for m in ("acc", "acc_norm", "exact_match") if m in body]
    first_ctx = body["arguments"][0][0]
    target = body.pop("target")
    lm = (raw.get("metadata") or {}).get("lmeval") or {}
    if "target" in lm:  # an imported task: lm-eval's own doc_to_target value (a choice text stays text)
        target = lm["target"]
    record = {
        "doc_id": doc_id,
        "doc": doc,
        "target": str(target),
        "arguments": {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(args)}
                      for i, args in enumerate(body.pop("arguments"))},
        "resps": body.pop("resps"),
        "filtered_resps": body.pop("filtered_resps"),
        "filter": filter_key(raw) if rendered.kind == "gen" else "none",
        "metrics": metrics,
        "doc_hash": hash_string(json.dumps(doc, indent=2, default=str, ensure_ascii=False)),
        "prompt_hash": hash_string(first_ctx),
        "target_hash": hash_string(str(target)),
        **body,
    }
    return record


def _rendered_samples(raw: list[dict[str, Any]], config: dict[str, Any], dataset: str) -> list[Any]:
    """The samples as the engine evaluated them (the job's prompt format applied), for the request arguments."""
    from tad_core.formats import Chat, format_context, parse_format
    from tad_core.samples import Sample

    samples = [Sample.from_dict(s) for s in raw]
    fmt = parse_format(config.get("format") or "mc-loglik")
    if isinstance(fmt, Chat):
        raise ExportError("jobs in the chat format render with the model's tokenizer; export them with --json")
    ctx = format_context(fmt, dataset, samples)
    return [fmt.render(s, ctx) for s in samples]


def _task_config(task: str, raw: list[dict[str, Any]], kind: str, dataset_source: str, split: str) -> dict[str, Any]:
    lm = (raw[0].get("metadata") or {}).get("lmeval", {}) if raw else {}
    return {
        "task": task,
        "dataset_path": dataset_source,
        "test_split": split,
        "output_type": "multiple_choice" if kind == "mc" else "generate_until",
        "target_delimiter": " ",
        "num_fewshot": int(lm.get("num_fewshot", 0)),
        "metric_list": ([{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                         {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}] if kind == "mc"
                        else [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]),
        "metadata": {"version": lm.get("version")},
    }


def export_job(settings: Settings, job_id: int, out_dir: str | Path, now: datetime | None = None) -> list[ExportedRun]:
    """Write every strategy of a job as lm-eval output under `out_dir/<strategy>/`; return what was written."""
    from services.db import store
    from services.db.session import session_scope

    now = now or datetime.now(timezone.utc)
    with session_scope(settings) as s:
        job = store.get_job(s, job_id)
        dataset = store.get_dataset(s, job.dataset_id)
        raw = store.load_samples(s, job.dataset_id, 0, job.n_samples)
        board = store.leaderboard(s, job_ids=[job_id])
        rows = {r.run_id: store.sample_rows(s, r.run_id) for r in board}
    config = job.spec.get("config") or {}
    rendered = _rendered_samples(raw, config, dataset.name)
    kinds = {x.kind for x in rendered}
    if len(kinds) != 1:
        raise ExportError(f"job {job_id}: a dataset mixing multiple-choice and generation samples is not one lm-eval "
                          "task")
    kind = kinds.pop()
    task = dataset.name
    task_config = _task_config(task, raw, kind, dataset.source, dataset.split)
    n_shot = task_config["num_fewshot"]
    fkey = filter_key(raw[0]) if raw and kind == "gen" else "none"
    stamp = date_id(now)
    written = []
    for r in board:
        directory = Path(out_dir) / _dir_name(r.label)
        directory.mkdir(parents=True, exist_ok=True)
        records = [sample_record(row["sample_index"], raw[row["sample_index"]], rendered[row["sample_index"]], row,
                                 config) for row in rows[r.run_id]]
        samples_path = directory / f"samples_{task}_{stamp}.jsonl"
        samples_path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in records), encoding="utf-8")
        metrics = ({"acc,none": r.acc, "acc_stderr,none": r.acc_stderr, "acc_norm,none": r.acc_norm,
                    "acc_norm_stderr,none": r.acc_norm_stderr} if kind == "mc"
                   else {f"exact_match,{fkey}": r.acc, f"exact_match_stderr,{fkey}": r.acc_stderr})
        results = {
            "results": {task: {"alias": task, **metrics}},
            "group_subtasks": {task: []},
            "configs": {task: task_config},
            "versions": {task: task_config["metadata"]["version"]},
            "n-shot": {task: n_shot},
            "higher_is_better": {task: {m: True for m in (("acc", "acc_norm") if kind == "mc" else ("exact_match",))}},
            "n-samples": {task: {"original": dataset.n_rows, "effective": len(records)}},
            "config": {
                "model": "tad-eval",
                "model_args": f"base={job.spec.get('base')},adapter={job.spec.get('adapter_label')},"
                              f"finetuned={job.spec.get('finetuned')},strategy={r.label}",
                "batch_size": config.get("batch_size"), "batch_sizes": [], "device": None, "use_cache": None,
                "limit": job.spec.get("limit"), "bootstrap_iters": 0, "gen_kwargs": None,
                "random_seed": config.get("seed"), "numpy_seed": config.get("seed"),
                "torch_seed": config.get("seed"), "fewshot_seed": None,
            },
            "git_hash": None,
            "date": now.timestamp(),
            "model_name": r.label,
            "model_name_sanitized": directory.name,
            "tad": {"job_id": job.id, "run_id": r.run_id, "strategy": r.strategy, "params": r.params,
                    "key": r.key, "variant": r.variant, "job_status": job.status, "dataset_content_hash":
                    dataset.content_hash, "format": config.get("format"), "mcnemar_p_vs_ft": r.mcnemar_p,
                    "mcnemar_p_holm": r.mcnemar_p_holm, "lmeval_layout": LMEVAL_LAYOUT_VERSION},
        }
        results_path = directory / f"results_{stamp}.json"
        results_path.write_text(json.dumps(results, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(ExportedRun(r.label, directory, results_path, samples_path))
    return written
