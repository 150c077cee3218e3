"""SVDecode's step-size calibration: estimate `mu` from teacher-forced gold continuations, store it, reuse it.

Per gold token `y*` with the step's `p_f`, `p_b` (docs/strategies.md, "SVDecode calibration of mu"):
`mu_t = <e_{y*} - p_f, delta_m> / (||delta_m||^2 + 1e-12)`, `delta_m` = SVDecode's `delta` on `head(beta)` and 0
elsewhere (so both products run over the unmasked entries only); `mu` = mean (or median) of `mu_t`, sign unclamped.
The forwards are the MC scorer's (`tad_core.scoring.teacher_force`): one paired forward per batch.

A calibration is identified by (fine-tuned side fingerprint, dataset content hash, split, beta, n, reduce) and
stored as JSON under `cache_dir()/calibrations/<key>.json`; `cached_calibration` computes it once and reuses it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from tad_core import adapter_dir as layout
from tad_core.assets import sha256_file
from tad_core.models import PairedModel
from tad_core.paths import atomic_target, cache_subdir
from tad_core.samples import Sample
from tad_core.scoring import build_units, teacher_force
from tad_core.strategies import Step, StrategySpec, canonical, svdecode_delta

CALIBRATION_VERSION = 1
Reduce = Literal["mean", "median"]


@dataclass(frozen=True)
class CalibrationResult:
    mu: float
    n_tokens: int
    n_samples: int
    reduce: str
    beta: float
    key: str = ""  # storage key ("" when not stored)
    dataset: str = ""
    split: str = ""
    content_hash: str = ""
    pair: str = ""  # fingerprint of the base + fine-tuned side

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CalibrationResult":
        return cls(**data)


def svdecode_mu_per_token(step: Step, targets: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """`mu_t` for each position of a `[N, V]` step whose gold next tokens are `targets` `[N]`."""
    delta = svdecode_delta(step)
    if beta > 0:
        delta = delta.masked_fill(~step.head(beta), 0.0)
    resid = -step.p_f
    resid = resid.scatter_add(-1, targets[:, None], torch.ones_like(targets, dtype=resid.dtype)[:, None])
    return (resid * delta).sum(-1) / (delta.pow(2).sum(-1) + 1e-12)


def _reduce(values: torch.Tensor, how: str) -> float:
    v = values.double()
    return float(v.mean()) if how == "mean" else float(v.median())


def calibrate_svdecode_mu(pair: PairedModel, samples: Sequence[Sample], beta: float = 0.1, n: int = 128,
                          reduce: Reduce = "mean", batch_size: int = 8, delimiter: str = " ") -> CalibrationResult:
    """Calibrate `mu` on the gold continuations of the first `n` samples that have one (MC: the answer choice;
    generation: the reference after the prompt)."""
    if reduce not in ("mean", "median"):
        raise ValueError(f"reduce must be 'mean' or 'median', got {reduce!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    gold = [s for s in samples if (s.reference if s.kind == "gen" else s.answer is not None)][:n]
    if not gold:
        raise ValueError("no calibration sample has a gold continuation (an MC answer or a generation reference)")
    mus: list[torch.Tensor] = []
    for i in range(0, len(gold), batch_size):
        units = build_units(pair.tokenizer, gold[i: i + batch_size], delimiter, gold_only=True)
        tf = teacher_force(pair, units, need_ft=True, need_base=True)
        mus.append(svdecode_mu_per_token(tf.step, tf.targets, beta))
    mu_t = torch.cat(mus)
    mu = _reduce(mu_t, reduce)
    if not math.isfinite(mu):
        raise ValueError(f"svdecode calibration gave a non-finite mu ({mu})")
    return CalibrationResult(mu=mu, n_tokens=int(mu_t.numel()), n_samples=len(gold), reduce=reduce,
                             beta=float(beta))


def _dir_identity(d: Path) -> dict[str, Any]:
    """A model directory's identity: config bytes, the GGUF it came from, and its weight files' names and sizes
    (not their full hash, which would read gigabytes at every look-up)."""
    ident: dict[str, Any] = {}
    for name in ("config.json", "tad_source.json"):
        if (d / name).is_file():
            ident[name] = hashlib.sha256((d / name).read_bytes()).hexdigest()
    ident["weights"] = sorted((p.name, p.stat().st_size) for p in d.glob("*.safetensors"))
    return ident


def pair_fingerprint(pair: PairedModel) -> str:
    """Identity of the base + fine-tuned side: base model directory, and the adapter weights' sha256 (the same
    hash the service records) or the fully fine-tuned directory's identity."""
    cached = pair.info.get("fingerprint")
    if cached:
        return cached
    ident: dict[str, Any] = {"base": pair.base_name, "base_dir": _dir_identity(Path(pair.base_dir)), "path": pair.path}
    if pair.adapter_dir is not None:
        adir = Path(pair.adapter_dir)
        weights = layout.weights_file(adir)
        if weights is None:
            raise FileNotFoundError(f"adapter {adir} has no {layout.SAFETENSORS}")
        ident["adapter"] = sha256_file(weights)
        ident["adapter_config"] = hashlib.sha256((adir / layout.CONFIG).read_bytes()).hexdigest()
    if pair.finetuned_dir is not None:
        ident["finetuned"] = _dir_identity(Path(pair.finetuned_dir))
    fp = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    pair.info["fingerprint"] = fp
    return fp


def calibration_key(pair_fp: str, content_hash: str, split: str, beta: float, n: int, reduce: str) -> str:
    ident = {"v": CALIBRATION_VERSION, "pair": pair_fp, "data": content_hash, "split": split, "beta": float(beta),
             "n": int(n), "reduce": reduce}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def calibrations_dir() -> Path:
    return cache_subdir("calibrations")


def load_calibration(key: str) -> CalibrationResult | None:
    path = calibrations_dir() / f"{key}.json"
    try:
        return CalibrationResult.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def cached_calibration(pair: PairedModel, dataset_name: str, split: str = "train", n: int = 128,
                       beta: float = 0.1, reduce: Reduce = "mean") -> CalibrationResult:
    """The stored calibration for (pair, dataset split content, beta, n, reduce), computed on first use.

    The calibration samples are the split's first `n` samples with a gold continuation (deterministic).
    """
    from tad_core.datasets import load_dataset

    data = load_dataset(dataset_name, split)
    key = calibration_key(pair_fingerprint(pair), data.content_hash, split, beta, n, reduce)
    found = load_calibration(key)
    if found is not None:
        return found
    res = calibrate_svdecode_mu(pair, data.samples, beta=beta, n=n, reduce=reduce)
    res = CalibrationResult(**{**res.to_json(), "key": key, "dataset": data.name, "split": split,
                               "content_hash": data.content_hash, "pair": pair_fingerprint(pair)})
    path = calibrations_dir() / f"{key}.json"
    with atomic_target(path) as tmp:
        tmp.write_text(json.dumps(res.to_json(), indent=2, sort_keys=True) + "\n")
    return res


def needs_calibration(spec: StrategySpec) -> bool:
    return spec.name == "svdecode" and spec.params.get("mu", "auto") == "auto"


def resolve_auto_specs(pair: PairedModel, specs: Sequence[StrategySpec], dataset_name: str | None,
                       split: str = "train", n: int = 128) -> tuple[list[StrategySpec], dict[str, CalibrationResult]]:
    """Replace every `svdecode(mu=auto)` by its calibrated numeric `mu` (+ the calibration key in the spec).

    Returns the resolved specs (other specs unchanged) and the calibrations used, by resolved spec key.
    """
    out: list[StrategySpec] = []
    used: dict[str, CalibrationResult] = {}
    for spec in specs:
        spec = canonical(spec)
        if not needs_calibration(spec):
            out.append(spec)
            continue
        if not dataset_name:
            raise ValueError("svdecode with mu='auto' needs a calibration dataset (its train split's gold "
                             "continuations calibrate mu); pass one, or give mu a number")
        cal = cached_calibration(pair, dataset_name, split, n, beta=spec.params["beta"])
        resolved = canonical(StrategySpec("svdecode", {**spec.params, "mu": float(f"{cal.mu:.6g}"),
                                                       "calibration": cal.key}))
        out.append(resolved)
        used[resolved.key] = cal
    return out, used
