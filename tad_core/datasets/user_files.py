"""A user's own dataset files: `.jsonl` or `.json` (an array), one file holding several splits (a `split` field on
every row), one file per split (`NAME=train.jsonl,val.jsonl`), and a label of the user's choosing (`NAME=FILE`).

Found when trying SciQ, COPA, CommonsenseQA and an arithmetic set as a new user would: a train/val file pair had to
be run as two unrelated datasets, two `test.jsonl` files from different sets showed under the same label, and a
`.json` array was refused by one command and not another. Everything here goes through the canonical validator
(`validate_file` is what `tad data validate` runs too), so a file is accepted or refused the same way everywhere,
with every error named by file, line (or array item) and field.

References (what `--dataset` takes besides registered names and `lmeval:`):
- `FILE.jsonl` / `FILE.json`: labelled by the file's stem;
- `NAME=FILE`: the same file labelled NAME; `NAME=SPLIT:FILE`: that file is split SPLIT only (another `--split`
  is refused instead of reading the whole file as it);
- `NAME=A.jsonl,B.jsonl,...`: one file per split; a file's split is `SPLIT:PATH` when written so, else the last
  `_`/`-`/`.`-separated word of its stem (`sciq_train.jsonl` -> train; `validation`/`valid`/`dev` -> val).
A file whose rows carry `split` holds several splits, and `--split` selects one. Samples are hashed over their
canonical bytes (`dumps_jsonl`), so the same samples give the same stored dataset whichever file layout, key order
or whitespace they came in.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tad_core.datasets.validate import DatasetLimits, DatasetValidationError, dumps_jsonl, jsonl_lines, validate_jsonl
from tad_core.samples import Sample

SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$")
FILE_SUFFIXES = (".jsonl", ".json")


class DatasetReferenceError(ValueError):
    """A `--dataset` reference that names no usable file, or a split that is not there; the message says which."""


@dataclass(frozen=True)
class UserFiles:
    """A parsed reference: the label, and the file of each split (`None`: one file, splits inside or none)."""

    name: str
    files: dict[str | None, Path]


@dataclass(frozen=True)
class UserSplit:
    """The samples of the selected split, the bytes they are hashed over, and where they came from."""

    name: str
    split: str
    samples: list[Sample]
    content_hash: str
    source: str


def _split_of(path: Path) -> str:
    word = re.split(r"[_.\-]", path.stem)[-1].lower()
    return SPLIT_ALIASES.get(word, word)


def is_user_reference(ref: str) -> bool:
    """True for the references this module reads: `NAME=...`, or a path ending `.jsonl` / `.json`."""
    return bool(re.match(r"^[^=/\\]+=", ref)) or ref.endswith(FILE_SUFFIXES)


def parse_reference(ref: str, name: str | None = None) -> UserFiles:
    """Parse a `--dataset` reference (see the module docstring); `name` (`--dataset-name`) overrides the label."""
    label, _, rest = ref.partition("=") if re.match(r"^[^=/\\]+=", ref) else ("", "", ref)
    parts = [p.strip() for p in rest.split(",")] if label else [rest]
    if not all(parts):
        raise DatasetReferenceError(f"dataset {ref!r}: an empty file name in the list")
    files: dict[str | None, Path] = {}
    for part in parts:
        explicit, sep, path_text = part.partition(":")
        if not sep or "/" in explicit or explicit.endswith(FILE_SUFFIXES):
            explicit, path_text = "", part
        path = Path(path_text).expanduser()
        if path.suffix not in FILE_SUFFIXES:
            raise DatasetReferenceError(f"dataset {ref!r}: {path_text!r} is not a .jsonl or .json file")
        if not path.is_file():
            raise DatasetReferenceError(f"dataset {ref!r}: file {path_text!r} does not exist")
        # one file is every split (its rows may carry a `split` field) unless SPLIT:PATH names the one it is
        split = (SPLIT_ALIASES.get(explicit, explicit) or (_split_of(path) if len(parts) > 1 else None))
        if split in files:
            raise DatasetReferenceError(f"dataset {ref!r}: two files for split {split!r}; write SPLIT:PATH to say "
                                        "which is which")
        files[split] = path
    given = name or label  # a label the user typed is held to the naming rule; a file's own stem is kept as it is
    label = given or Path(parts[0].rpartition(":")[2] if len(parts) == 1 else parts[0]).stem
    if given and not NAME_RE.match(label):
        raise DatasetReferenceError(f"dataset name {label!r}: use letters, digits and _ . + - (at most 100)")
    return UserFiles(label, files)


def _jsonl_bytes(path: Path, limits: DatasetLimits) -> bytes:
    """The file as JSONL bytes: a `.jsonl` file as it is, a `.json` array one element per line (so an error's
    `line N` is the array's item N, counted from 1)."""
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise DatasetValidationError([f"file is {size} bytes, over the limit of {limits.max_bytes} bytes"])
    data = path.read_bytes()
    if path.suffix != ".json":
        return data
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DatasetValidationError([f"not valid UTF-8 ({e.reason})"]) from None
    except json.JSONDecodeError as e:
        raise DatasetValidationError([f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}"]) from None
    if not isinstance(items, list):
        raise DatasetValidationError([f"a .json dataset must be an array of samples, got {type(items).__name__}"])
    return "".join(json.dumps(x, ensure_ascii=False).replace("\n", "\\n") + "\n" for x in items).encode("utf-8")


def _item_names(errors: list[str], path: Path) -> list[str]:
    word = "item" if path.suffix == ".json" else "line"
    return [f"{path.name}: " + re.sub(r"^line (\d+):", lambda m: f"{word} {m.group(1)}:", e) for e in errors]


def validate_file(path: str | Path, limits: DatasetLimits = DatasetLimits()) -> tuple[list[Sample], list[str | None]]:
    """Validate a `.jsonl` or `.json` dataset file; return its samples and each row's `split` (None without one).

    Raises DatasetValidationError naming file, line (item) and field; a file where some rows have a split and some
    do not is refused (which split would they be in?)."""
    path = Path(path).expanduser()
    if path.suffix not in FILE_SUFFIXES:
        raise DatasetValidationError([f"{path.name}: expected a .jsonl or .json file"])
    if not path.is_file():
        raise DatasetValidationError([f"{path}: not found or not a regular file"])
    try:
        data = _jsonl_bytes(path, limits)
        samples = validate_jsonl(data, limits, allow_split=True)
    except DatasetValidationError as e:
        raise DatasetValidationError(_item_names(e.errors, path)) from None
    splits = [json.loads(line).get("split") for line in jsonl_lines(data.decode("utf-8")) if line.strip()]
    if len(set(s is None for s in splits)) > 1:
        missing = next(i for i, s in enumerate(splits, start=1) if s is None)
        raise DatasetValidationError(_item_names([f"line {missing}: field 'split': missing (other rows have one: "
                                                  "give every row its split, or none)"], path))
    return samples, splits


def load_user_split(files: UserFiles, split: str, limits: DatasetLimits = DatasetLimits()) -> UserSplit:
    """The samples of `split` from a parsed reference (see the module docstring)."""
    if None in files.files:
        path = files.files[None]
        samples, splits = validate_file(path, limits)
        if splits and splits[0] is not None:
            available = sorted(set(s for s in splits if s is not None))
            chosen = [s for s, sp in zip(samples, splits) if SPLIT_ALIASES.get(sp, sp) == split]
            if not chosen:
                raise DatasetReferenceError(f"dataset {files.name!r} ({path.name}) has no split {split!r}; "
                                            f"available: {', '.join(available)}")
            data = dumps_jsonl(chosen)
            return UserSplit(files.name, split, chosen, hashlib.sha256(data).hexdigest(),
                             f"{path.resolve()} split={split}")
        return UserSplit(files.name, split, samples, hashlib.sha256(dumps_jsonl(samples)).hexdigest(),
                         str(path.resolve()))
    if split not in files.files:
        raise DatasetReferenceError(f"dataset {files.name!r} has no split {split!r}; available: "
                                    f"{', '.join(str(s) for s in files.files)}")
    path = files.files[split]
    samples, splits = validate_file(path, limits)
    if splits and splits[0] is not None:
        raise DatasetReferenceError(f"dataset {files.name!r}: {path.name} is the {split!r} file but its rows carry "
                                    "a split field; use one layout")
    data = dumps_jsonl(samples)
    return UserSplit(files.name, split, samples, hashlib.sha256(data).hexdigest(), f"{path.resolve()} split={split}")
