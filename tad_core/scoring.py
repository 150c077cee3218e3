"""Multiple-choice scoring: every strategy's log-likelihood of every choice from ONE paired forward per batch.

Each strategy is a function of the same `(z_b, z_f)`, so the model runs once and the strategies (and every value
of a swept parameter) only re-score the continuation positions. Contexts are encoded once and their KV cache is
shared by all the choices that follow them (lm-evaluation-harness tokenisation: a trailing space of the context
moves to the continuation, the continuation's tokens are those of `context + continuation` after the context's).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from tad_core import kvstats
from tad_core.engine import PairedRunner, left_pad, positions_from_mask
from tad_core.models import PairedModel
from tad_core.samples import Sample, join_continuation
from tad_core.strategies import Step, Strategy


@dataclass
class MCScores:
    """One sample's results: summed log-prob per choice for each strategy key, and knowledge-vector stats."""

    scores: dict[str, list[float]]
    cont_chars: list[int]
    flip_rate: dict[str, float]
    kv: dict[str, Any] = field(default_factory=dict)


def _encode(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tok(continuation, add_special_tokens=False)["input_ids"]


Unit = tuple[int, list[int], list[tuple[int, list[int], int]]]  # (sample, context ids, [(choice, cont ids, chars)])


def build_units(tok: Any, samples: Sequence[Sample], delimiter: str = " ",
                gold_only: bool = False) -> list[Unit]:
    """Group each sample's (context, continuation) pairs by context, tokenised lm-evaluation-harness style.

    `gold_only` keeps only the gold continuation: the answer choice of an MC sample, the reference of a
    generation sample (after `prompt` + `delimiter`); samples without one are skipped.
    """
    units: list[Unit] = []
    for si, sample in enumerate(samples):
        pairs = list(enumerate(sample.contexts_and_continuations(delimiter))) if sample.kind == "mc" else []
        if gold_only:
            if sample.kind == "gen":
                pairs = [(0, (sample.prompt, join_continuation(sample.reference or "", delimiter)))] if sample.reference else []
            else:
                pairs = [p for p in pairs if p[0] == sample.answer]
        by_ctx: dict[str, list[tuple[int, str]]] = {}
        for ci, (ctx, cont) in pairs:
            by_ctx.setdefault(ctx, []).append((ci, cont))
        for ctx, conts in by_ctx.items():
            encoded = [(ci, *_encode(tok, ctx, cont), _norm_chars(sample, ci, cont)) for ci, cont in conts]
            ctx_ids = encoded[0][1]
            units.append((si, ctx_ids, [(ci, cont_ids, n) for ci, _, cont_ids, n in encoded]))
    return units


def _norm_chars(sample: Sample, choice: int, continuation: str) -> int:
    """The length `acc_norm` divides by: the choice's own text, without the delimiter joined before it, as
    lm-evaluation-harness does (`len(choice)` of `doc_to_choice`); WinoGrande's shared continuation as given."""
    if sample.kind == "mc" and sample.choices:
        return len(sample.choices[choice])
    if sample.kind == "mc":
        return len(sample.continuation)
    return len(continuation)


@dataclass
class TeacherForced:
    """Every scored position of a batch of units, flattened: `step` is `[N_pos, V]`, `targets`/`owner` `[N_pos]`.

    `rows` lists the continuations `(unit, choice, continuation ids, continuation chars)`; `owner[i]` is the row of
    position `i`.
    """

    step: Step
    targets: torch.Tensor
    owner: torch.Tensor
    rows: list[tuple[int, int, list[int], int]]


def _ft_hidden(runner: PairedRunner, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Candidate layers of the runner's fine-tuned hidden states, scattered to full batch rows (others zero)."""
    assert runner.hidden is not None
    return {layer: runner._scatter(runner.hidden[layer], runner.ft_rows) for layer in layers}


def teacher_force(pair: PairedModel, units: Sequence[Unit], need_ft: bool, need_base: bool,
                  hidden_layers: Sequence[int] = ()) -> TeacherForced:
    """One paired forward over contexts, then one over all continuations on the shared cache.

    With `hidden_layers`, the fine-tuned side's hidden states of those layers (same forwards) become early-exit
    logits at the scored positions only, in `step.extras` (see `tad_core.early_exit`).
    """
    from tad_core.early_exit import output_head, step_extras

    tok = pair.tokenizer
    n_units = len(units)
    runner = PairedRunner(pair, [need_ft] * n_units, [need_base] * n_units,
                          output_hidden_states=bool(hidden_layers))
    ids, mask = left_pad([u[1] for u in units], tok.pad_token_id)
    with torch.no_grad():
        zb_last, zf_last = runner.forward(ids, mask, positions_from_mask(mask), logits_to_keep=1)
    h_last = _ft_hidden(runner, hidden_layers) if hidden_layers else {}
    # continuation rows: one per (unit, choice)
    rows = [(ui, ci, cont, n) for ui, u in enumerate(units) for ci, cont, n in u[2]]
    longest = max(len(r[2]) for r in rows)
    zb_cont = zf_cont = None
    h_cont: dict[int, torch.Tensor] = {}
    if longest > 1:
        width = longest - 1
        c_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        c_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (_, _, cont, _) in enumerate(rows):
            body = cont[:-1]
            if body:
                c_ids[r, : len(body)] = torch.tensor(body)
                c_mask[r, : len(body)] = 1
        unit_idx = [r[0] for r in rows]
        runner.select(unit_idx)
        ctx_len = mask.sum(-1)[unit_idx]
        full_mask = torch.cat([mask[unit_idx], c_mask], dim=1)
        pos = ctx_len[:, None] + torch.arange(width)[None, :]
        with torch.no_grad():
            zb_cont, zf_cont = runner.forward(c_ids, full_mask, pos, logits_to_keep=0)
        h_cont = _ft_hidden(runner, hidden_layers) if hidden_layers else {}
    # flatten every scored position: (row, target token)
    src_unit, src_row, src_t, targets, owner = [], [], [], [], []
    for r, (ui, _, cont, _) in enumerate(rows):
        for t, target in enumerate(cont):
            src_unit.append(ui)
            src_row.append(r)
            src_t.append(t)
            targets.append(target)
            owner.append(r)

    def gather(last: torch.Tensor | None, cont_logits: torch.Tensor | None) -> torch.Tensor | None:
        if last is None:
            return None
        out = torch.empty((len(targets), last.shape[-1]), dtype=torch.float32, device=last.device)
        first = [i for i, t in enumerate(src_t) if t == 0]
        rest = [i for i, t in enumerate(src_t) if t > 0]
        out[first] = last[[src_unit[i] for i in first], -1].float()
        if rest:
            out[rest] = cont_logits[[src_row[i] for i in rest], [src_t[i] - 1 for i in rest]].float()
        return out

    extras = {}
    if hidden_layers:
        hidden = {layer: gather(h_last[layer], h_cont.get(layer)) for layer in hidden_layers}
        extras = step_extras(output_head(pair.model), hidden)
    step = Step(gather(zb_last, zb_cont), gather(zf_last, zf_cont), extras)
    device = (zf_last if zf_last is not None else zb_last).device
    return TeacherForced(step, torch.tensor(targets, dtype=torch.long, device=device),
                         torch.tensor(owner, dtype=torch.long, device=device), rows)


def hidden_layers_for(pair: PairedModel, strategies: Sequence[Strategy]) -> list[int]:
    """The union of the hidden-state layers the strategies read (empty when none needs hidden states)."""
    if not any(s.needs_hidden for s in strategies):
        return []
    from tad_core.early_exit import output_head

    head = output_head(pair.model)
    return sorted({i for s in strategies for i in s.hidden_layers(head.num_layers, head.tied_embeddings)})


def score_mc(pair: PairedModel, samples: Sequence[Sample], strategies: Sequence[Strategy],
             kv_topk: int = 5, delimiter: str = " ", floor: float | None = None) -> list[MCScores]:
    """Score every choice of every sample under every strategy (teacher forcing, one paired forward).

    Strategies that read token history (DoLa's repetition penalty) get none here: a teacher-forced continuation
    is scored as given, as in lm-evaluation-harness, so the penalty applies in generation only.
    """
    tok = pair.tokenizer
    need_base = any("base" in s.needs for s in strategies) or pair.path == "base_only"
    need_ft = any("ft" in s.needs for s in strategies)
    with_kv = need_base and need_ft
    units = build_units(tok, samples, delimiter)
    tf = teacher_force(pair, units, need_ft, need_base, hidden_layers_for(pair, strategies))
    step, target_t, owner_t, rows = tf.step, tf.targets, tf.owner, tf.rows
    owner = owner_t.tolist()
    n_rows = len(rows)
    per_row: dict[str, torch.Tensor] = {}
    argmax_ft = step.argmax_f if need_ft else None
    flips: dict[str, torch.Tensor] = {}
    for strat in strategies:
        lp, top = strat.target_scores(step, target_t)
        if floor is not None:  # an excluded token costs `floor` instead of making the whole choice -inf
            lp = lp.clamp_min(floor)
        per_row[strat.spec.key] = torch.zeros(n_rows, dtype=torch.float64, device=lp.device).index_add_(
            0, owner_t, lp.double()).cpu()
        if argmax_ft is not None:
            flips[strat.spec.key] = (top != argmax_ft).float().cpu()
    stats = {k: v.cpu() for k, v in kvstats.step_stats(step).items()} if with_kv else None
    results: list[MCScores] = []
    for si, sample in enumerate(samples):
        k = sample.n_choices
        row_ids = [r for r, row in enumerate(rows) if units[row[0]][0] == si]
        order = sorted(row_ids, key=lambda r: rows[r][1])
        mine = set(row_ids)
        pos_idx = [i for i, o in enumerate(owner) if o in mine]
        scores = {key: [float(v[r]) for r in order] for key, v in per_row.items()}
        cont_chars = [rows[r][3] for r in order]
        assert len(cont_chars) == k
        flip_rate = {key: float(f[pos_idx].mean()) for key, f in flips.items()}
        kv: dict[str, Any] = {}
        if stats is not None:
            kv = kvstats.aggregate(stats, pos_idx)
            kv.update(kvstats.top_tokens(step.kv[pos_idx].sum(0), kv_topk, lambda i: tok.decode([i])))
        results.append(MCScores(scores, cont_chars, flip_rate, kv))
    return results
