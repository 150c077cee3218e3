"""Regression suites: a named, versioned set of (dataset, split, limit) x strategies x generation config.

A suite is defined in a small YAML file and validated completely before it is stored (every problem is reported,
each naming its field), e.g.

    name: arc-smoke
    version: 1
    datasets:
      - {dataset: arc_easy, split: val, limit: 200}
    strategies: [ft, "tad:alpha=1"]
    config: {batch_size: 8}

A suite run is one job per dataset (with every strategy); `tad regress` runs it for a candidate adapter and its
baseline and compares them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.refs import NAME_RE

SUITE_FIELDS = ("name", "version", "description", "datasets", "strategies", "config")
DATASET_FIELDS = ("dataset", "split", "limit")


class SuiteError(ValueError):
    """A suite file is invalid; `errors` lists every problem found, each naming its field."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class SuiteDataset:
    dataset: str  # registered dataset name, or an absolute .jsonl path
    split: str = "val"
    limit: int | None = None

    @property
    def label(self) -> str:
        return f"{self.dataset}:{self.split}" + (f"[:{self.limit}]" if self.limit is not None else "")


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    version: int
    datasets: tuple[SuiteDataset, ...]
    strategies: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "description": self.description,
                "datasets": [{"dataset": d.dataset, "split": d.split, "limit": d.limit} for d in self.datasets],
                "strategies": list(self.strategies), "config": dict(self.config)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SuiteSpec:
        return cls(name=data["name"], version=int(data["version"]),
                   datasets=tuple(SuiteDataset(d["dataset"], d.get("split", "val"), d.get("limit"))
                                  for d in data["datasets"]),
                   strategies=tuple(data["strategies"]), config=dict(data.get("config") or {}),
                   description=data.get("description", ""))

    @property
    def sha256(self) -> str:
        """Hash of the canonical definition: the same suite re-added is recognised, a changed one is not."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_dataset(i: int, item: Any, base_dir: Path | None, errors: list[str]) -> SuiteDataset | None:
    from tad_core.datasets import REGISTRY

    where = f"datasets[{i}]"
    if isinstance(item, str):
        item = {"dataset": item}
    if not isinstance(item, dict):
        errors.append(f"{where}: must be a mapping with keys {', '.join(DATASET_FIELDS)}, got {item!r}")
        return None
    unknown = sorted(set(item) - set(DATASET_FIELDS))
    if unknown:
        errors.append(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(DATASET_FIELDS)}")
    name, split, limit = item.get("dataset"), item.get("split", "val"), item.get("limit")
    ok = True
    if not isinstance(split, str) or not split:
        errors.append(f"{where}.split: must be a non-empty string, got {split!r}")
        ok = False
    if limit is not None and not _positive_int(limit):
        errors.append(f"{where}.limit: must be a positive integer (or left out for the whole split), got {limit!r}")
        ok = False
    if not isinstance(name, str) or not name:
        errors.append(f"{where}.dataset: required, a registered dataset ({', '.join(REGISTRY)}) or a .jsonl file")
        return None
    if name in REGISTRY:
        if ok and split not in REGISTRY[name].splits:
            errors.append(f"{where}.split: dataset {name!r} has no split {split!r}; it has "
                          f"{', '.join(REGISTRY[name].splits)}")
            ok = False
    elif name.startswith("lmeval:"):  # a local lm-eval task YAML (tad_core.lmeval), relative like a .jsonl
        path = Path(name[len("lmeval:"):]).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            errors.append(f"{where}.dataset: {name!r}: the task YAML {str(path)!r} does not exist")
            return None
        name = f"lmeval:{path.resolve()}"
    else:
        path = Path(name).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if path.suffix != ".jsonl" or not path.is_file():
            errors.append(f"{where}.dataset: {name!r} is not a registered dataset ({', '.join(REGISTRY)}) nor an "
                          "existing .jsonl file")
            return None
        name = str(path.resolve())
    return SuiteDataset(name, split, limit) if ok else None


def parse_suite(data: Any, base_dir: Path | None = None) -> SuiteSpec:
    """Validate a suite definition (the parsed YAML mapping); relative .jsonl paths are resolved against
    `base_dir`. Raises SuiteError listing every problem."""
    from tad_core.evaluate import EvalConfig
    from tad_core.strategies import parse_strategy_arg

    if not isinstance(data, dict):
        raise SuiteError([f"the suite must be a mapping with fields {', '.join(SUITE_FIELDS)}, got "
                          f"{type(data).__name__}"])
    errors: list[str] = []
    unknown = sorted(set(data) - set(SUITE_FIELDS))
    if unknown:
        errors.append(f"unknown field(s) {', '.join(map(str, unknown))}; known: {', '.join(SUITE_FIELDS)}")
    name, version = data.get("name"), data.get("version")
    if not isinstance(name, str) or not NAME_RE.match(name):
        errors.append(f"name: required, letters, digits, '_', '.', '-' (no ':'), got {name!r}")
    if not _positive_int(version):
        errors.append(f"version: required, a positive integer, got {version!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        errors.append(f"description: must be a string, got {description!r}")
    raw_datasets = data.get("datasets")
    datasets: list[SuiteDataset] = []
    if not isinstance(raw_datasets, list) or not raw_datasets:
        errors.append("datasets: required, a non-empty list of {dataset, split, limit}")
    else:
        for i, item in enumerate(raw_datasets):
            d = _check_dataset(i, item, base_dir, errors)
            if d is not None:
                datasets.append(d)
        seen: set[tuple[str, str, int | None]] = set()
        for d in datasets:
            if (d.dataset, d.split, d.limit) in seen:
                errors.append(f"datasets: {d.label} is listed twice")
            seen.add((d.dataset, d.split, d.limit))
    raw_strategies = data.get("strategies")
    strategies: list[str] = []
    if isinstance(raw_strategies, str):
        raw_strategies = [raw_strategies]
    if not isinstance(raw_strategies, list) or not raw_strategies:
        errors.append("strategies: required, a non-empty list of strategy specs (e.g. ft, \"tad:alpha=1\")")
    else:
        for i, text in enumerate(raw_strategies):
            if not isinstance(text, str):
                errors.append(f"strategies[{i}]: must be a string like \"tad:alpha=1\", got {text!r}")
                continue
            try:
                parse_strategy_arg(text)
            except ValueError as e:
                errors.append(f"strategies[{i}]: {e}")
                continue
            strategies.append(text.strip())
    config = data.get("config") or {}
    if not isinstance(config, dict):
        errors.append(f"config: must be a mapping of generation settings, got {config!r}")
        config = {}
    else:
        try:
            EvalConfig.from_json(config)
        except (TypeError, ValueError) as e:
            errors.append(f"config: {e}")
    if errors:
        raise SuiteError(errors)
    return SuiteSpec(name=name, version=version, datasets=tuple(datasets), strategies=tuple(strategies),
                     config=dict(config), description=description)


def load_suite_file(path: str | Path) -> SuiteSpec:
    """Read and validate a suite YAML file (SuiteError naming the file's problems)."""
    import yaml

    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        raise SuiteError([f"cannot read suite file {str(path)!r}: {e.strerror or e}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SuiteError([f"suite file {str(path)!r} is not valid YAML: {e}"]) from None
    return parse_suite(data, base_dir=path.resolve().parent)
