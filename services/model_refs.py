"""The model side of a request, checked at submission without loading a model: the base model (a registered
name or a directory inside the model roots), an adapter directory (PEFT layout, weights hash, manifest, fit with
the base) or a registered `NAME:VERSION`, a fully fine-tuned directory. Problems are appended to an `errors`
list so a submission reports all of them at once."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tad_core import adapter_dir as layout
from tad_core.assets import sha256_file

from services.refs import NAME_RE, RefError, parse_ref
from services.security import SecurityError, resolve_under_roots
from services.settings import Settings
from services.submit_request import SubmissionError, SubmitRequest


@dataclass(frozen=True)
class ModelSide:
    base_name: str
    base_path: str
    base_fingerprint: str
    adapter_dir: Path | None = None
    adapter_ref: tuple[str, int | None] | None = None  # registered name:version
    adapter_method: str = ""
    adapter_sha256: str = ""
    adapter_manifest: dict[str, Any] = field(default_factory=dict)
    finetuned_dir: Path | None = None
    finetuned_fingerprint: str = ""


def _dir_fingerprint(path: Path) -> str:
    """Identity of a model directory without hashing gigabytes: config bytes + weight file names and sizes."""
    h = hashlib.sha256()
    for name in ("config.json", "tad_source.json"):
        if (path / name).is_file():
            h.update((path / name).read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def _parse_adapter_ref(text: str) -> tuple[str, int | None] | None:
    """`name:version` or `name:latest` -> (name, version); None when `text` looks like a path."""
    if "/" in text or text.startswith((".", "~")) or Path(text).expanduser().exists() or ":" not in text:
        return None
    try:
        return parse_ref(text, "--adapter")
    except RefError as e:
        raise SubmissionError([str(e)]) from None


@dataclass(frozen=True)
class AdapterDir:
    """A validated PEFT adapter directory: where it is, its weights' sha256, PEFT method and `tad train` manifest."""

    path: Path
    sha256: str
    method: str
    manifest: dict[str, Any]


def inspect_adapter_dir(text: str, settings: Settings, errors: list[str]) -> AdapterDir | None:
    """Validate an adapter directory (inside the model roots, PEFT config, safetensors weights) without loading it;
    problems are appended to `errors` (None returned)."""
    try:
        adir = resolve_under_roots(text, settings, "adapter")
    except SecurityError as e:
        errors.append(str(e))
        return None
    if not (adir / layout.CONFIG).is_file():
        errors.append(f"adapter {text!r}: not a PEFT adapter directory (no {layout.CONFIG})")
        return None
    weights = layout.weights_file(adir)
    if weights is None:
        errors.append(f"adapter {text!r} has no {layout.SAFETENSORS}")
        return None
    if weights.name == layout.PICKLED and not settings.allow_pickle:
        errors.append(f"adapter {text!r} stores pickled weights ({layout.PICKLED}); convert it to "
                      "safetensors (pickle can run code on load; TAD_ALLOW_PICKLE=1 overrides)")
        return None
    try:
        cfg = json.loads((adir / layout.CONFIG).read_text())
    except (OSError, ValueError) as e:
        errors.append(f"adapter {text!r}: unreadable {layout.CONFIG} ({e})")
        return None
    return AdapterDir(adir, sha256_file(weights), str(cfg.get("peft_type", "unknown")).lower(),
                      layout.read_manifest(adir))


def resolve_base(base: str, settings: Settings, errors: list[str]) -> tuple[str, str] | None:
    """(path, fingerprint) of a base model: a registered name (fingerprint of its pinned source) or a model
    directory inside the model roots (fingerprint of its config and weight files); problems go to `errors`."""
    from tad_core.models import KNOWN_MODELS

    try:
        if base in KNOWN_MODELS:
            return base, hashlib.sha256(KNOWN_MODELS[base].requirement.encode()).hexdigest()
        path = resolve_under_roots(base, settings, "base model")
    except SecurityError as e:
        errors.append(str(e))
        return None
    if not (path / "config.json").is_file():
        errors.append(f"base model {base!r}: not a registered name ({', '.join(KNOWN_MODELS)}) "
                      "nor a model directory with config.json")
        return None
    return str(path), _dir_fingerprint(path)


def local_base_dir(base: str, base_path: str) -> Path | None:
    """The base model's directory when it is already on this machine (a registered name fetched into the cache,
    or a model directory), else None: submission never downloads or converts a model."""
    from tad_core.models import KNOWN_MODELS
    from tad_core.paths import cache_subdir

    path = cache_subdir("models") / KNOWN_MODELS[base].name if base in KNOWN_MODELS else Path(base_path)
    return path if (path / "config.json").is_file() else None


def _adapter_fits_base(text: str, found: AdapterDir, base: str, base_path: str, settings: Settings,
                       errors: list[str]) -> bool:
    """Refuse at submission an adapter made for another base model, which would otherwise fail in the worker on
    every attempt of every shard: the base its `tad train` manifest names, and (load-free, when the base is on
    this machine) the shapes of its LoRA weights against the base's modules."""
    from tad_core.models import KNOWN_MODELS, ModelLoadError, check_adapter_fits

    trained_on = found.manifest.get("base")
    if isinstance(trained_on, str) and trained_on in KNOWN_MODELS and base in KNOWN_MODELS and trained_on != base:
        errors.append(f"adapter {text!r} was trained on base model {trained_on!r} (its manifest), not {base!r}; "
                      f"pass --base {trained_on}")
        return False
    local = local_base_dir(base, base_path)
    if local is None:
        return True  # the worker checks it when loading
    try:
        check_adapter_fits(str(local), found.path, allow_pickle=settings.allow_pickle)
    except ModelLoadError as e:
        errors.append(str(e).replace(repr(str(local)), repr(base)))
        return False
    except (OSError, ValueError) as e:
        errors.append(f"adapter {text!r}: cannot check it against base model {base!r} ({e})")
        return False
    return True


def check_models(req: SubmitRequest, settings: Settings, errors: list[str]) -> ModelSide | None:
    if req.adapter and req.finetuned:
        errors.append("pass either --adapter or --finetuned, not both")
        return None
    resolved = resolve_base(req.base, settings, errors)
    if resolved is None:
        return None
    side = ModelSide(base_name=req.base, base_path=resolved[0], base_fingerprint=resolved[1])
    if req.adapter:
        ref = _parse_adapter_ref(req.adapter)
        if ref is not None:
            return ModelSide(**{**side.__dict__, "adapter_ref": ref})
        found = inspect_adapter_dir(req.adapter, settings, errors)
        if found is None or not _adapter_fits_base(req.adapter, found, req.base, side.base_path, settings, errors):
            return None
        name = req.adapter_name or found.path.name  # what the adapter is registered as, `NAME:VERSION` afterwards
        if not NAME_RE.match(name):
            errors.append(f"adapter name {name!r}"
                          f"{'' if req.adapter_name else ' (the directory name)'}: use letters, digits, '_', '.', "
                          "'-' (at most 200, no ':' or '/'), or give --adapter-name")
            return None
        return ModelSide(**{**side.__dict__, "adapter_dir": found.path, "adapter_sha256": found.sha256,
                             "adapter_method": found.method, "adapter_manifest": found.manifest})
    if req.finetuned:
        try:
            fdir = resolve_under_roots(req.finetuned, settings, "fine-tuned model")
        except SecurityError as e:
            errors.append(str(e))
            return None
        if not (fdir / "config.json").is_file():
            errors.append(f"fine-tuned model {req.finetuned!r}: not a model directory (no config.json)")
            return None
        return ModelSide(**{**side.__dict__, "finetuned_dir": fdir, "finetuned_fingerprint": _dir_fingerprint(fdir)})
    return side
