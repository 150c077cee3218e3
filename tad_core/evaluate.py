"""The researcher-facing API: evaluate strategies on samples, generate text, aggregate with statistics.

`evaluate_batch` is the pure compute step the service calls per batch (no DB, no I/O); `evaluate` loops over
batches with a progress bar and returns an `EvalReport` with accuracy ± stderr and McNemar tests against `ft`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Sequence

from tad_core.dtypes import canonical_dtype
from tad_core.extraction import answers_match, check_mode, extract_answer
from tad_core.formats import DEFAULT_FORMAT, FormatContext, canonical_format, parse_format
from tad_core.generation import GenConfig, Generated, check_int, check_stops, generate_texts
from tad_core.metrics import Estimate, McNemarResult, accuracy, fixed_or_broken, mc_predictions, mcnemar
from tad_core.models import PairedModel
from tad_core.samples import Sample
from tad_core.scoring import score_mc
from tad_core.strategies import StrategySpec, build, canonical

FT = StrategySpec("ft", {})


@dataclass(frozen=True)
class EvalConfig:
    """Everything that shapes an evaluation besides the model, data and strategies (one frozen object)."""

    batch_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    kv_topk: int = 5
    delimiter: str = " "
    # MC scoring only: floor for a token's log-prob when a strategy excludes it (-inf: clamp or head mask).
    # None = the literal definitions (an excluded token makes the choice -inf); e.g. -1000 as DoLa's reference code.
    mc_floor: float | None = None
    # prompt format (tad_core.formats), stored canonical (`name@version[:params]`): part of every run's identity
    format: str = DEFAULT_FORMAT
    extract: str | None = None  # generation: extraction mode for every sample (None = the sample's / format's own)
    num_beams: int = 1  # generation: beam search width for every strategy (1 = greedy / sampling)
    # the dtype the models are loaded in (tad_core.dtypes; a concrete name, `auto` is resolved before a config is
    # built). float32, the only dtype before there was a choice, is left out of `to_json` so the identities (run
    # hashes) of earlier float32 runs still match identical requests.
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", canonical_format(self.format))
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        check_mode(self.extract)
        if not isinstance(self.num_beams, int) or isinstance(self.num_beams, bool) or self.num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {self.num_beams!r}")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError("num_beams > 1 is beam search: it needs temperature 0 (greedy), "
                             f"got temperature {self.temperature!r}")
        check_int("batch_size", self.batch_size, 1)
        check_stops("stop", self.stop)
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.delimiter, str):
            raise ValueError(f"delimiter must be a string, got {self.delimiter!r}")
        if self.mc_floor is not None and (isinstance(self.mc_floor, bool) or not isinstance(self.mc_floor, (int, float))
                                          or not math.isfinite(self.mc_floor) or self.mc_floor >= 0):
            raise ValueError(f"mc_floor must be a finite negative number or None, got {self.mc_floor!r}")
        self.gen_config()  # validates the generation fields

    def gen_config(self) -> GenConfig:
        return GenConfig(self.max_new_tokens, self.temperature, self.top_p, self.seed, self.stop, self.kv_topk)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        if d["dtype"] == "float32":
            del d["dtype"]
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "EvalConfig":
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


@dataclass
class StrategyOutcome:
    """One strategy on one sample. MC: per-choice scores and predictions; generation: output and extraction."""

    scores: list[float] | None = None
    pred: int | None = None
    pred_norm: int | None = None
    correct: bool | None = None
    correct_norm: bool | None = None
    tie: bool | None = None  # MC: every choice -inf, so the prediction is the tie-break to choice 0
    output: str | None = None
    extracted: str | None = None
    tokens: int = 0
    flip_rate: float | None = None
    vs_ft: str | None = None
    latency_s: float = 0.0
    kv: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.scores is not None:  # -inf (a choice the strategy excludes) is not valid JSON: store null
            d["scores"] = [_finite(s) for s in self.scores]
        return d


@dataclass
class SampleResult:
    sample_id: str
    kv: dict[str, Any]
    outcomes: dict[str, StrategyOutcome]

    def to_json(self) -> dict[str, Any]:
        return {"sample_id": self.sample_id, "kv": self.kv,
                "outcomes": {k: o.to_json() for k, o in self.outcomes.items()}}


def render_samples(pair: PairedModel, samples: Sequence[Sample], config: EvalConfig,
                   context: FormatContext | None = None) -> list[Sample]:
    """The samples as the config's prompt format renders them for this model (ids unchanged)."""
    fmt = parse_format(config.format)
    if fmt.key == canonical_format(DEFAULT_FORMAT):
        return list(samples)
    ctx = replace(context or FormatContext(), tokenizer=pair.tokenizer)
    if fmt.needs_pool and not ctx.pool:
        raise ValueError(f"format {fmt.key!r} draws demonstrations: pass a FormatContext with a pool "
                         "(tad_core.formats.format_context)")
    return [fmt.render(s, ctx) for s in samples]


def evaluate_batch(pair: PairedModel, samples: Sequence[Sample], specs: Sequence[StrategySpec],
                   config: EvalConfig = EvalConfig(), context: FormatContext | None = None) -> list[SampleResult]:
    """Run every strategy on one batch of samples: MC samples by scoring, generation samples by decoding.

    Samples are first rendered by `config.format` (`context` names the dataset and holds the k-shot pool)."""
    samples = render_samples(pair, samples, config, context)
    specs = [canonical(s) for s in specs]
    strategies = [build(s) for s in specs]
    keys = [s.key for s in specs]
    results: dict[str, SampleResult] = {}
    mc = [s for s in samples if s.kind == "mc"]
    gen = [s for s in samples if s.kind == "gen"]
    if mc:
        t0 = time.perf_counter()
        extra = [] if FT.key in keys else [build(FT)]  # ft is free from the same forward: needed for vs_ft
        scored = score_mc(pair, mc, strategies + extra, config.kv_topk, config.delimiter, config.mc_floor)
        per = (time.perf_counter() - t0) / len(mc)
        for sample, sc in zip(mc, scored):
            ft_pred, _ = mc_predictions(sc.scores[FT.key], sc.cont_chars)
            ft_ok = None if sample.answer is None else ft_pred == sample.answer
            outcomes = {}
            for key in keys:
                pred, pred_norm = mc_predictions(sc.scores[key], sc.cont_chars)
                ok = None if sample.answer is None else pred == sample.answer
                ok_norm = None if sample.answer is None else pred_norm == sample.answer
                outcomes[key] = StrategyOutcome(
                    scores=sc.scores[key], pred=pred, pred_norm=pred_norm, correct=ok, correct_norm=ok_norm,
                    tie=not any(math.isfinite(x) for x in sc.scores[key]),
                    tokens=0, flip_rate=sc.flip_rate.get(key), vs_ft=fixed_or_broken(ft_ok, ok), latency_s=per,
                    kv=sc.kv)
            results[sample.id] = SampleResult(sample.id, sc.kv, outcomes)
    if gen:
        t0 = time.perf_counter()
        cfg = config.gen_config()
        outs = decode(pair, gen, strategies, cfg, config.num_beams, stops=[sample_stops(s, cfg, config) for s in gen])
        per = (time.perf_counter() - t0) / len(gen)
        for sample, row in zip(gen, outs):
            outcomes = {}
            for key, g in zip(keys, row):
                extracted = extract_answer(g.text, sample, config.extract)
                outcomes[key] = StrategyOutcome(output=g.text, extracted=extracted,
                                                correct=answers_match(extracted, sample.reference or ""),
                                                tokens=len(g.token_ids), flip_rate=g.flip_rate, latency_s=per,
                                                kv=g.kv)
            if FT.key in outcomes:
                for o in outcomes.values():
                    o.vs_ft = fixed_or_broken(outcomes[FT.key].correct, o.correct)
            results[sample.id] = SampleResult(sample.id, {}, outcomes)
    return [results[s.id] for s in samples]


DEFAULT_STOP = ("\n\nQuestion:", "\nQuestion:")


def sample_stops(sample: Sample, cfg: GenConfig, config: EvalConfig) -> tuple[str, ...]:
    """A sample's own stop sequences (added to `cfg.stop`). A bare-reference sample (no answer pattern, choices,
    stop or extraction of its own, and none for the whole run) keeps the old default, a stop at `\nQuestion:`.

    Decided per sample: when the default was put on the run's config for a batch that held one bare sample, the
    other samples of that batch were cut at `\nQuestion:` and the same samples in another batch were not, so an
    output depended on its neighbours and on the batch size."""
    bare = (sample.answer_pattern is None and not sample.choices and not sample.stop and sample.extract is None
            and not cfg.stop and config.extract is None)
    return DEFAULT_STOP if bare else tuple(sample.stop)


def decode(pair: PairedModel, samples: Sequence[Sample], strategies: Sequence[Any], cfg: GenConfig,
           num_beams: int = 1, stops: Sequence[Sequence[str]] | None = None) -> list[list[Generated]]:
    """`out[sample][strategy]`: all strategies decoded together (greedy or sampled), or beam search per strategy.
    `stops[i]`: sample i's stop sequences besides `cfg.stop` (default: each sample's own `stop`)."""
    prompts = [s.prompt for s in samples]
    stops = [tuple(x) for x in stops] if stops is not None else [tuple(s.stop) for s in samples]
    if num_beams == 1:
        return generate_texts(pair, prompts, strategies, cfg, stops=stops)
    from tad_core.beam import beam_search

    out: list[list[Generated]] = [[None] * len(strategies) for _ in samples]  # type: ignore[list-item]
    groups: dict[tuple[str, ...], list[int]] = {}  # samples with the same stop sequences decode together
    for i, st in enumerate(stops):
        groups.setdefault(tuple(cfg.stop) + tuple(st), []).append(i)
    for stop, idx in groups.items():
        for si, strat in enumerate(strategies):
            for i, g in zip(idx, beam_search(pair, [prompts[i] for i in idx], strat, num_beams=num_beams,
                                             max_new_tokens=cfg.max_new_tokens, stop=stop,
                                             ignore_eos=cfg.ignore_eos)):
                out[i][si] = g
    return out


@dataclass
class StrategyReport:
    key: str
    acc: Estimate
    acc_norm: Estimate | None
    vs_ft: McNemarResult | None


@dataclass
class EvalReport:
    """Per-sample results and per-strategy aggregates of one evaluation."""

    specs: list[StrategySpec]
    results: list[SampleResult]
    pair_path: str

    def correct(self, key: str, norm: bool = False) -> list[bool]:
        attr = "correct_norm" if norm else "correct"
        return [bool(getattr(r.outcomes[key], attr)) for r in self.results]

    def summary(self) -> list[StrategyReport]:
        rows = []
        keys = [s.key for s in self.specs]
        has_norm = bool(self.results) and self.results[0].outcomes[keys[0]].correct_norm is not None
        for key in keys:
            acc = accuracy(self.correct(key))
            acc_norm = accuracy(self.correct(key, norm=True)) if has_norm else None
            vs = mcnemar(self.correct(FT.key), self.correct(key)) if FT.key in keys and key != FT.key else None
            rows.append(StrategyReport(key, acc, acc_norm, vs))
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "pair_path": self.pair_path,
            "summary": [{"strategy": r.key, "acc": r.acc.to_json(),
                         "acc_norm": r.acc_norm.to_json() if r.acc_norm else None,
                         "vs_ft": r.vs_ft.to_json() if r.vs_ft else None} for r in self.summary()],
            "results": [r.to_json() for r in self.results],
        }

    def table(self) -> str:
        """A plain-text leaderboard (rich)."""
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{len(self.results)} samples, pair path: {self.pair_path}")
        for col in ("strategy", "acc ± stderr", "acc_norm ± stderr", "n", "vs ft: fixed/broken", "McNemar p"):
            t.add_column(col)
        for r in self.summary():
            t.add_row(r.key, f"{r.acc.value:.4f} ± {r.acc.stderr:.4f}",
                      f"{r.acc_norm.value:.4f} ± {r.acc_norm.stderr:.4f}" if r.acc_norm else "-", str(r.acc.n),
                      f"{r.vs_ft.fixed}/{r.vs_ft.broken}" if r.vs_ft else "-",
                      f"{r.vs_ft.p_value:.4g}" if r.vs_ft else "-")
        console = Console(width=140, record=True)
        with console.capture() as cap:
            console.print(t)
        return cap.get()


def batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def evaluate(pair: PairedModel, samples: Sequence[Sample], strategies: Sequence[StrategySpec | str],
             config: EvalConfig = EvalConfig(), progress: bool = True,
             on_batch: Callable[[list[SampleResult]], None] | None = None,
             calibration_dataset: str | None = None, calibration_n: int = 128,
             context: FormatContext | None = None) -> EvalReport:
    """Evaluate strategies (specs or CLI strings like `"tad:alpha=0.5,1"`) on samples, batch by batch.

    `svdecode` with `mu="auto"` is first calibrated on the train split of `calibration_dataset` (stored and
    reused, see `tad_core.calibration`); the report's specs carry the numeric `mu` and the calibration key.
    """
    from tqdm.auto import tqdm

    from tad_core.calibration import resolve_auto_specs
    from tad_core.strategies import parse_strategy_arg

    specs: list[StrategySpec] = []
    for s in strategies:
        for spec in (parse_strategy_arg(s) if isinstance(s, str) else [canonical(s)]):
            if spec not in specs:
                specs.append(spec)
    specs, _ = resolve_auto_specs(pair, specs, calibration_dataset, n=calibration_n)
    out: list[SampleResult] = []
    with tqdm(total=len(samples), desc="evaluating", unit="sample", disable=not progress) as bar:
        for batch in batched(samples, config.batch_size):
            res = evaluate_batch(pair, batch, specs, config, context)
            out.extend(res)
            if on_batch:
                on_batch(res)
            bar.update(len(batch))
    return EvalReport(specs, out, pair.path)


def generate(pair: PairedModel, prompts: Sequence[str], strategy: StrategySpec | str = "tad",
             config: EvalConfig = EvalConfig()) -> list[str]:
    """Generate one completion per prompt with one strategy (greedy unless `config.temperature > 0`)."""
    from tad_core.strategies import parse_strategy_arg

    spec = parse_strategy_arg(strategy)[0] if isinstance(strategy, str) else canonical(strategy)
    outs: list[str] = []
    for batch in batched(prompts, config.batch_size):
        outs.extend(row[0].text for row in generate_texts(pair, batch, [build(spec)], config.gen_config()))
    return outs


def dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False)
