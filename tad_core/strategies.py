"""Decoding strategies: each turns one step's base and fine-tuned logits into next-token scores.

One strategy = one small class (validated parameters, one pure method), registered by name, like transformers'
logits processors. The exact formulas are in docs/strategies.md; every strategy works in float32, never in place.
A strategy crosses process boundaries as a JSON spec `{"name": ..., "params": {...}}` (`StrategySpec`).
"""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

NEG = -1e30  # finite stand-in for -inf inside arithmetic; only final scores carry -inf


def _once(fn: Callable[[Step], torch.Tensor]) -> property:
    """A `Step` property computed on first use and kept. Not `functools.cached_property`: on Python 3.11 that
    takes a lock, which `torch.compile` cannot trace, so the compiled strategy step (`tad_core.fused_step`) would
    silently fall back to eager frames."""
    name = fn.__name__

    def get(self: Step) -> torch.Tensor:
        if name not in self._memo:
            self._memo[name] = fn(self)
        return self._memo[name]
    return property(get, doc=fn.__doc__)


class Step:
    """The two next-token logit tensors of one decoding step (any leading shape, vocabulary last).

    Derived quantities are computed once and shared by every strategy and statistic of the step.
    """

    def __init__(self, z_b: torch.Tensor | None, z_f: torch.Tensor | None,
                 extras: dict[str, Any] | None = None) -> None:
        # -inf logits (a masked vocabulary slot, an fp16 overflow) become NEG: with a token at -inf in both models,
        # `lp_f - lp_b` was -inf - -inf = NaN and `p * lp` 0 * -inf = NaN, so tad_log and contrastive gave that
        # token a NaN score that argmax picked, and the step's KL / JS / entropies were NaN. At NEG its
        # probability is still exactly 0.
        self.z_b = None if z_b is None else z_b.float().clamp_min(NEG)
        self.z_f = None if z_f is None else z_f.float().clamp_min(NEG)
        self.extras = extras or {}
        self._heads: dict[float, torch.Tensor] = {}
        self._memo: dict[str, torch.Tensor] = {}

    @_once
    def lp_f(self) -> torch.Tensor:
        return torch.log_softmax(_need(self.z_f, "fine-tuned"), dim=-1)

    @_once
    def lp_b(self) -> torch.Tensor:
        return torch.log_softmax(_need(self.z_b, "base"), dim=-1)

    @_once
    def p_f(self) -> torch.Tensor:
        return self.lp_f.exp()

    @_once
    def p_b(self) -> torch.Tensor:
        return self.lp_b.exp()

    @_once
    def argmax_f(self) -> torch.Tensor:
        return self.lp_f.argmax(-1)

    @_once
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
    needs_hidden: ClassVar[bool] = False  # needs premature-layer logits in `Step.extras` (see `hidden_layers`)
    needs_history: ClassVar[bool] = False  # reads the tokens seen so far (`Step.extras["seen_tokens"]`)

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

    def target_scores(self, step: Step, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What multiple-choice scoring reads of the scores at every position: `log_softmax(scores)` at `targets`,
        and the argmax (for flip rates). This default goes through `scores_from`; a strategy whose scores are a
        normalised distribution may answer both without building the full-vocabulary scores (a test checks each
        override against this default)."""
        s = self.scores_from(step)
        return torch.log_softmax(s, dim=-1).gather(-1, targets[:, None]).squeeze(-1), s.argmax(-1)

    def greedy(self, step: Step) -> torch.Tensor:
        """The greedy next token: the argmax of `scores_from`. A strategy whose scores are a monotone map of a
        cheaper tensor may override it (TaD skips the full-vocabulary log); a test checks every override against
        this default."""
        return self.scores_from(step).argmax(-1)

    def hidden_layers(self, num_layers: int, tied_embeddings: bool) -> list[int]:
        """Hidden-state indices (0 = embedding output) whose early-exit logits `scores_from` reads."""
        return []

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

    def target_scores(self, step: Step, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return step.lp_f.gather(-1, targets[:, None]).squeeze(-1), step.argmax_f  # already log-probs

    def greedy(self, step: Step) -> torch.Tensor:
        return step.argmax_f


@register
class Base(Strategy):
    name = "base"
    needs = frozenset({"base"})
    description = "plain decoding from the pre-trained base model: log p_b"

    def scores_from(self, step: Step) -> torch.Tensor:
        return step.lp_b

    def target_scores(self, step: Step, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return step.lp_b.gather(-1, targets[:, None]).squeeze(-1), step.lp_b.argmax(-1)  # already log-probs


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

    def target_scores(self, step: Step, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In probability space: log_softmax of the (masked) scores is `log q(t) - log sum(q over the head)` and
        the argmax is q's, so the full-vocabulary log (most of TaD's cost in MC scoring) is never taken."""
        if self.alpha == 0.0:  # the fine-tuned distribution itself: exactly ft's scores when unmasked
            if self.beta == 0:
                return step.lp_f.gather(-1, targets[:, None]).squeeze(-1), step.argmax_f
            return super().target_scores(step, targets)
        q = self._q(step)
        lp = torch.log(q.gather(-1, targets[:, None]).squeeze(-1)) - torch.log(q.sum(dim=-1))
        return lp, q.argmax(-1)

    def greedy(self, step: Step) -> torch.Tensor:
        """argmax of `log(q / sum q)` is q's own (the head mask keeps p_f's argmax, so with alpha 0 it is ft's).
        A step where the clip leaves no token of the head (every score -inf) takes ft's token (`no_candidate`)."""
        if self.alpha == 0.0:
            return step.argmax_f
        q = self._q(step)
        return torch.where(q.amax(-1) > 0, q.argmax(-1), step.argmax_f)

    def _q(self, step: Step) -> torch.Tensor:
        """The unnormalised TaD distribution `clamp(p_f + alpha * kv, 0)`, zero outside the head."""
        q = torch.add(step.p_f, step.kv, alpha=self.alpha).clamp_min_(0.0)
        return q.masked_fill_(~step.head(self.beta), 0.0) if self.beta > 0 else q


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


def svdecode_delta(step: Step) -> torch.Tensor:
    """SVDecode's steering direction `delta = -p_f * (log(p_f/p_b) - KL(p_f || p_b))` (= J g, full vocabulary)."""
    r = step.lp_f - step.lp_b
    kl = (step.p_f * r).sum(dim=-1, keepdim=True)
    return -step.p_f * (r - kl)


@register
class SVDecode(Strategy):
    name = "svdecode"
    needs = frozenset({"base", "ft"})
    params = {
        "beta": Param(0.1, "plausibility head threshold on p_f", minimum=0.0, maximum=1.0),
        "mu": Param("auto", "step size (a number, may be negative) or 'auto' = calibrated on gold continuations"),
        "calibration": Param("", "key of the stored calibration that produced mu (set when 'auto' is resolved)"),
    }
    description = ("SVDecode (Hu et al. 2025): z_f + mu*delta, delta = -p_f*(log(p_f/p_b) - KL(p_f||p_b)), "
                   "on head(beta); mu calibrated by default")

    def _check(self, pname: str, spec: Param, value: Any) -> Any:
        if pname == "mu":
            if value == "auto":
                return value
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"strategy 'svdecode': parameter 'mu' must be a finite number or 'auto', got {value!r}")
            return float(value)
        if pname == "calibration":
            if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]*", value):
                raise ValueError(f"strategy 'svdecode': parameter 'calibration' must be a hex key, got {value!r}")
            return value
        return super()._check(pname, spec, value)

    @property
    def spec(self) -> "StrategySpec":
        params = dict(self.values)
        if not params["calibration"]:  # unset: keep it out of the run key
            del params["calibration"]
        return StrategySpec(self.name, params)

    def scores_from(self, step: Step) -> torch.Tensor:
        if self.mu == "auto":
            raise ValueError("strategy 'svdecode': mu='auto' must be resolved by a calibration before scoring "
                             "(tad_core.calibration.resolve_auto_specs, or evaluate(..., calibration_dataset=...))")
        # lp_f = z_f - logsumexp(z_f): a per-row constant shift of z_f, so softmax(s) is that of z_f + mu*delta
        s = step.lp_f + self.mu * svdecode_delta(step)
        return _masked(s, step.head(self.beta)) if self.beta > 0 else s


def _check_layers(value: Any) -> str | list[int]:
    if value in ("high", "low"):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, list) or not value
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in value)):
        raise ValueError(f"strategy 'dola': parameter 'layers' must be 'high', 'low' or a non-empty list of "
                         f"hidden-state indices >= 0, got {value!r}")
    return sorted(set(value))


def dola_candidate_layers(layers: str | list[int], num_layers: int, tied_embeddings: bool) -> list[int]:
    """Candidate premature layers, transformers' former DoLa convention (indices into `hidden_states`, 0 = embeddings).

    With tied embeddings the embedding output is skipped (its early exit is near-identity): start at 2 (1 for a
    2-layer model). `N <= 40`: low = range(start, N//2, 2), high = range(N//2, N, 2); deeper models use 20-layer
    buckets: low = range(start, 20, 2), high = range(N-20, N, 2).
    """
    n = num_layers
    start = (2 if n > 2 else 1 if n == 2 else 0) if tied_embeddings else 0
    if layers == "low":
        if start == n // 2:
            return [start]
        return list(range(start, n // 2, 2)) if n <= 40 else list(range(start, 20, 2))
    if layers == "high":
        return list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))
    bad = [i for i in layers if i >= n]
    if bad:
        raise ValueError(f"strategy 'dola': layers {bad} are not premature layers of a {n}-layer model "
                         f"(valid: 0..{n - 1}, 0 = embedding output)")
    return list(layers)


def js_divergence(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between distributions given as log-probs (reduced over the last dim)."""
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    return 0.5 * ((lp.exp() * (lp - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1))


@register
class DoLa(Strategy):
    name = "dola"
    needs = frozenset({"ft"})
    needs_hidden = True
    needs_history = True
    params = {
        "layers": Param("high", "candidate premature layers: 'high', 'low' or a list of hidden-state indices"),
        "repetition_penalty": Param(1.2, "penalty on already-seen tokens (generation only; 1 = off)", positive=True),
    }
    description = ("DoLa (Chuang et al. 2023) on the fine-tuned model: lp_final - lp_premature on head(0.1), "
                   "premature layer per position by max Jensen-Shannon divergence")

    def _check(self, pname: str, spec: Param, value: Any) -> Any:
        if pname == "layers":
            return _check_layers(value)
        return super()._check(pname, spec, value)

    def hidden_layers(self, num_layers: int, tied_embeddings: bool) -> list[int]:
        return dola_candidate_layers(self.layers, num_layers, tied_embeddings)

    def scores_from(self, step: Step) -> torch.Tensor:
        ex = step.extras
        if "premature_logits" not in ex:
            raise ValueError("strategy 'dola' needs premature-layer logits in Step.extras (the engine computes them "
                             "from the same forward when a strategy has needs_hidden)")
        layers = self.hidden_layers(ex["num_layers"], ex["tied_embeddings"])
        lp_f = step.lp_f
        best_jsd: torch.Tensor | None = None
        lp_m = lp_f
        for i in layers:  # one candidate at a time: memory stays O(N x V) whatever the number of candidates
            lq = torch.log_softmax(ex["premature_logits"][i].float(), dim=-1)
            jsd = js_divergence(lp_f, lq)
            if best_jsd is None:
                best_jsd, lp_m = jsd, lq
            else:
                better = jsd > best_jsd  # ties keep the lower candidate layer
                best_jsd = torch.where(better, jsd, best_jsd)
                lp_m = torch.where(better.unsqueeze(-1), lq, lp_m)
        s = _masked(lp_f - lp_m, step.head(0.1))
        seen = ex.get("seen_tokens")
        if seen is not None and self.repetition_penalty != 1.0:
            s = torch.where(seen, torch.where(s > 0, s / self.repetition_penalty, s * self.repetition_penalty), s)
        return s


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
    if isinstance(v, list):
        return json.dumps(v, separators=(",", ":"))
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


_COMMA_OUTSIDE_BRACKETS = re.compile(r",(?![^\[]*\])")  # `layers=[2,4],repetition_penalty=1` keeps the list


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
    for token in filter(None, (t.strip() for t in _COMMA_OUTSIDE_BRACKETS.split(rest))):
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
