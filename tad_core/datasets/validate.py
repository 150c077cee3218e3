"""Validator and writer for the canonical JSONL dataset format (see README "Dataset format").

One JSON object per line, blank lines ignored. Every sample has a unique non-empty string `id`, then one of:
- multiple choice: `prompt` + `choices` (>= 2 non-empty strings, scored after the prompt) + `answer` (index);
- partial scoring (WinoGrande): `choice_prompts` (>= 2 contexts) + one `continuation` + `answer` (index);
- generation: `prompt` + `reference` (the gold answer) + optional `answer_pattern` (a regex), `choices` (answers to
  pick from, read by `choice-label` extraction), `extract` (an extraction mode) and `stop` (stop sequences).
Any sample may carry `stop`. An optional `metadata` object may carry anything JSON. Unknown fields are errors (they are usually typos).
A file with any error is rejected whole: all errors (up to `max_errors`) are collected and raised together.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tad_core.extraction import check_mode, first_match
from tad_core.paths import atomic_target
from tad_core.samples import Sample

KNOWN_FIELDS = ("id", "prompt", "choices", "choice_prompts", "continuation", "answer", "reference",
                "answer_pattern", "extract", "stop", "metadata")
MAX_ID_CHARS = 200  # the results DB keeps sample ids in a VARCHAR(200)
SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,49}$")


@dataclass(frozen=True)
class DatasetLimits:
    """Upper bounds that keep a submitted file from exhausting memory or producing absurd prompts.

    These defaults are also the service's (services.settings reads them for TAD_MAX_DATASET_BYTES / _ROWS and
    TAD_MAX_SAMPLE_CHARS), so a file `tad data validate` accepts is one `tad run` accepts."""

    max_bytes: int = 200_000_000
    max_rows: int = 100_000
    max_field_chars: int = 32_768
    max_errors: int = 50


class DatasetValidationError(ValueError):
    """The dataset was rejected; `errors` lists every problem found (line-numbered, field-named)."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        head = f"dataset rejected ({len(self.errors)} error{'s' if len(self.errors) != 1 else ''}):"
        super().__init__("\n".join([head, *(f"  {e}" for e in self.errors)]))


class _TooManyErrors(Exception):
    pass


class _Collector:
    def __init__(self, max_errors: int):
        self.errors: list[str] = []
        self.max_errors = max_errors

    def add(self, msg: str) -> None:
        self.errors.append(msg)
        if len(self.errors) >= self.max_errors:
            self.errors.append(f"stopped after {self.max_errors} errors")
            raise _TooManyErrors


def _read_source(source: str | Path | bytes, limits: DatasetLimits) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DatasetValidationError([f"file {str(path)!r}: not found or not a regular file"])
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise DatasetValidationError([f"file is {size} bytes, over the limit of {limits.max_bytes} bytes"])
        data = path.read_bytes()
    if len(data) > limits.max_bytes:
        raise DatasetValidationError([f"file is {len(data)} bytes, over the limit of {limits.max_bytes} bytes"])
    return data


def validate_jsonl(source: str | Path | bytes, limits: DatasetLimits = DatasetLimits(),
                   allow_split: bool = False) -> list[Sample]:
    """Parse and check a canonical JSONL dataset; return its samples or raise `DatasetValidationError`.

    `source` is a file path (`str` or `Path`) or the file's raw bytes. `allow_split`: rows may carry a `split`
    field (a file holding several splits, read by tad_core.datasets.user_files, which selects one); where one
    split is expected the field is refused, so no split is ever mixed into another silently.
    """
    data = _read_source(source, limits)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DatasetValidationError([f"line {line}: not valid UTF-8 ({e.reason})"]) from None
    col = _Collector(limits.max_errors)
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    rows = 0
    try:
        for lineno, raw in enumerate(jsonl_lines(text), start=1):
            if not raw.strip():
                continue
            rows += 1
            if rows > limits.max_rows:
                col.add(f"line {lineno}: file has more than {limits.max_rows} rows (limit)")
                break
            sample = _check_line(raw, lineno, limits, col, seen, allow_split)
            if sample is not None:
                samples.append(sample)
        if rows == 0:
            col.add("file has no samples")
    except _TooManyErrors:
        pass
    if col.errors:
        raise DatasetValidationError(col.errors)
    return samples


# C0 controls except tab, newline and carriage return, DEL, and lone surrogates: Postgres refuses NUL in text and
# JSON and cannot encode a surrogate, other controls corrupt terminals and tables.
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _bad_char(value: Any) -> tuple[str, int] | None:
    """The first refused character in a string, or in the strings nested in a list or object: (U+XXXX, offset)."""
    if isinstance(value, str):
        m = _BAD_CHARS.search(value)
        return (f"U+{ord(m.group()):04X}", m.start()) if m else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _bad_char(k) if isinstance(k, str) else None
        if found is None:
            found = _bad_char(v)
        if found is not None:
            return found
    return None


def _refuse_constant(name: str) -> None:
    """Python's json reads NaN, Infinity and -Infinity, which JSON does not have: Postgres refused the stored row
    (an unnamed DataError at submission) and SQLite stored JSON nothing else can read."""
    raise ValueError(f"{name} is not a JSON value (write a number or null)")


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _check_line(raw: str, n: int, limits: DatasetLimits, col: _Collector, seen: dict[str, int],
                allow_split: bool = False) -> Sample | None:
    before = len(col.errors)
    try:
        obj = json.loads(raw, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        col.add(f"line {n}: invalid JSON: {e.msg} at column {e.colno}")
        return None
    except ValueError as e:
        col.add(f"line {n}: invalid JSON: {e}")
        return None
    if not isinstance(obj, dict):
        col.add(f"line {n}: expected a JSON object, got {type(obj).__name__}")
        return None

    def err(field: str, msg: str) -> None:
        col.add(f"line {n}: field '{field}': {msg}")

    for key in obj:
        if key == "split" and not allow_split:
            err(key, "rows with splits are selected with --split by tad run, tad submit and tad train; this path "
                     "reads one split (drop the field, or give the file to one of those)")
        elif key not in KNOWN_FIELDS and key != "split":
            err(key, f"unknown field (allowed: {', '.join(KNOWN_FIELDS)}, split)")

    sid = obj.get("id")
    if "id" not in obj:
        err("id", "missing")
    elif not isinstance(sid, str) or not sid.strip():
        err("id", "must be a non-empty string")
    elif len(sid) > MAX_ID_CHARS:
        err("id", f"at most {MAX_ID_CHARS} characters (got {len(sid)})")
    elif sid in seen:
        err("id", f"duplicate id {sid!r} (first on line {seen[sid]})")
    else:
        seen[sid] = n

    for key, value in obj.items():
        bad = _bad_char(value)
        if bad is not None:
            err(key, f"contains the control character {bad[0]} (at character {bad[1]}); remove it")
        items = value if isinstance(value, list) else [value]
        if any(isinstance(x, str) and len(x) > limits.max_field_chars for x in items):
            err(key, f"longer than {limits.max_field_chars} characters (limit)")
    if "metadata" in obj:
        if not isinstance(obj["metadata"], dict):
            err("metadata", "must be a JSON object")
        elif len(json.dumps(obj["metadata"])) > limits.max_field_chars:
            err("metadata", f"longer than {limits.max_field_chars} characters when serialised (limit)")

    if "split" in obj and not (isinstance(obj["split"], str) and SPLIT_NAME.match(obj["split"])):
        err("split", "must be a split name (letters, digits, _ and -, e.g. train, val, test)")
    if "stop" in obj and (not _is_str_list(obj["stop"]) or not all(obj["stop"])):
        err("stop", "must be a list of non-empty strings")
    if "reference" in obj:
        _check_generation(obj, err)
    elif "choice_prompts" in obj:
        _check_partial(obj, err)
    elif "choices" in obj:
        _check_choices(obj, err)
    else:
        col.add(f"line {n}: missing fields: need 'prompt' + 'choices' + 'answer' (multiple choice), "
                "'choice_prompts' + 'continuation' + 'answer' (partial scoring) or 'prompt' + 'reference' (generation)")
    if len(col.errors) > before:
        return None
    return Sample.from_dict(obj)


def _check_prompt(obj: dict[str, Any], err: Any) -> None:
    if "prompt" not in obj:
        err("prompt", "missing")
    elif not isinstance(obj["prompt"], str):
        err("prompt", f"must be a string, got {type(obj['prompt']).__name__}")
    elif not obj["prompt"].strip():
        err("prompt", "empty prompt")


def _check_list(obj: dict[str, Any], key: str, err: Any) -> int | None:
    """Check a list of >= 2 non-empty strings; return its length when usable for the answer range check."""
    value = obj[key]
    if not _is_str_list(value):
        err(key, "must be a list of strings")
        return None
    if len(value) < 2:
        err(key, f"needs at least 2 entries, got {len(value)}")
        return None
    for i, item in enumerate(value):
        if not item.strip():
            err(key, f"entry {i} is empty")
    return len(value)


def _check_answer(obj: dict[str, Any], n_choices: int | None, err: Any) -> None:
    if "answer" not in obj:
        err("answer", "missing (the index of the correct choice)")
        return
    answer = obj["answer"]
    if not isinstance(answer, int) or isinstance(answer, bool):
        err("answer", f"must be an integer index, got {type(answer).__name__}")
    elif n_choices is not None and not 0 <= answer < n_choices:
        err("answer", f"index {answer} out of range for {n_choices} choices")


def _forbid(obj: dict[str, Any], keys: Iterable[str], kind: str, err: Any) -> None:
    for key in keys:
        if key in obj:
            err(key, f"not allowed in a {kind} sample")


def _check_choices(obj: dict[str, Any], err: Any) -> None:
    _forbid(obj, ("continuation", "answer_pattern", "extract"), "multiple-choice", err)
    _check_prompt(obj, err)
    _check_answer(obj, _check_list(obj, "choices", err), err)


def _check_partial(obj: dict[str, Any], err: Any) -> None:
    _forbid(obj, ("prompt", "choices", "answer_pattern", "extract"), "partial-scoring (choice_prompts)", err)
    n_choices = _check_list(obj, "choice_prompts", err)
    cont = obj.get("continuation")
    if "continuation" not in obj:
        err("continuation", "missing (the text scored after each choice prompt)")
    elif not isinstance(cont, str) or not cont.strip():
        err("continuation", "must be a non-empty string")
    _check_answer(obj, n_choices, err)


def _check_generation(obj: dict[str, Any], err: Any) -> None:
    _forbid(obj, ("choice_prompts", "continuation", "answer"), "generation (reference)", err)
    if "choices" in obj and not (_is_str_list(obj["choices"]) and obj["choices"] and all(obj["choices"])):
        err("choices", "must be a list of non-empty strings (the answers choice-label extraction picks from)")
    if "extract" in obj:
        try:
            check_mode(obj["extract"] if isinstance(obj["extract"], str) else repr(obj["extract"]))
        except ValueError as e:
            err("extract", str(e).partition(": ")[2])
        else:
            if obj["extract"] == "first-match" and not obj.get("answer_pattern"):
                err("extract", "'first-match' needs an answer_pattern")
    _check_prompt(obj, err)
    ref = obj["reference"]
    if not isinstance(ref, str):
        err("reference", f"must be a string, got {type(ref).__name__}")
    elif not ref.strip():
        err("reference", "must not be empty")
    pattern = obj.get("answer_pattern")
    if pattern is not None:
        if not isinstance(pattern, str):
            err("answer_pattern", f"must be a string, got {type(pattern).__name__}")
        else:
            _check_pattern(pattern, ref if isinstance(ref, str) else "", err)


def _check_pattern(pattern: str, reference: str, err: Any) -> None:
    """Compile `answer_pattern` and try it on the reference the way extraction will (tad_core.extraction), so a
    pattern that cannot run is refused here, with its line, instead of failing in a worker."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        err("answer_pattern", f"not a valid regular expression: {e}")
        return
    try:
        first_match(reference, pattern)
    except Exception as e:  # noqa: BLE001 - whatever extraction would raise, said here with the line
        err("answer_pattern", f"extraction fails on the reference: {type(e).__name__}: {e}")


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text: split at `\n` only (a trailing `\r` dropped), as JSON Lines defines them.
    `str.splitlines` also splits at U+2028, U+2029, U+0085 and other separators, which JSON strings may hold raw
    (`dumps_jsonl` writes them so): a valid sample was cut in two and its file could not be read back."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def dumps_jsonl(samples: Iterable[Sample]) -> bytes:
    """The canonical JSONL bytes of `samples` (one compact object per line, UTF-8, trailing newline)."""
    return "".join(json.dumps(s.to_dict(), ensure_ascii=False) + "\n" for s in samples).encode("utf-8")


def write_jsonl(samples: Iterable[Sample], path: str | Path) -> Path:
    """Write samples in the canonical format, atomically (temporary file, then rename)."""
    path = Path(path)
    with atomic_target(path) as tmp:
        tmp.write_bytes(dumps_jsonl(samples))
    return path
