"""lm-evaluation-harness task YAML -> canonical samples, from local files only.

Teams already describe their tasks as lm-eval YAML; this reads one (with its `include`s) and renders every
document of one split into our canonical `Sample`s the way lm-eval 0.4 builds its requests, so a task runs here
without a hand-written conversion script and without losing its templates, few-shot demonstrations, stop
sequences or answer filters:

- `doc_to_text` / `doc_to_choice` / `doc_to_target`: a document field name (when the string is a column of the
  data) or else a Jinja template (StrictUndefined, `regex_replace` filter, as lm-eval); `doc_to_choice` may also
  be a YAML list; a multiple-choice target is an int index, or a string that is a choice index or a choice text.
- few-shot: `num_fewshot` demonstrations `doc_to_text + target_delimiter + target + fewshot_delimiter` before the
  document, drawn from `fewshot_split` (else `training_split`, else `validation_split`) by `fewshot_config.sampler`
  `first_n` or `default` (Python's `random.Random(seed).sample`, one generator over the documents in order, and
  one extra draw and the document itself dropped if `fewshot_split == test_split`, also when neither is set, as
  lm-eval 0.4 passes the document to its ContextSampler; seed = lm-eval's `--fewshot_random_seed`, default 1234).
- `generate_until`: `generation_kwargs.until` (default `[fewshot_delimiter]`) becomes the sample's `stop`; one
  `filter_list` pipeline of `regex` (+ `take_first`) becomes `answer_pattern` with `extract: first-match`;
  without a filter the whole (stripped) output is the answer.
- data: `dataset_path: json` or `csv` with `dataset_kwargs.data_files` (paths relative to the YAML that names
  them). Anything that needs the Hugging Face Hub, Python code (`!function`), or a key we do not implement is an
  `LmEvalTaskError` naming the key: a wrong evaluation under silent defaults is worse than a refusal.

Differences that remain are listed in `TaskConversion.notes` (e.g. our exact match strips and ignores case).
"""
from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tad_core.datasets.validate import jsonl_lines
from tad_core.samples import Sample

LMEVAL_PREFIX = "lmeval:"
DEFAULT_FEWSHOT_SEED = 1234  # lm-eval's --fewshot_random_seed default
WHOLE_OUTPUT_PATTERN = r"(?s)^(.*)$"  # no filter: lm-eval scores the whole response
MAX_DATA_FILE_BYTES = 50_000_000  # as DatasetLimits.max_bytes for a canonical file

_ACCEPTED_KEYS = frozenset({
    "task", "task_alias", "tag", "group", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
    "validation_split", "test_split", "fewshot_split", "output_type", "doc_to_text", "doc_to_choice",
    "doc_to_target", "description", "target_delimiter", "fewshot_delimiter", "num_fewshot", "fewshot_config",
    "generation_kwargs", "filter_list", "metric_list", "metadata", "repeats", "should_decontaminate",
    "doc_to_decontamination_query",
})
_REFUSED_KEYS = {  # known lm-eval keys whose behaviour we do not implement: say why rather than ignore them
    "process_docs": "runs Python code on the documents",
    "process_results": "runs Python code to score",
    "use_prompt": "needs promptsource templates",
    "gen_prefix": "is not implemented here",
    "fewshot_as_multiturn": "is not implemented here",
    "apply_chat_template": "is not implemented here (use `--format chat`)",
    "unsafe_code": "runs code",
    "custom_dataset": "runs Python code to load data",
    "class": "names a Python task class",
}
_MC_METRICS = {"acc", "acc_norm"}
_GEN_METRICS = {"exact_match"}
_OUTPUT_TYPES = ("multiple_choice", "generate_until")


class LmEvalTaskError(ValueError):
    """The task YAML cannot be converted; `key` is the (dotted) YAML key at fault, named first in the message."""

    def __init__(self, key: str, message: str, source: str | Path | None = None):
        self.key = key
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}")


@dataclass(frozen=True)
class SourceFile:
    """A file the conversion read (a task YAML, an included YAML, a data file) and its sha256."""

    role: str
    path: str
    sha256: str


@dataclass(frozen=True)
class TaskConversion:
    """The samples of one split of one task, and everything that identifies where they came from."""

    task: str
    split: str
    output_type: str
    samples: list[Sample] = field(repr=False)
    num_fewshot: int
    yaml_path: str
    yaml_sha256: str
    sources: tuple[SourceFile, ...]
    config: dict[str, Any] = field(repr=False)
    notes: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        """The label stored with the dataset: the YAML and its hash."""
        return f"{LMEVAL_PREFIX}{self.yaml_path} sha256={self.yaml_sha256}"


# ---------------------------------------------------------------------------------------------------------------
# YAML with includes


class _Function:
    """A `!function module.name` value: Python code we refuse to run (the key that holds it is named)."""

    def __init__(self, ref: str):
        self.ref = ref


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _find_include(name: str, here: Path, include_paths: Sequence[Path], source: Path) -> Path:
    """An include resolves as lm-eval does (absolute, or next to the including YAML), then in each include path."""
    candidates = [Path(name)] if Path(name).is_absolute() else [here / name, *(Path(d) / name for d in include_paths)]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise LmEvalTaskError("include", f"{name!r} not found (looked at {looked}; add a directory with --include-path)",
                          source)


def _resolve_data_files(value: Any, here: Path, source: Path) -> Any:
    """Data file paths are relative to the YAML that names them (so an included base config can hold them)."""
    def one(p: Any, key: str) -> str:
        if not isinstance(p, str) or not p:
            raise LmEvalTaskError(key, f"must be a file path, got {p!r}", source)
        if "://" in p:
            raise LmEvalTaskError(key, f"{p!r} is remote; only local files are read", source)
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (here / path).resolve())

    key = "dataset_kwargs.data_files"
    if isinstance(value, dict):
        return {str(k): ([one(x, f"{key}.{k}") for x in v] if isinstance(v, list) else one(v, f"{key}.{k}"))
                for k, v in value.items()}
    if isinstance(value, list):
        return [one(x, key) for x in value]
    return one(value, key)


def load_task_config(path: str | Path, include_paths: Sequence[str | Path] = (),
                     _seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[SourceFile]]:
    """The task's configuration after `include` resolution (lm-eval's shallow merge: the including file's keys
    win; of several includes the first listed wins) and every YAML read, with its hash."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmEvalTaskError("task YAML", f"{str(path)!r} not found or not a regular file")
    path = path.resolve()
    if path in _seen:
        raise LmEvalTaskError("include", f"include cycle: {' -> '.join(str(p) for p in (*_seen, path))}", path)
    data = path.read_bytes()
    try:
        config = yaml.load(data.decode("utf-8"), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LmEvalTaskError("YAML", f"not valid YAML: {e}", path) from None
    if not isinstance(config, dict):
        raise LmEvalTaskError("YAML", f"expected a mapping of task keys, got {type(config).__name__}", path)
    sources = [SourceFile("yaml" if not _seen else "include", str(path), _sha256(data))]
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        config["dataset_kwargs"] = {**kwargs, "data_files": _resolve_data_files(kwargs["data_files"], path.parent, path)}
    includes = config.pop("include", None)
    if includes is None:
        return config, sources
    names = [includes] if isinstance(includes, str) else includes
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LmEvalTaskError("include", "must be a file name or a list of file names", path)
    merged: dict[str, Any] = {}
    for name in reversed(names):
        sub, sub_sources = load_task_config(_find_include(name, path.parent, [Path(d) for d in include_paths], path),
                                            include_paths, (*_seen, path))
        merged.update(sub)
        sources.extend(sub_sources)
    merged.update(config)
    return merged, sources


# ---------------------------------------------------------------------------------------------------------------
# Checking the configuration


@dataclass(frozen=True)
class _Task:
    """The checked configuration, with lm-eval's defaults made explicit."""

    name: str
    output_type: str
    data_files: dict[str, list[str]]
    file_format: str
    test_split: str | None
    validation_split: str | None
    training_split: str | None
    fewshot_split: str | None
    doc_to_text: str
    doc_to_choice: Any
    doc_to_target: Any
    description: str
    target_delimiter: str
    fewshot_delimiter: str
    num_fewshot: int
    sampler: str
    until: tuple[str, ...]
    filter_pattern: str | None
    filter_name: str
    version: Any
    notes: tuple[str, ...]


def _need(config: dict[str, Any], key: str, kind: type | tuple[type, ...], source: Path) -> Any:
    if key not in config or config[key] is None:
        raise LmEvalTaskError(key, "missing (required)", source)
    value = config[key]
    if isinstance(value, _Function):
        raise LmEvalTaskError(key, f"!function {value.ref} runs Python code; only field names and Jinja templates "
                                   "are supported", source)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise LmEvalTaskError(key, f"must be {_kind_name(kind)}, got {type(value).__name__}", source)
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({str: "a string", int: "an integer", list: "a list", dict: "a mapping"}.get(k, k.__name__)
                       for k in kinds)


def _opt(config: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any, source: Path) -> Any:
    return default if config.get(key) is None else _need(config, key, kind, source)


def _check_keys(config: dict[str, Any], source: Path) -> None:
    for key, value in config.items():
        if isinstance(value, _Function):
            raise LmEvalTaskError(key, f"!function {value.ref} runs Python code, which is not supported", source)
        if key in _REFUSED_KEYS:
            raise LmEvalTaskError(key, f"not supported: it {_REFUSED_KEYS[key]}", source)
        if key not in _ACCEPTED_KEYS:
            raise LmEvalTaskError(key, f"unknown or unsupported task key (supported: {', '.join(sorted(_ACCEPTED_KEYS))})",
                                  source)
    if isinstance(config.get("task"), list) or isinstance(config.get("group"), list):
        raise LmEvalTaskError("task", "a group of tasks; convert each task YAML on its own", source)
    if config.get("repeats", 1) != 1:
        raise LmEvalTaskError("repeats", f"only 1 is supported, got {config['repeats']!r}", source)
    if config.get("should_decontaminate"):
        raise LmEvalTaskError("should_decontaminate", "decontamination is not implemented; set it false", source)


def _data_files(config: dict[str, Any], source: Path) -> tuple[str, dict[str, list[str]]]:
    dataset_path = _need(config, "dataset_path", str, source)
    if dataset_path not in ("json", "csv"):
        raise LmEvalTaskError("dataset_path", f"{dataset_path!r} needs the Hugging Face Hub (or a loading script); "
                              "only local files are read here: dataset_path: json or csv with "
                              "dataset_kwargs.data_files", source)
    if config.get("dataset_name") is not None:
        raise LmEvalTaskError("dataset_name", f"must be null for dataset_path {dataset_path!r}, got "
                              f"{config['dataset_name']!r}", source)
    kwargs = _need(config, "dataset_kwargs", dict, source)
    for key in kwargs:
        if key != "data_files":
            raise LmEvalTaskError(f"dataset_kwargs.{key}", "not supported (only data_files)", source)
    if kwargs.get("data_files") is None:
        raise LmEvalTaskError("dataset_kwargs.data_files", "missing (the local data files, by split)", source)
    files = kwargs["data_files"]
    by_split = files if isinstance(files, dict) else {"train": files}  # the `datasets` library's convention
    return dataset_path, {split: (v if isinstance(v, list) else [v]) for split, v in by_split.items()}


def _fewshot(config: dict[str, Any], source: Path) -> tuple[int, str]:
    num = _opt(config, "num_fewshot", int, 0, source)
    if num < 0:
        raise LmEvalTaskError("num_fewshot", f"must be >= 0, got {num}", source)
    fc = _opt(config, "fewshot_config", dict, {}, source)
    for key in fc:
        if key != "sampler":
            raise LmEvalTaskError(f"fewshot_config.{key}", "not supported (only sampler: first_n or default)", source)
    sampler = fc.get("sampler", "default")
    if sampler not in ("default", "first_n"):
        raise LmEvalTaskError("fewshot_config.sampler", f"{sampler!r} not supported (first_n or default)", source)
    return num, sampler


def _generation(config: dict[str, Any], fewshot_delimiter: str, source: Path) -> tuple[str, ...]:
    """Stop sequences; lm-eval's default is the few-shot delimiter. Other settings must agree with greedy
    decoding (a job's own options set sampling and length)."""
    kwargs = _opt(config, "generation_kwargs", dict, None, source)
    if kwargs is None:
        return (fewshot_delimiter,)
    for key, value in kwargs.items():
        if key == "until":
            continue
        if key == "do_sample" and value is False:
            continue
        if key == "temperature" and isinstance(value, (int, float)) and float(value) == 0.0:
            continue
        hint = " (set the length per job with --max-new-tokens)" if key in ("max_gen_toks", "max_new_tokens") else ""
        raise LmEvalTaskError(f"generation_kwargs.{key}", f"{value!r} not supported: generation here is greedy; "
                              f"only until, do_sample: false and temperature: 0 are read{hint}", source)
    until = kwargs.get("until", [fewshot_delimiter])
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, list) or not all(isinstance(u, str) and u for u in until):
        raise LmEvalTaskError("generation_kwargs.until", "must be a string or a list of non-empty strings", source)
    return tuple(until)


def _filters(config: dict[str, Any], output_type: str, filter_name: str | None,
             source: Path) -> tuple[str | None, str]:
    """The regex of the one `regex` (+ `take_first`) filter pipeline and its name; (None, "none") without one."""
    pipelines = _opt(config, "filter_list", list, [], source)
    if not pipelines:
        if filter_name is not None:
            raise LmEvalTaskError("filter_list", f"no filter named {filter_name!r}: the task has none", source)
        return None, "none"
    if output_type != "generate_until":
        raise LmEvalTaskError("filter_list", "filters apply to generate_until tasks only", source)
    names = [p.get("name") if isinstance(p, dict) else None for p in pipelines]
    if filter_name is not None:
        if filter_name not in names:
            raise LmEvalTaskError("filter_list", f"no filter named {filter_name!r} (have: {names})", source)
        chosen = pipelines[names.index(filter_name)]
    elif len(pipelines) > 1:
        raise LmEvalTaskError("filter_list", f"{len(pipelines)} filter pipelines ({names}); one is scored here: keep "
                              "one or choose it (tad data import-lmeval --filter NAME)", source)
    else:
        chosen = pipelines[0]
    if not isinstance(chosen, dict) or not isinstance(chosen.get("filter"), list):
        raise LmEvalTaskError("filter_list", "each entry needs a `filter` list of functions", source)
    pattern = None
    for i, step in enumerate(chosen["filter"]):
        key = f"filter_list.{chosen.get('name', 0)}.filter[{i}]"
        fn = step.get("function") if isinstance(step, dict) else None
        if fn == "take_first" and set(step) == {"function"}:
            continue
        if fn != "regex" or pattern is not None:
            raise LmEvalTaskError(key, f"function {fn!r} not supported (one regex, then take_first)", source)
        for k in step:
            if k not in ("function", "regex_pattern", "group_select", "fallback"):
                raise LmEvalTaskError(f"{key}.{k}", "not supported (regex_pattern, group_select: 0, fallback)", source)
        if step.get("group_select", 0) != 0:
            raise LmEvalTaskError(f"{key}.group_select", f"{step['group_select']!r} not supported (0: the first "
                                  "match)", source)
        pattern = step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)")  # lm-eval's RegexFilter default
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise LmEvalTaskError(f"{key}.regex_pattern", f"not a valid regular expression: {e}", source) from None
    if pattern is None:
        raise LmEvalTaskError("filter_list", "the pipeline has no regex filter", source)
    return pattern, str(chosen.get("name", "none"))


def _metrics(config: dict[str, Any], output_type: str, source: Path) -> list[str]:
    """Metric names must be ones we compute; options that change their meaning are refused or noted."""
    notes = []
    allowed = _MC_METRICS if output_type == "multiple_choice" else _GEN_METRICS
    for i, entry in enumerate(_opt(config, "metric_list", list, [], source)):
        name = entry.get("metric") if isinstance(entry, dict) else None
        key = f"metric_list[{i}]"
        if name not in allowed:
            raise LmEvalTaskError(f"{key}.metric", f"{name!r} not supported for {output_type} "
                                  f"(supported: {', '.join(sorted(allowed))})", source)
        for k, v in entry.items():
            if k == "metric" or (k == "aggregation" and v == "mean") or (k == "higher_is_better" and v is True):
                continue
            if k == "ignore_case" and isinstance(v, bool):
                if not v:
                    notes.append("exact_match: our comparison ignores case (lm-eval's ignore_case is false here)")
                continue
            if k == "ignore_punctuation" and v is False:
                continue
            raise LmEvalTaskError(f"{key}.{k}", f"{v!r} not supported", source)
    return notes


def check_task(config: dict[str, Any], source: Path, filter_name: str | None = None) -> _Task:
    """Validate the merged configuration: every key known and implemented, required ones present."""
    _check_keys(config, source)
    name = _need(config, "task", str, source)
    output_type = _opt(config, "output_type", str, "generate_until", source)  # lm-eval's default
    if output_type not in _OUTPUT_TYPES:
        raise LmEvalTaskError("output_type", f"{output_type!r} not supported ({', '.join(_OUTPUT_TYPES)})", source)
    file_format, files = _data_files(config, source)
    splits = {k: _opt(config, k, str, None, source) for k in ("test_split", "validation_split", "training_split",
                                                               "fewshot_split")}
    for key, split in splits.items():
        if split is not None and split not in files:
            raise LmEvalTaskError(key, f"{split!r} is not a split of dataset_kwargs.data_files ({', '.join(files)})",
                                  source)
    doc_to_text = _need(config, "doc_to_text", str, source)
    doc_to_target = _need(config, "doc_to_target", (str, int), source)
    doc_to_choice = None
    if output_type == "multiple_choice":
        doc_to_choice = _need(config, "doc_to_choice", (str, list, dict), source)
    elif config.get("doc_to_choice") is not None:
        raise LmEvalTaskError("doc_to_choice", "only multiple_choice tasks have choices", source)
    target_delimiter = _opt(config, "target_delimiter", str, " ", source)
    fewshot_delimiter = _opt(config, "fewshot_delimiter", str, "\n\n", source)
    num_fewshot, sampler = _fewshot(config, source)
    until: tuple[str, ...] = ()
    if output_type == "generate_until":
        until = _generation(config, fewshot_delimiter, source)
    elif config.get("generation_kwargs") is not None:
        raise LmEvalTaskError("generation_kwargs", "only generate_until tasks generate", source)
    pattern, filter_key = _filters(config, output_type, filter_name, source)
    notes = _metrics(config, output_type, source)
    if output_type == "generate_until":
        notes.append("exact_match here strips both sides, ignores case and compares numbers by value")
    metadata = _opt(config, "metadata", dict, {}, source)
    return _Task(name, output_type, files, file_format, splits["test_split"], splits["validation_split"],
                 splits["training_split"], splits["fewshot_split"], doc_to_text, doc_to_choice, doc_to_target,
                 _opt(config, "description", str, "", source), target_delimiter, fewshot_delimiter, num_fewshot,
                 sampler, until, pattern, filter_key, metadata.get("version"), tuple(notes))


# ---------------------------------------------------------------------------------------------------------------
# Documents


def _read_json_rows(path: Path, key: str) -> list[dict[str, Any]]:
    """JSON Lines, or one JSON array of objects (both read by the `datasets` json builder)."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise LmEvalTaskError(key, f"{path}: invalid JSON: {e.msg} at line {e.lineno}") from None
    else:
        rows = []
        for n, line in enumerate(jsonl_lines(text), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LmEvalTaskError(key, f"{path} line {n}: invalid JSON: {e.msg}") from None
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise LmEvalTaskError(key, f"{path} row {n}: expected a JSON object, got {type(row).__name__}")
    return rows


def _read_csv_rows(path: Path, key: str) -> list[dict[str, Any]]:
    """CSV with a header; numbers parsed as pandas (and so the `datasets` csv builder) parses them, empty -> None."""
    import pandas as pd

    try:
        frame = pd.read_csv(io.StringIO(path.read_text(encoding="utf-8")))
    except (ValueError, pd.errors.ParserError) as e:
        raise LmEvalTaskError(key, f"{path}: not readable as CSV: {e}") from None
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in frame.to_dict("records")]


def load_docs(task: _Task, split: str) -> tuple[list[dict[str, Any]], list[SourceFile]]:
    """The documents of one split, in file order, and the data files read."""
    docs: list[dict[str, Any]] = []
    sources = []
    for name in task.data_files[split]:
        key = f"dataset_kwargs.data_files.{split}"
        path = Path(name)
        if not path.is_file():
            raise LmEvalTaskError(key, f"{name!r} not found")
        if path.stat().st_size > MAX_DATA_FILE_BYTES:  # read whole into memory: the canonical file limit applies
            raise LmEvalTaskError(key, f"{name!r} is {path.stat().st_size} bytes, over the limit of "
                                  f"{MAX_DATA_FILE_BYTES} bytes")
        docs.extend(_read_json_rows(path, key) if task.file_format == "json" else _read_csv_rows(path, key))
        sources.append(SourceFile(f"data:{split}", str(path), _sha256(path.read_bytes())))
    if not docs:
        raise LmEvalTaskError(f"dataset_kwargs.data_files.{split}", "no documents")
    return docs, sources


# ---------------------------------------------------------------------------------------------------------------
# Rendering, lm-eval's semantics


def _environment():  # noqa: ANN202 - jinja2 type
    """Sandboxed (templates come from users), StrictUndefined and keep_trailing_newline as lm-eval's own."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


class _Renderer:
    """doc_to_text / doc_to_choice / doc_to_target of one task, with its templates compiled once."""

    def __init__(self, task: _Task, features: set[str]):
        self.task = task
        self.features = features
        self.env = _environment()
        self._templates: dict[str, Any] = {}

    def _render(self, key: str, template: str, doc: dict[str, Any], where: str) -> str:
        from jinja2 import TemplateError

        try:
            if template not in self._templates:
                self._templates[template] = self.env.from_string(template)
            return self._templates[template].render(**doc)
        except TemplateError as e:
            raise LmEvalTaskError(key, f"{where}: template error: {e}") from None

    def text(self, doc: dict[str, Any], where: str) -> str:
        spec = self.task.doc_to_text
        value = doc[spec] if spec in self.features else self._render("doc_to_text", spec, doc, where)
        if not isinstance(value, str):
            raise LmEvalTaskError("doc_to_text", f"{where}: expected text, got {type(value).__name__} "
                                  f"{value!r} (multiple-input tasks are not supported)")
        return value

    def choices(self, doc: dict[str, Any], where: str) -> list[str]:
        spec = self.task.doc_to_choice
        if isinstance(spec, dict):
            value: Any = list(spec.values())
        elif isinstance(spec, list):
            value = spec
        elif spec in self.features:
            value = doc[spec]
        else:
            rendered = self._render("doc_to_choice", spec, doc, where)
            try:
                value = ast.literal_eval(rendered)
            except (ValueError, SyntaxError):
                raise LmEvalTaskError("doc_to_choice", f"{where}: the template gave {rendered!r}, not a "
                                      "list literal") from None
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise LmEvalTaskError("doc_to_choice", f"{where}: expected a list of strings, got {value!r}")
        return value

    def target(self, doc: dict[str, Any], where: str) -> Any:
        """lm-eval's doc_to_target: a field's raw value, an int, or a rendered template (digits -> int for MC)."""
        spec = self.task.doc_to_target
        if isinstance(spec, int):
            return spec
        if spec in self.features:
            return doc[spec]
        rendered = self._render("doc_to_target", spec, doc, where)
        if rendered.isdigit() and self.task.doc_to_choice is not None:
            return int(rendered)
        return rendered

    def gold_index(self, doc: dict[str, Any], where: str, choices: list[str]) -> int:
        target = self.target(doc, where)
        if isinstance(target, int) and not isinstance(target, bool):
            if 0 <= target < len(choices):
                return target
        elif isinstance(target, str) and target in choices:
            return choices.index(target)
        raise LmEvalTaskError("doc_to_target", f"{where}: {target!r} is neither an index into nor one of "
                              f"the {len(choices)} choices {choices!r}")

    def target_text(self, doc: dict[str, Any], where: str) -> str:
        """The answer written after a few-shot demonstration (lm-eval's ContextSampler.get_context)."""
        target = self.target(doc, where)
        if isinstance(target, list):
            raise LmEvalTaskError("doc_to_target", f"{where}: several targets are not supported")
        if self.task.doc_to_choice is None or isinstance(target, str):
            return str(target)
        choices = self.choices(doc, where)
        return choices[self.gold_index(doc, where, choices)]

    def description(self, doc: dict[str, Any], where: str) -> str:
        return self._render("description", self.task.description, doc, where) if self.task.description else ""


def _fewshot_split(task: _Task) -> str:
    for split in (task.fewshot_split, task.training_split, task.validation_split):
        if split is not None:
            return split
    raise LmEvalTaskError("num_fewshot", f"{task.num_fewshot} demonstrations need a fewshot_split, training_split "
                          "or validation_split")


class _Sampler:
    """lm-eval's few-shot samplers over a fixed pool: `first_n`, or `default` (one seeded generator, advanced
    document by document in order, so document i's demonstrations depend on the documents before it as in lm-eval)."""

    def __init__(self, kind: str, pool: list[dict[str, Any]], seed: int, drop_self: bool):
        self.kind, self.pool, self.drop_self = kind, pool, drop_self
        self.rnd = random.Random(seed)

    def draw(self, doc: dict[str, Any], n: int) -> list[int]:
        """Pool indices of the demonstrations, as lm-eval 0.4's samplers pick them: without `drop_self`, n draws
        kept as they are; with it, `default` draws n + 1 and drops the document (drawing n again from the pool
        without it when that leaves too few) and `first_n` takes the first n of the pool without the document."""
        idx = list(range(len(self.pool)))
        if self.drop_self and self.kind == "first_n":
            idx = [j for j in idx if self.pool[j] != doc]
        need = n + 1 if self.drop_self and self.kind != "first_n" else n
        if need > len(idx):
            raise LmEvalTaskError("num_fewshot", f"{n} demonstrations asked, the few-shot split has {len(self.pool)} "
                                  "documents")
        if self.kind == "first_n":
            return idx[:n]
        if not self.drop_self:
            return self.rnd.sample(idx, n)
        chosen = [j for j in self.rnd.sample(idx, n + 1) if self.pool[j] != doc][:n]
        if len(chosen) < n:  # the pool holds copies of the document
            chosen = self.rnd.sample([j for j in idx if self.pool[j] != doc], n)
        return chosen


def _eval_split(task: _Task, split: str | None) -> str:
    """The data split to convert: a data_files split by name, or `val`/`validation`, `test`, `train` by role;
    by default lm-eval's own (test_split, else validation_split)."""
    if split is None:
        chosen = task.test_split or task.validation_split
        if chosen is None:
            raise LmEvalTaskError("test_split", "neither test_split nor validation_split is set: give --split")
        return chosen
    if split in task.data_files:
        return split
    roles = {"val": task.validation_split, "validation": task.validation_split, "test": task.test_split,
             "train": task.training_split}
    if roles.get(split) is not None:
        return roles[split]  # type: ignore[return-value]
    raise LmEvalTaskError("split", f"{split!r} is not a split of the task (data_files: {', '.join(task.data_files)})")


def _mc_sample(sid: str, prompt: str, choices: list[str], answer: int, task: _Task, where: str,
               metadata: dict[str, Any]) -> Sample:
    """An MC sample whose (context, continuation) pairs are exactly lm-eval's `(ctx, target_delimiter + choice)`.

    The canonical format joins the run's delimiter (one space) and a choice, and acc_norm divides by the choice's
    own length; another `target_delimiter` is refused."""
    sample = Sample(id=sid, prompt=prompt, choices=tuple(choices), answer=answer, metadata=metadata)
    for (_, cont), choice in zip(sample.contexts_and_continuations(), choices):
        if cont != task.target_delimiter + choice:
            raise LmEvalTaskError("target_delimiter", f"{where}: {task.target_delimiter!r} + choice "
                                  f"{choice!r} cannot be represented (the canonical format scores {cont!r})")
    return sample


def convert_task(path: str | Path, split: str | None = None, include_paths: Sequence[str | Path] = (),
                 fewshot_seed: int = DEFAULT_FEWSHOT_SEED, filter_name: str | None = None) -> TaskConversion:
    """Read a local lm-eval task YAML and render one split into canonical samples (see the module docstring).

    Raises LmEvalTaskError (naming the key) for anything not supported; nothing is written.
    """
    config, sources = load_task_config(path, include_paths)
    yaml_path = Path(sources[0].path)
    task = check_task(config, yaml_path, filter_name)
    eval_split = _eval_split(task, split)
    docs, data_sources = load_docs(task, eval_split)
    sources.extend(data_sources)
    pool: list[dict[str, Any]] = []
    shot_split = ""
    if task.num_fewshot:
        shot_split = _fewshot_split(task)
        pool, shot_sources = (docs, []) if shot_split == eval_split else load_docs(task, shot_split)
        sources.extend(shot_sources)
    features = {k for d in docs + pool for k in d}
    render = _Renderer(task, features)
    # lm-eval 0.4 (api/task.py) passes the document to its sampler, which then draws n + 1 and drops the document,
    # exactly when `fewshot_split == test_split`: also when neither is set (train + validation tasks); otherwise
    # it draws n and keeps them all
    sampler = _Sampler(task.sampler, pool, fewshot_seed, drop_self=task.fewshot_split == task.test_split)
    samples: list[Sample] = []
    for doc_id, doc in enumerate(docs):
        where = f"{eval_split} document {doc_id}"
        shots = "".join(render.text(pool[j], f"{shot_split} document {j}") + task.target_delimiter
                        + render.target_text(pool[j], f"{shot_split} document {j}") + task.fewshot_delimiter
                        for j in (sampler.draw(doc, task.num_fewshot) if task.num_fewshot else []))
        prompt = render.description(doc, where) + shots + render.text(doc, where)
        target = render.target(doc, where)  # as lm-eval logs it (an index, or the text the YAML gives)
        meta = {"lmeval": {"task": task.name, "split": eval_split, "doc_id": doc_id, "num_fewshot": task.num_fewshot,
                           "yaml": yaml_path.name, "yaml_sha256": sources[0].sha256, "version": task.version,
                           "filter": task.filter_name, "target": _json_safe(target)},
                "doc": doc}
        sid = f"{task.name}/{eval_split}/{doc_id}"
        if task.output_type == "multiple_choice":
            choices = render.choices(doc, where)
            samples.append(_mc_sample(sid, prompt, choices, render.gold_index(doc, where, choices), task, where,
                                      meta))
        else:
            if isinstance(target, (list, dict)) or target is None:
                raise LmEvalTaskError("doc_to_target", f"{where}: expected one answer, got {target!r}")
            samples.append(Sample(id=sid, prompt=prompt, reference=str(target), stop=task.until,
                                  answer_pattern=task.filter_pattern or WHOLE_OUTPUT_PATTERN, extract="first-match",
                                  metadata=meta))
    return TaskConversion(task=task.name, split=eval_split, output_type=task.output_type, samples=samples,
                          num_fewshot=task.num_fewshot, yaml_path=str(yaml_path), yaml_sha256=sources[0].sha256,
                          sources=tuple(sources), config=_json_safe(config), notes=task.notes)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def parse_reference(name: str) -> str | None:
    """The YAML path of a `lmeval:TASK.yaml` dataset reference, or None for any other dataset name."""
    return name[len(LMEVAL_PREFIX):] if name.startswith(LMEVAL_PREFIX) else None


def validated(conv: TaskConversion, limits: Any = None) -> tuple[bytes, list[Sample]]:
    """The canonical bytes and samples after the canonical validator (a converted task obeys every rule a JSONL
    file does); its errors name the lm-eval document (`document 3`), since the user never saw our line numbers."""
    from tad_core.datasets.validate import DatasetLimits, DatasetValidationError, dumps_jsonl, validate_jsonl

    data = dumps_jsonl(conv.samples)
    try:
        return data, validate_jsonl(data, limits or DatasetLimits())
    except DatasetValidationError as e:
        where = f"{conv.task} ({conv.yaml_path}) split {conv.split}"
        raise DatasetValidationError([re.sub(r"^line (\d+):", lambda m: f"{where} document {int(m.group(1)) - 1}:", x)
                                      for x in e.errors]) from None


def load_lmeval_dataset(name: str, split: str = "val", limit: int | None = None,
                        limits: Any = None) -> Any:
    """`lmeval:TASK.yaml` as a LoadedDataset: converted and validated; named by the YAML's `task`, hashed over
    the canonical bytes (so the same task and data give the same stored dataset wherever the files live)."""
    from tad_core.datasets.catalog import LoadedDataset, _task_type

    path = parse_reference(name)
    if not path:
        raise LmEvalTaskError("dataset", f"{name!r}: expected lmeval:PATH/TO/TASK.yaml")
    conv = convert_task(path, split)
    data, samples = validated(conv, limits)
    if limit is not None:
        samples = samples[:limit]
    return LoadedDataset(name=conv.task, split=split, samples=samples, content_hash=_sha256(data),
                         task_type=_task_type(samples), source=conv.source)
