"""Registering an adapter directory as a new version of its family, and queueing the version's regression gates:
what `tad adapters register` and the API's `POST /adapters` both call.

Everything is checked before anything is stored: the family name, the directory (inside the model roots, PEFT
layout, weights), the base model it fits, and the gate suites asked for (registered, and a promoted baseline to
compare with). A family's default gate suites (`tad adapters gates NAME SUITE...`) apply when no suite is named;
when they cannot run yet (no promoted version) the version is registered and the reason returned.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.db import store
from services.db.session import session_scope
from services.gates import queue_gates, resolve_gate_suites
from services.model_refs import inspect_adapter_dir, resolve_base
from services.refs import NAME_RE
from services.regress import GateError
from services.settings import Settings, get_settings
from services.submit_request import SubmissionError


@dataclass(frozen=True)
class Registration:
    adapter: store.AdapterInfo
    created: bool  # False: these weights were already registered under this name (nothing stored)
    twins: list[str] = field(default_factory=list)  # other versions (any family) holding the same weights
    warnings: list[str] = field(default_factory=list)
    gates: list[store.GateRunInfo] = field(default_factory=list)  # queued now, or found for this version
    gates_skipped: str | None = None  # why the family's default gates were not queued


def check_family_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise GateError(f"adapter name {name!r}: use letters, digits, '_', '.', '-' (no ':' or '/')")


def register_adapter_dir(name: str, directory: str, *, version: int | None = None, base: str | None = None,
                         gate: Sequence[str] | None = None, alpha: float = 0.05, min_effect: float = 0.01,
                         submitted_by: str = "", settings: Settings | None = None) -> Registration:
    """Register `directory` as a version of family `name` and queue its gates (`gate`: suite references; None:
    the family's defaults). Raises GateError / SubmissionError before storing anything."""
    from tad_core.models import DEFAULT_BASE, ModelLoadError, check_adapter_fits, model_licence

    settings = settings or get_settings()
    check_family_name(name)
    errors: list[str] = []
    found = inspect_adapter_dir(directory, settings, errors)
    if found is None:
        raise SubmissionError(errors)
    trained_on = found.manifest.get("base")
    if base is not None and trained_on and trained_on != base:
        raise GateError(f"adapter {directory} was trained on base model {trained_on!r} (tad_manifest.json), not "
                        f"{base!r}")
    base_name = base or trained_on or DEFAULT_BASE
    resolved = resolve_base(base_name, settings, errors)
    if resolved is None:
        raise SubmissionError(errors)
    try:
        check_adapter_fits(resolved[0], found.path, allow_pickle=settings.allow_pickle)
    except ModelLoadError as e:
        raise GateError(str(e)) from None
    warnings = []
    if found.manifest.get("adapter_sha256") not in (None, found.sha256):
        warnings.append(f"{found.path}/tad_manifest.json describes other weights (sha256 "
                        f"{str(found.manifest['adapter_sha256'])[:12]}) than the directory holds ({found.sha256[:12]})")
    skipped = None
    with session_scope(settings) as s:
        if gate:
            suites = resolve_gate_suites(s, name, found.sha256, gate)
        else:
            defaults = store.family_gate_suites(s, name)
            suites = []
            if defaults:
                try:
                    suites = resolve_gate_suites(s, name, found.sha256, defaults)
                except GateError as e:
                    skipped = f"default gates of {name} not queued: {e}"
        base_row = store.get_or_create_base_model(s, base_name, resolved[0], resolved[1],
                                                  model_licence(base_name, Path(resolved[0])))
        twins = [a.label for a in store.list_adapters(s) if a.sha256 == found.sha256]
        try:
            info, created = store.register_adapter(
                s, name=name, path=str(found.path), method=found.method, sha256=found.sha256,
                base_model_id=base_row.id, manifest=found.manifest, version=version)
        except ValueError as e:
            raise GateError(str(e)) from None
        earlier = {g.suite_id: g for g in store.gate_runs(s, candidate_ids=[info.id]) if g.status != "error"}
    todo = [x for x in suites if x.id not in earlier]
    gates = [earlier[x.id] for x in suites if x.id in earlier]
    if todo:
        gates += queue_gates(info, todo, alpha=alpha, min_effect=min_effect, submitted_by=submitted_by,
                             settings=settings)
    return Registration(info, created, [t for t in twins if t != info.label], warnings, gates, skipped)


def set_default_gates(family: str, suites: Sequence[str], settings: Settings | None = None) -> list[str]:
    """Name the suites every new version of `family` is gated on (each must be registered; [] clears them)."""
    from services.refs import RefError, parse_ref

    settings = settings or get_settings()
    check_family_name(family)
    with session_scope(settings) as s:
        for text in suites:
            try:
                ref = parse_ref(text, "gate suite")
            except RefError as e:
                raise GateError(str(e)) from None
            if store.find_suite(s, *ref) is None:
                raise GateError(f"gate suite {text!r} is not registered (tad suites add FILE; tad suites list)")
        store.set_family_gate_suites(s, family, [t.strip() for t in suites])
        return store.family_gate_suites(s, family)
