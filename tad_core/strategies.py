"""Decoding strategies: each turns one step's base and fine-tuned logits into next-token scores.

One strategy = one small class (validated parameters, one pure method), registered by name, like transformers'
logits processors. The exact formulas are in STRATEGIES.md; every strategy works in float32, never in place.
A strategy crosses process boundaries as a JSON spec `{"name": ..., "params": {...}}` (`StrategySpec`).
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch

NEG = -1e30  # finite stand-in for -inf inside arithmetic; only final scores carry -inf


class Step:
    """The two next-token logit tensors of one decoding step (any leading shape, vocabulary last).

    Derived quantities are computed once and shared by every strategy and statistic of the step.
    """

    def __init__(self, z_b: torch.Tensor | None, z_f: torch.Tensor | None,
                 extras: dict[str, Any] | None = None) -> None:
        self.z_b = None if z_b is None else z_b.float()
        self.z_f = None if z_f is None else z_f.float()
        self.extras = extras or {}
        self._heads: dict[float, torch.Tensor] = {}

    @cached_property
    def lp_f(self) -> torch.Tensor:
        return torch.log_softmax(_need(self.z_f, "fine-tuned"), dim=-1)

    @cached_property
    def lp_b(self) -> torch.Tensor:
        return torch.log_softmax(_need(self.z_b, "base"), dim=-1)

    @cached_property
    def p_f(self) -> torch.Tensor:
        return self.lp_f.exp()

    @cached_property
    def p_b(self) -> torch.Tensor:
        return self.lp_b.exp()

    @cached_property
    def kv(self) -> torch.Tensor:
        """The knowledge vector `p_f - p_b`."""
        return self.p_f - self.p_b

    def head(self, a: float) -> torch.Tensor:
        """Plausibility head of the fine-tuned model: `p_f(v) >= a * max p_f` (as a boolean mask)."""
        if a not in self._heads:
            lp = self.lp_f
            self._heads[a] = lp >= lp.max(dim=-1, keepdim=True).values + math.log(a)
        return self._heads[a]


def _need(z: torch.Tensor | None, side: str) -> torch.Tensor:
    if z is None:
        raise ValueError(f"this strategy needs the {side} model's logits, which were not computed")
    return z


def _masked(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(~keep, float("-inf"))


@dataclass(frozen=True)
class Param:
    default: float | int | str | list
    help: str
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    positive: bool = False  # strictly > 0


class Strategy:
    """Base class: subclasses set `name`, `needs`, `params`, `description` and implement `scores_from`."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]]  # subset of {"base", "ft"}
    params: ClassVar[dict[str, Param]] = {}
    description: ClassVar[str] = ""
    needs_hidden: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(self.params)
        if unknown:
            raise ValueError(
                f"strategy {self.name!r}: unknown parameter(s) {sorted(unknown)}; known: {sorted(self.params)}")
        self.values: dict[str, Any] = {}
        for pname, spec in self.params.items():
            self.values[pname] = self._check(pname, spec, params.get(pname, spec.default))

    def _check(self, pname: str, spec: Param, value: Any) -> Any:
        if isinstance(spec.default, (int, float)) and not isinstance(spec.default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"strategy {self.name!r}: parameter {pname!r} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"strategy {self.name!r}: parameter {pname!r} must be finite, got {value!r}")
            if spec.minimum is not None and value < spec.minimum:
                raise ValueError(f"strategy {self.name!r}: parameter {pname!r} must be >= {spec.minimum}, got {value}")
            if spec.maximum is not None and value > spec.maximum:
                raise ValueError(f"strategy {self.name!r}: parameter {pname!r} must be <= {spec.maximum}, got {value}")
            if spec.positive and value <= 0:
                raise ValueError(f"strategy {self.name!r}: parameter {pname!r} must be > 0, got {value}")
        return value

    def __getattr__(self, item: str) -> Any:
        values = self.__dict__.get("values", {})
        if item in values:
            return values[item]
        raise AttributeError(item)

    def __call__(self, z_b: torch.Tensor | None, z_f: torch.Tensor | None) -> torch.Tensor:
        """Scores from raw logits (a pure function of `(z_b, z_f)`)."""
        return self.scores_from(Step(z_b, z_f))

    def scores_from(self, step: Step) -> torch.Tensor:
        raise NotImplementedError

    @property
    def spec(self) -> "StrategySpec":
        return StrategySpec(self.name, dict(self.values))


REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    REGISTRY[cls.name] = cls
    return cls


@register
class FineTuned(Strategy):
    name = "ft"
    needs = frozenset({"ft"})
    description = "plain decoding from the fine-tuned model: log p_f"

    def scores_from(self, step: Step) -> torch.Tensor:
        return step.lp_f


@register
class Base(Strategy):
    name = "base"
    needs = frozenset({"base"})
    description = "plain decoding from the pre-trained base model: log p_b"

    def scores_from(self, step: Step) -> torch.Tensor:
        return step.lp_b


@register
class TaD(Strategy):
    name = "tad"
    needs = frozenset({"base", "ft"})
    params = {
        "alpha": Param(1.0, "strength of the knowledge vector kv = p_f - p_b", minimum=0.0),
        "beta": Param(0.0, "plausibility head threshold on p_f (0 = no mask)", minimum=0.0, maximum=1.0),
    }
    description = "Task-aware Decoding: log normalize(clamp(p_f + alpha*(p_f - p_b), 0)) on head(beta)"

    def scores_from(self, step: Step) -> torch.Tensor:
        if self.alpha == 0.0:
            s = step.lp_f  # p_f + 0*kv = p_f exactly; log(normalize(p_f)) is lp_f
        else:
            q = torch.clamp_min(step.p_f + self.alpha * step.kv, 0.0)
            s = torch.log(q / q.sum(dim=-1, keepdim=True))
        return _masked(s, step.head(self.beta)) if self.beta > 0 else s


@register
class TaDLog(Strategy):
    name = "tad_log"
    needs = frozenset({"base", "ft"})
    params = {
        "alpha": Param(0.5, "weight of lp_f - lp_b (emulated fine-tuning up-scaling with weight 1+alpha)", minimum=0.0),
        "beta": Param(0.1, "plausibility head threshold on p_f", minimum=0.0, maximum=1.0),
    }
    description = "logit-space TaD: lp_f + alpha*(lp_f - lp_b) on head(beta)"

    def scores_from(self, step: Step) -> torch.Tensor:
        s = step.lp_f + self.alpha * (step.lp_f - step.lp_b)
        return _masked(s, step.head(self.beta)) if self.beta > 0 else s


@register
class Contrastive(Strategy):
    name = "contrastive"
    needs = frozenset({"base", "ft"})
    params = {
        "beta": Param(0.1, "plausibility head threshold on p_f", minimum=0.0, maximum=1.0),
        "tau": Param(1.0, "amateur (base) temperature", positive=True),
    }
    description = "contrastive decoding (Li et al. 2022), expert = fine-tuned, amateur = base: lp_f - lp_b/tau on head(beta)"

    def scores_from(self, step: Step) -> torch.Tensor:
        s = step.lp_f - step.lp_b / self.tau
        return _masked(s, step.head(self.beta)) if self.beta > 0 else s


@dataclass(frozen=True)
class StrategySpec:
    """A strategy as data: name + parameters; `key` is its canonical, human-readable identity."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def key(self) -> str:
        if not self.params:
            return self.name
        inner = ",".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        return f"{self.name}({inner})"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> "StrategySpec":
        if isinstance(data, str):
            data = json.loads(data)
        return build(cls(data["name"], dict(data.get("params") or {}))).spec

    @property
    def needs(self) -> frozenset[str]:
        return REGISTRY[self.name].needs


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def build(spec: StrategySpec) -> Strategy:
    """Instantiate (and so validate) a strategy from its spec."""
    cls = REGISTRY.get(spec.name)
    if cls is None:
        raise ValueError(f"unknown strategy {spec.name!r}; known: {', '.join(sorted(REGISTRY))}")
    return cls(**spec.params)


def canonical(spec: StrategySpec) -> StrategySpec:
    """The spec with every parameter filled in and normalised (so equal strategies have equal keys)."""
    return build(spec).spec


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_strategy_arg(text: str) -> list[StrategySpec]:
    """Parse a CLI strategy like `tad:alpha=0.5,1,2,beta=0.1` into specs (a comma list sweeps a parameter).

    Values after a `name=` token belong to that parameter until the next `name=`; sweeps of several parameters
    expand to their cartesian product.
    """
    name, _, rest = text.strip().partition(":")
    if name not in REGISTRY:
        raise ValueError(f"unknown strategy {name!r} in {text!r}; known: {', '.join(sorted(REGISTRY))}")
    grid: dict[str, list[Any]] = {}
    current: str | None = None
    for token in filter(None, (t.strip() for t in rest.split(","))):
        if "=" in token:
            current, _, value = token.partition("=")
            current = current.strip()
            if current in grid:
                raise ValueError(f"strategy {name!r}: parameter {current!r} given twice in {text!r}")
            grid[current] = [_parse_value(value.strip())]
        elif current is None:
            raise ValueError(f"strategy {name!r}: expected param=value in {text!r}, got {token!r}")
        else:
            grid[current].append(_parse_value(token))
    keys = list(grid)
    specs = [canonical(StrategySpec(name, dict(zip(keys, combo)))) for combo in itertools.product(*grid.values())]
    return specs


def describe_strategies() -> list[dict[str, Any]]:
    """Every registered strategy with its parameters, defaults and one-line description (for `tad strategies`)."""
    return [
        {
            "name": cls.name,
            "needs": sorted(cls.needs),
            "params": {k: {"default": p.default, "help": p.help} for k, p in cls.params.items()},
            "description": cls.description,
        }
        for cls in REGISTRY.values()
    ]
