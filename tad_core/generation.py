"""Generation with any strategy: greedy or sampled decoding from the strategy's scores, paired engine underneath.

Sequences are (prompt, strategy) pairs decoded together in one batch: every strategy gets its own sequences (they
diverge as soon as the strategies choose different tokens), and each forward computes only the sides the
sequence's strategy needs (fine-tuned rows, base rows, or both in one mixed batch).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from tad_core import decode_path, kvstats
from tad_core.decode_path import PATHS
from tad_core.early_exit import output_head, step_extras
from tad_core.engine import PairedRunner, left_pad, positions_from_mask
from tad_core.fused_step import FusedStep, unfusable
from tad_core.models import PairedModel
from tad_core.samples import Sample
from tad_core.scoring import hidden_layers_for
from tad_core.strategies import Step, Strategy


MAX_INT = 2**63 - 1  # what a database BIGINT and torch's seeds hold


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(name: str, value: Any, minimum: int, maximum: int = MAX_INT) -> None:
    """Refuse `value` unless it is an integer (not a bool) in [minimum, maximum], naming the field: configs arrive
    as JSON from the API, where a string, a bool or a float can stand in any field."""
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}")


def check_stops(name: str, value: Any) -> None:
    """A list of non-empty strings: a bare string would be read as its characters, and an empty stop string is in
    every text, so it cut every output to nothing."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) \
            or not all(isinstance(s, str) and s for s in value):
        raise ValueError(f"{name} must be a list of non-empty strings, got {value!r}")


@dataclass(frozen=True)
class GenConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    kv_topk: int = 3
    kv_steps: bool = True  # keep per-step knowledge-vector stats (for the dashboard's token view)
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks compare equal work)
    kv_stats: bool = True  # knowledge-vector statistics and flips for sequences that have both sides
    # decoding path (tad_core.decode_path): dynamic, static or compiled; None = the pair's default, chosen once
    # (compiled on CUDA, dynamic on the CPU). Greedy outputs are the same on every path.
    decode: str | None = None
    # False: every (prompt, strategy) sequence encodes its prompt itself, as generation did before the prompts'
    # prefill was shared; kept as the reference the shared prefill is tested and benchmarked against.
    share_prefill: bool = True

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("seed", self.seed, 0)
        check_int("kv_topk", self.kv_topk, 0, 1000)
        check_stops("stop", self.stop)
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.decode is not None and self.decode not in PATHS:
            raise ValueError(f"decode must be one of {', '.join(PATHS)}, got {self.decode!r}")


@dataclass
class Generated:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    flip_rate: float | None = None
    kv: dict[str, Any] = field(default_factory=dict)


def _eos_ids(pair: PairedModel) -> set[int]:
    ids: set[int] = set()
    for src in (pair.tokenizer.eos_token_id, getattr(pair.model.generation_config, "eos_token_id", None)
                if hasattr(pair.model, "generation_config") else None):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return ids


def row_seed(seed: int, prompt: str, strategy: Strategy) -> int:
    """The sampling seed of one (prompt, strategy) sequence, from the run's seed. Each sequence draws from a
    generator of its own: with one generator for the batch, a sample's sampled output changed with its batch
    neighbours, the batch size and the other strategies of the job."""
    key = f"{seed}\0{strategy.name}\0{sorted(strategy.values.items())!r}\0{prompt}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & MAX_INT


def _sample(scores: torch.Tensor, cfg: GenConfig, gens: Sequence[torch.Generator],
            fallback: torch.Tensor) -> torch.Tensor:
    """A token per row drawn from softmax(scores / temperature), restricted to the top-p nucleus, with row i's
    generator `gens[i]` (greedy decoding takes `Strategy.greedy` instead). A row whose every score is -inf (TaD's
    clip emptied the head) takes `fallback` (ft's token), as greedy does."""
    none_left = ~scores.isfinite().any(-1)
    scores = scores.masked_fill(none_left[:, None], 0.0)
    s = scores / cfg.temperature
    if cfg.top_p < 1.0:
        sorted_s, order = torch.sort(s, descending=True, dim=-1)
        probs = torch.softmax(sorted_s, -1)
        drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest prefix reaching top_p (at least one)
        sorted_s = sorted_s.masked_fill(drop, float("-inf"))
        s = torch.full_like(s, float("-inf")).scatter(-1, order, sorted_s)
    return torch.where(none_left, fallback, draw(torch.softmax(s, -1), gens))


def draw(probs: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of `probs` by inverse transform sampling: row i's single uniform draw, from its own
    generator `gens[i]`, located in the row's cumulative distribution (in float64). One tiny draw per row and one
    batched search: faster on the CPU than `torch.multinomial` over the batch (18-46 vs 113-122 ms a step for 80
    rows of a 49,152-token vocabulary), which could only draw from one generator for every row. `right=True`
    never picks a token of probability 0 (the first index whose cumulative mass exceeds the draw)."""
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=probs.device) for g in gens])
    cdf = probs.double().cumsum(-1)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return picked.clamp_max(probs.shape[-1] - 1)


def _fused_step(pair: PairedModel, path: str, strategies: Sequence[Strategy],
                groups: Sequence[tuple[Strategy, list[int]]], paired: Sequence[bool], cfg: GenConfig) -> FusedStep | None:
    """The batch's strategies as one compiled function on the compiled path (None: the eager loop). Kept per pair
    and batch layout, so a worker's batches of the same shape reuse one compiled (on CUDA: captured) step."""
    if path != "compiled" or unfusable(strategies, cfg.temperature) is not None:
        return None
    group_paired = [bool(rows) and paired[rows[0]] and cfg.kv_stats for _, rows in groups]
    key = (tuple((type(s).__name__, repr(sorted(s.values.items())), tuple(rows)) for s, rows in groups),
           tuple(group_paired), cfg.kv_topk if cfg.kv_steps else 0)
    cache: dict[Any, FusedStep] = pair.info.setdefault("fused_steps", {})
    if key not in cache:
        if len(cache) >= 16:  # a few batch layouts per worker; drop the oldest beyond that
            cache.pop(next(iter(cache)))
        cache[key] = FusedStep(groups, group_paired, key[2], pair.device)
    return cache[key]


STATIC_LEN_MULTIPLE = 64


def static_length(tokens: int) -> int:
    """The static cache's length for sequences of up to `tokens` positions, rounded up to a multiple of
    `STATIC_LEN_MULTIPLE`: the compiled path's graphs are specialised to the cache's shape, so batches whose
    prompts differ by a few tokens share one compiled graph instead of compiling (and on CUDA capturing) their
    own. The extra positions are masked out."""
    return -(-tokens // STATIC_LEN_MULTIPLE) * STATIC_LEN_MULTIPLE


def row_bucket(n: int) -> int:
    """The batch size a compiled greedy batch of `n` prompts runs at: 1, 2, 4, 8, then multiples of 8. Compiled
    graphs are specialised to their row count, so a worker's odd-sized batches (a shard's last one) share the
    graphs of a few sizes instead of compiling (and on CUDA capturing) their own; torch keeps at most
    `tad_core.compiled.RECOMPILE_LIMIT` versions per function."""
    return 1 << max(n - 1, 0).bit_length() if n <= 8 else -(-n // 8) * 8


def generate_texts(pair: PairedModel, prompts: Sequence[str], strategies: Sequence[Strategy],
                   cfg: GenConfig = GenConfig(), kv_for_all: bool = False,
                   stops: Sequence[Sequence[str]] | None = None) -> list[list[Generated]]:
    """Decode every prompt with every strategy; returns `out[prompt][strategy]`.

    `stops[i]` are extra stop sequences of prompt i (a sample's own `stop`), on top of `cfg.stop`."""
    path = decode_path.choose(pair, cfg.decode)
    pad = row_bucket(len(prompts)) - len(prompts)
    if path.path == "compiled" and cfg.temperature == 0 and prompts and pad:
        # Padded with copies of the last prompt, whose rows decode (and finish) as it does: greedy rows are
        # independent of each other, so the real prompts' outputs are unchanged (sampled batches are not padded).
        more = [*prompts, *[prompts[-1]] * pad]
        more_stops = None if stops is None else [*stops, *[stops[-1]] * pad]
        return generate_texts(pair, more, strategies, cfg, kv_for_all, more_stops)[:len(prompts)]
    tok = pair.tokenizer
    n_p, n_s = len(prompts), len(strategies)
    seqs = [(pi, si) for si in range(n_s) for pi in range(n_p)]  # strategy-major
    need_ft = [("ft" in strategies[si].needs) or kv_for_all for _, si in seqs]
    need_base = [("base" in strategies[si].needs) or kv_for_all for _, si in seqs]
    if pair.path == "base_only":
        need_ft = need_base = [True] * len(seqs)
    paired = [a and b for a, b in zip(need_ft, need_base)]
    hidden_layers = hidden_layers_for(pair, strategies)
    # One prefill per prompt: the prompts are encoded once (each side any strategy needs), then every strategy's
    # sequence continues from a copy of its prompt's cache, keeping only the sides that strategy needs.
    if cfg.share_prefill:
        prefill_rows = list(range(n_p))
        prompt_ft = [any(need_ft[j] for j, (pi, _) in enumerate(seqs) if pi == p) for p in range(n_p)]
        prompt_base = [any(need_base[j] for j, (pi, _) in enumerate(seqs) if pi == p) for p in range(n_p)]
    else:
        prefill_rows, prompt_ft, prompt_base = [pi for pi, _ in seqs], need_ft, need_base
    head = output_head(pair.model) if hidden_layers else None
    enc = [tok(p)["input_ids"] for p in prompts]
    ids, mask = left_pad([enc[p] for p in prefill_rows], tok.pad_token_id)
    static_len = None if path.path == "dynamic" else static_length(ids.shape[1] + cfg.max_new_tokens)
    runner = PairedRunner(pair, prompt_ft, prompt_base, output_hidden_states=bool(hidden_layers),
                          static_len=static_len, step=path.step)
    pos = positions_from_mask(mask)
    eos = set() if cfg.ignore_eos else _eos_ids(pair)
    row_stops = [tuple(cfg.stop) + tuple(stops[pi] if stops is not None else ()) for pi, _ in seqs]
    gens = [torch.Generator(device=pair.device).manual_seed(row_seed(cfg.seed, prompts[pi], strategies[si]))
            for pi, si in seqs] if cfg.temperature > 0 else []
    n = len(seqs)
    out_ids: list[list[int]] = [[] for _ in range(n)]
    finish = ["length"] * n
    done = torch.zeros(n, dtype=torch.bool)
    flips: list[list[float]] = [[] for _ in range(n)]
    steps: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    stats_acc: list[list[dict[str, float]]] = [[] for _ in range(n)]
    groups = [(strategies[si], [j for j, (_, s) in enumerate(seqs) if s == si]) for si in range(n_s)]
    seen: torch.Tensor | None = None  # tokens of prompt + output so far, for strategies that read history
    with torch.no_grad():
        z_b, z_f = runner.forward(ids, mask, pos, logits_to_keep=1)
        if cfg.share_prefill:  # each prompt's row becomes its strategies' sequences
            expand = [pi for pi, _ in seqs]
            runner.select(expand, need_ft, need_base)
            z_b = None if z_b is None else z_b[expand]
            z_f = None if z_f is None else z_f[expand]
            mask, pos = mask[expand], pos[expand]
        ft_index = {r: i for i, r in enumerate(runner.ft_rows)}  # runner.hidden holds the fine-tuned rows only
        if any(s.needs_history for s in strategies):
            z = z_f if z_f is not None else z_b
            seen = torch.zeros((n, z.shape[-1]), dtype=torch.bool, device=z.device)
            for j, (pi, _) in enumerate(seqs):
                seen[j, enc[pi]] = True
        fused = _fused_step(pair, path.path, strategies, groups, paired, cfg)
        decode = lambda i: tok.decode([i])  # noqa: E731

        def record(r: int, tid: int, row: list[float], top: dict[str, Any] | None) -> None:
            """Keep one paired row's step: `row` = [flip, *STEP_STATS], `top` its promoted / demoted tokens."""
            flips[r].append(float(row[0]))
            stats_acc[r].append(dict(zip(kvstats.STEP_STATS, row[1:])))
            if cfg.kv_steps:
                entry = {"token": tid, "text": decode(tid), "flip": bool(row[0]),
                         **{name: round(v, 5) for name, v in zip(kvstats.STEP_STATS, row[1:])}}
                entry.update(top or {})
                steps[r].append(entry)

        for _t in range(cfg.max_new_tokens):
            nxt = torch.full((n,), tok.pad_token_id, dtype=torch.long)
            if fused is not None:  # every strategy in one (compiled) function, one read per step
                out = fused(None if z_b is None else z_b[:, -1], None if z_f is None else z_f[:, -1])
                nxt = torch.tensor(out.tokens, dtype=torch.long).masked_fill(done, tok.pad_token_id)
                for r, row, top in zip(fused.paired_rows, out.stats, out.top):
                    if not done[r]:
                        record(r, out.tokens[r], row, kvstats.top_entries(*top, decode) if cfg.kv_steps else None)
            for strat, rows in groups if fused is None else ():
                live = [r for r in rows if not done[r]]
                if not live:
                    continue
                extras: dict[str, Any] = {}
                if strat.needs_hidden:
                    assert runner.hidden is not None and head is not None
                    idx = [ft_index[r] for r in live]
                    extras = step_extras(head, {layer: runner.hidden[layer][idx, -1] for layer in
                                                strat.hidden_layers(head.num_layers, head.tied_embeddings)})
                if strat.needs_history and seen is not None:
                    extras["seen_tokens"] = seen[live]
                step = Step(None if z_b is None else z_b[live, -1], None if z_f is None else z_f[live, -1], extras)
                if cfg.temperature == 0:
                    picked = best = strat.greedy(step)
                else:  # sampled; the flip rate still compares the strategy's best token with ft's
                    s = strat.scores_from(step)
                    best = s.argmax(-1)
                    picked = _sample(s, cfg, [gens[r] for r in live], step.argmax_f if step.z_f is not None else best)
                picked_ids = picked.tolist()  # one device sync per strategy and step
                nxt[live] = torch.tensor(picked_ids, dtype=torch.long)
                pair_rows = [k for k, r in enumerate(live) if paired[r]] if cfg.kv_stats else []
                if pair_rows:
                    # every live row paired (the usual case): reuse the step's log-probs, computed once
                    sub = step if len(pair_rows) == len(live) else Step(step.z_b[pair_rows], step.z_f[pair_rows])
                    st = kvstats.step_stats(sub)
                    flip = (best[pair_rows] != sub.argmax_f).float()
                    stacked = torch.stack([flip, *st.values()], dim=-1).tolist()  # one device sync
                    for k, r in enumerate(live[k2] for k2 in pair_rows):
                        top = kvstats.top_tokens(sub.kv[k], cfg.kv_topk, decode) if cfg.kv_steps else None
                        record(r, picked_ids[pair_rows[k]], stacked[k], top)
            for r in range(n):
                if done[r]:
                    continue
                t = int(nxt[r])
                if t in eos:
                    done[r] = True
                    finish[r] = "eos"
                    continue
                out_ids[r].append(t)
                if seen is not None:
                    seen[r, t] = True
                if row_stops[r]:
                    text = tok.decode(out_ids[r], skip_special_tokens=True)
                    if any(st in text for st in row_stops[r]):
                        done[r] = True
                        finish[r] = "stop"
            if bool(done.all()) or _t == cfg.max_new_tokens - 1:  # no forward for a token nobody will read
                break
            mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
            pos = pos[:, -1:] + 1
            z_b, z_f = runner.forward(nxt[:, None], mask, pos, logits_to_keep=1)
    results: list[list[Generated]] = [[None] * n_s for _ in range(n_p)]  # type: ignore[list-item]
    for j, (pi, si) in enumerate(seqs):
        text = tok.decode(out_ids[j], skip_special_tokens=True)
        if finish[j] == "stop":
            cut = min(text.index(st) for st in row_stops[j] if st in text)
            text = text[:cut]
        kv: dict[str, Any] = {}
        if stats_acc[j]:
            kv = {f"{name}_mean": sum(d[name] for d in stats_acc[j]) / len(stats_acc[j])
                  for name in kvstats.STEP_STATS}
            kv.update({f"{name}_max": max(d[name] for d in stats_acc[j]) for name in kvstats.STEP_STATS})
            kv["steps"] = len(stats_acc[j])
            if cfg.kv_steps:
                kv["per_step"] = steps[j]
        flip = sum(flips[j]) / len(flips[j]) if flips[j] else None
        results[pi][si] = Generated(text, out_ids[j], finish[j], flip, kv)
    return results
