"""Submission: validate a whole request (token, strategies, generation config, models, dataset, per-sample
budgets, prompt format) BEFORE anything is stored. `validate_request` raises SubmissionError listing every
problem (or SecurityError); services.planning stores what passed."""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.dataset_input import check_dataset, DatasetData, line_numbers
from services.model_refs import check_models, ModelSide, local_base_dir
from services.security import check_submit_token
from services.settings import Settings, get_settings
from services.submit_request import SubmissionError, SubmitRequest

log = logging.getLogger(__name__)

MAX_RUN_KEY_CHARS = 300  # runs.key is a VARCHAR(300)


def _check_strategies(args: Sequence[str], errors: list[str]) -> list[Any]:
    from tad_core.strategies import parse_strategy_arg

    specs: dict[str, Any] = {}
    for arg in args:
        try:
            for spec in parse_strategy_arg(arg):
                specs.setdefault(spec.key, spec)
        except ValueError as e:
            errors.append(f"--strategy {arg!r}: {e}")
    for key in [k for k in specs if len(k) > MAX_RUN_KEY_CHARS]:
        errors.append(f"--strategy {key[:80]!r}...: its run key is {len(key)} characters, at most {MAX_RUN_KEY_CHARS}")
        del specs[key]
    if not args:
        errors.append("give at least one --strategy")
    if specs and "ft" not in {s.name for s in specs.values()}:
        # every other strategy is compared with the fine-tuned model (fixed/broken, McNemar): always include it
        (ft,) = parse_strategy_arg("ft")
        specs = {ft.key: ft, **specs}
    return list(specs.values())


def _check_config(values: dict[str, Any], errors: list[str]) -> Any:
    from tad_core.evaluate import EvalConfig

    try:
        return EvalConfig(**{k: v for k, v in values.items() if v is not None})
    except (TypeError, ValueError) as e:
        errors.append(f"generation config: {e}")
        return None


def _check_dola_layers(specs: list[Any], side: ModelSide, errors: list[str]) -> None:
    """DoLa's premature layers against the base model's depth (read from its config.json when it is on this
    machine): a layer list past the last layer used to be accepted, and every sample of the job then failed."""
    dola = [sp for sp in specs if sp.name == "dola"]
    local = local_base_dir(side.base_name, side.base_path) if dola else None
    if local is None:
        return  # no config here (a model the worker fetches): the worker refuses it, naming the layers
    from transformers import AutoConfig

    from tad_core.early_exit import layer_layout
    from tad_core.strategies import build, dola_candidate_layers

    try:
        n, tied = layer_layout(AutoConfig.from_pretrained(local))
    except (OSError, ValueError, AttributeError):
        return  # a config transformers cannot read: loading the model refuses it, with its own message
    for sp in dola:
        try:
            if not dola_candidate_layers(build(sp).layers, n, tied):
                errors.append(f"strategy {sp.key!r}: no candidate premature layer in a {n}-layer model")
        except ValueError as e:
            errors.append(f"strategy {sp.key!r}: " + str(e).removeprefix("strategy 'dola': "))


@functools.lru_cache(maxsize=4)
def _submit_tokenizer(model_dir: str) -> Any:
    """The base model's tokenizer, loaded once per process (the dashboard submits many times)."""
    from tad_core.models import load_tokenizer

    return load_tokenizer(Path(model_dir))


def _check_budgets(data: DatasetData, config: Any, side: ModelSide, settings: Settings,
                   errors: list[str], limit: int | None = None, max_errors: int = 50) -> None:
    """Refuse samples over the per-sample budgets (services.budgets) before anything is stored, naming line, id and
    field. Token budgets need the base model's tokenizer; a submitting machine without the base model checks the
    choice counts only (the worker checks everything again)."""
    from tad_core.samples import Sample

    from services.budgets import Budgets, generation_over_budget, over_budget, token_counter

    budgets = Budgets.from_settings(settings)
    if any(d.get("reference") is not None for d in data.samples):
        why = generation_over_budget(config.max_new_tokens, budgets)
        if why:
            errors.append(f"generation config: {why}")
    local = local_base_dir(side.base_name, side.base_path)
    count = None
    if local is not None:
        try:
            count = token_counter(_submit_tokenizer(str(local)))
        except Exception as e:  # noqa: BLE001 - an unreadable tokenizer: the worker will say more
            log.warning("no tokenizer for the submission's token budgets (%s); the worker checks them", e)
    lines = line_numbers(data.path)
    found = 0
    for i, d in enumerate(data.samples[:limit]):
        why = over_budget(Sample.from_dict(d), budgets, count, config.delimiter)
        if why is None:
            continue
        where = f"line {lines[i]}" if lines is not None and i < len(lines) else f"sample {i}"
        errors.append(f"dataset {data.name!r}: {where} (id {d.get('id')!r}): {why}")
        found += 1
        if found >= max_errors:
            errors.append(f"stopped after {max_errors} samples over budget")
            return


def _check_format(fmt_key: str, data: DatasetData, limit: int | None, errors: list[str]) -> None:
    """Every sample the job will evaluate must render in the prompt format (the first few problems listed)."""
    from tad_core.formats import FormatError, parse_format
    from tad_core.samples import Sample

    fmt = parse_format(fmt_key)
    bad: list[str] = []
    for i, d in enumerate(data.samples[:limit]):
        try:
            fmt.check(Sample.from_dict(d), data.name)
        except FormatError as e:
            bad.append(f"--format {fmt_key}: sample {i + 1} ({d.get('id')!r}): {e}")
    errors.extend(bad[:5] + ([f"--format {fmt_key}: {len(bad) - 5} more samples cannot be rendered"]
                             if len(bad) > 5 else []))


@dataclass(frozen=True)
class ValidatedRequest:
    """A request that passed every check, with what planning and reuse need; nothing is stored yet."""

    req: SubmitRequest
    specs: list[Any]
    config_json: dict[str, Any]
    side: ModelSide
    data: DatasetData
    n_samples: int
    shard_size: int


def validate_request(req: SubmitRequest, settings: Settings | None = None) -> ValidatedRequest:
    """Check `req` completely (token, strategies, config, models, dataset) without storing anything.

    Raises SubmissionError (listing every problem) or SecurityError.
    """
    settings = settings or get_settings()
    check_submit_token(settings, req.token)
    errors: list[str] = []
    specs = _check_strategies(req.strategies, errors)
    from services.model_dtype import resolve_config_dtype  # imports torch: only when a request is checked

    config = _check_config(resolve_config_dtype(req.config, settings), errors)
    side = check_models(req, settings, errors)
    data = check_dataset(req, settings, errors) if not errors else None
    if data is not None and any(sp.name == "svdecode" and sp.params.get("mu") == "auto" for sp in specs):
        from tad_core.datasets import REGISTRY

        if req.dataset not in REGISTRY or "train" not in REGISTRY[req.dataset].splits:
            errors.append("svdecode with mu=auto calibrates on the train split of a registered dataset; "
                          f"{req.dataset!r} has none: give mu a number (e.g. --strategy svdecode:mu=1.0)")
    if side is not None and specs:
        _check_dola_layers(specs, side, errors)
    if data is not None and side is not None and config is not None:
        _check_budgets(data, config, side, settings, errors, limit=req.limit)
    if data is not None and config is not None:
        _check_format(config.format, data, req.limit, errors)
    size = req.shard_size or settings.shard_size
    if size < 1:
        errors.append(f"shard size must be positive, got {size}")
    if errors or data is None or side is None or config is None:
        raise SubmissionError(errors or ["invalid submission"])
    n = len(data.samples) if req.limit is None else min(req.limit, len(data.samples))
    return ValidatedRequest(req, specs, config.to_json(), side, data, n, size)
