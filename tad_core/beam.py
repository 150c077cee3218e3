"""Beam search for every decoding strategy, on the paired engine.

A strategy turns one step's base and fine-tuned logits into next-token scores (-inf excludes a token). Beam search
ranks hypotheses by the sum of the per-step log-scores `log_softmax(scores)[token]`; everything else follows
transformers' beam search (`GenerationMixin._beam_search`, 5.x) operation for operation, so that `ft` gives exactly
`model.generate(num_beams=K, do_sample=False)` on the fine-tuned model:

- each step keeps the best `max(2, 1 + #eos) * K` candidates over all K beams of a prompt, so that K of them are
  still open even when the best ones end;
- a candidate ends on EOS, on a stop string or at `max_new_tokens`; it becomes a finished hypothesis only when it
  ranks in the top K, scored `sum_logprobs / generated_len ** length_penalty` (EOS counted in the length);
- the K best open candidates continue, and the runner's KV caches follow their parents (`PairedRunner.select`);
- a prompt stops collecting hypotheses once K have finished and either `early_stopping is True`, or the best open
  beam cannot beat the worst finished one (`False`: judged at the current length; `"never"` with a positive length
  penalty: at `max_new_tokens`); the batch stops when no prompt can improve or every candidate ended.

The bookkeeping is kept as transformers' [prompt, beam] tensors with its -1e9 offsets, because the offsets decide
orderings in corner cases (all of a prompt's candidates excluded, fewer than K finished) and the `ft` equality
is token for token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence, Union

import torch

from tad_core.early_exit import OutputHead, output_head, step_extras
from tad_core.engine import PairedRunner, left_pad, positions_from_mask
from tad_core.generation import Generated, _eos_ids
from tad_core.models import PairedModel
from tad_core.strategies import Step, Strategy, StrategySpec, build

EarlyStopping = Union[bool, Literal["never"]]
_OFF = -1.0e9  # transformers' offset for "cannot be chosen"; the same constant keeps the same orderings


def check_beam_args(num_beams: Any, max_new_tokens: Any, length_penalty: Any = 1.0,
                    early_stopping: Any = False) -> None:
    """Reject bad arguments up front (callers such as the CLI pass user input through)."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) \
            or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")


def _is_log_distribution(strategy: Strategy) -> bool:
    """Strategies whose scores are a model's own `log_softmax`.

    `log_softmax` is not bitwise idempotent in float32; re-normalising these scores would make `ft` differ from
    transformers' beam search by rounding, so they are used as they are.
    """
    if strategy.name in ("ft", "base"):
        return True
    return strategy.name == "tad" and strategy.alpha == 0.0 and strategy.beta == 0.0


def strategy_log_scores(strategy: Strategy, scores: torch.Tensor) -> torch.Tensor:
    """Per-token log-scores a beam adds up: `log_softmax` of the strategy's scores (-inf stays -inf)."""
    return scores if _is_log_distribution(strategy) else torch.log_softmax(scores, dim=-1)


class _Scorer:
    """One strategy's per-step log-scores for the rows of a runner, with the extras it reads.

    DoLa-style strategies read premature-layer logits of the same forward and the tokens each row has seen; the
    seen-token rows must follow the beams when they are reselected, like the KV caches.
    """

    def __init__(self, pair: PairedModel, strategy: Strategy, runner: PairedRunner,
                 prompt_ids: Sequence[Sequence[int]]) -> None:
        self.strategy = strategy
        self.runner = runner
        self.head: OutputHead | None = output_head(pair.model) if strategy.needs_hidden else None
        self.prompt_ids = prompt_ids
        self.seen: torch.Tensor | None = None

    def log_scores(self, z_b: torch.Tensor | None, z_f: torch.Tensor | None) -> torch.Tensor:
        """[rows, V] log-scores from the runner's last forward (`logits_to_keep=1`)."""
        extras: dict[str, Any] = {}
        if self.strategy.needs_hidden:
            assert self.runner.hidden is not None and self.head is not None
            # the strategy needs the fine-tuned side, so `runner.hidden` holds every row, in row order
            layers = self.strategy.hidden_layers(self.head.num_layers, self.head.tied_embeddings)
            extras = step_extras(self.head, {layer: self.runner.hidden[layer][:, -1] for layer in layers})
        if self.strategy.needs_history:
            z = z_f if z_f is not None else z_b
            assert z is not None
            if self.seen is None:
                self.seen = torch.zeros((z.shape[0], z.shape[-1]), dtype=torch.bool, device=z.device)
                for row, ids in enumerate(self.prompt_ids):
                    self.seen[row, list(ids)] = True
            extras["seen_tokens"] = self.seen
        step = Step(None if z_b is None else z_b[:, -1], None if z_f is None else z_f[:, -1], extras)
        scores = strategy_log_scores(self.strategy, self.strategy.scores_from(step))
        none_left = ~scores.isfinite().any(-1)  # TaD's clip emptied the head: the row continues with ft's step,
        if step.z_f is not None and bool(none_left.any()):  # as greedy takes ft's token (log_softmax gave NaN)
            scores = torch.where(none_left[:, None], step.lp_f, scores)
        return scores

    def select(self, rows: torch.Tensor, new_tokens: torch.Tensor | None) -> None:
        """Row j continues old row `rows[j]`, having just emitted `new_tokens[j]` (None: a copy, no new token)."""
        if self.seen is None:
            return
        self.seen = self.seen[rows.to(self.seen.device)]
        if new_tokens is not None:
            self.seen[torch.arange(len(rows), device=self.seen.device), new_tokens.to(self.seen.device)] = True


@dataclass
class _Beams:
    """Per-prompt beam state as transformers keeps it: [prompts, beams, ...] tensors, best finished first."""

    running: torch.Tensor  # [B, K, T] generated tokens of the open beams
    running_scores: torch.Tensor  # [B, K] summed log-scores (beams 1.. start at -1e9: step 0 expands beam 0 only)
    finished: torch.Tensor  # [B, K, T] finished hypotheses
    finished_scores: torch.Tensor  # [B, K] length-normalised; -1e9 in empty slots
    finished_len: torch.Tensor  # [B, K] generated tokens, EOS included; 0 in empty slots
    is_finished: torch.Tensor  # [B, K] slot holds a real hypothesis
    improvable: torch.Tensor  # [B, 1] open beams may still beat the finished ones

    @classmethod
    def start(cls, batch: int, num_beams: int, max_new_tokens: int, fill: int, device: torch.device) -> "_Beams":
        running = torch.full((batch, num_beams, max_new_tokens), fill, dtype=torch.long, device=device)
        scores = torch.zeros((batch, num_beams), dtype=torch.float, device=device)
        scores[:, 1:] = _OFF
        return cls(running, scores, running.clone(),
                   torch.full((batch, num_beams), _OFF, dtype=torch.float, device=device),
                   torch.zeros((batch, num_beams), dtype=torch.long, device=device),
                   torch.zeros((batch, num_beams), dtype=torch.bool, device=device),
                   torch.ones((batch, 1), dtype=torch.bool, device=device))


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`t[b, idx[b, j], ...]` for [B, N, ...] tensors (transformers' `_gather_beams`)."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def _ended(cand: torch.Tensor, length: int, max_new_tokens: int, eos: torch.Tensor, stop: tuple[str, ...],
           tok: Any) -> torch.Tensor:
    """[B, N] whether each candidate (its first `length` tokens) ends: length limit, EOS or a stop string."""
    if length >= max_new_tokens:
        return torch.ones(cand.shape[:2], dtype=torch.bool, device=cand.device)
    ended = torch.isin(cand[:, :, length - 1], eos)
    if stop:
        rows = cand[:, :, :length].tolist()
        hit = [[any(s in tok.decode(ids, skip_special_tokens=True) for s in stop) for ids in beams] for beams in rows]
        ended |= torch.tensor(hit, dtype=torch.bool, device=cand.device)
    return ended


def _advance(beams: _Beams, log_scores: torch.Tensor, length: int, keep: int,
             ended_fn: Callable[[torch.Tensor, int], torch.Tensor], length_penalty: float,
             early_stopping: EarlyStopping) -> tuple[torch.Tensor, torch.Tensor]:
    """One beam step on [B*K, V] log-scores; returns (parents [B, K] of the new open beams, whether all ended).

    `length` is the generated length after this step. The operations and their order are transformers'
    `_get_top_k_continuations`, `_get_running_beams_for_next_iteration` and `_update_finished_beams`.
    """
    batch, num_beams = beams.running_scores.shape
    acc = log_scores.reshape(batch, num_beams, -1) + beams.running_scores[:, :, None]
    vocab = acc.shape[-1]
    top_scores, top_idx = torch.topk(acc.reshape(batch, -1), k=keep)
    parents = top_idx // vocab
    cand = _gather(beams.running, parents)
    cand[:, :, length - 1] = top_idx % vocab
    ended = ended_fn(cand, length)

    open_scores = top_scores + ended.to(torch.float32) * _OFF
    nxt = torch.topk(open_scores, k=num_beams)[1]
    new_running, new_scores, new_parents = _gather(cand, nxt), _gather(open_scores, nxt), _gather(parents, nxt)

    in_top = torch.zeros(keep, dtype=torch.bool, device=ended.device)
    in_top[:num_beams] = True
    just_finished = ended & in_top[None, :]
    normed = top_scores / (length ** length_penalty)
    full = torch.all(beams.is_finished, dim=-1, keepdim=True) & (early_stopping is True)
    normed += full.to(torch.float32) * _OFF
    normed += (~beams.improvable).to(torch.float32) * _OFF
    normed += (~just_finished) * _OFF
    merged_scores = torch.cat((beams.finished_scores, normed), dim=1)
    best = torch.topk(merged_scores, k=num_beams)[1]
    beams.finished = _gather(torch.cat((beams.finished, cand), dim=1), best)
    beams.finished_scores = _gather(merged_scores, best)
    cand_len = torch.full_like(top_idx, length)
    beams.finished_len = _gather(torch.cat((beams.finished_len, cand_len), dim=1), best)
    beams.is_finished = _gather(torch.cat((beams.is_finished, just_finished), dim=1), best)
    beams.running, beams.running_scores = new_running, new_scores
    return new_parents, torch.all(ended)


def _still_improvable(beams: _Beams, length: int, max_new_tokens: int, length_penalty: float,
                      early_stopping: EarlyStopping) -> torch.Tensor:
    """Transformers' `_check_early_stop_heuristic`: can the best open beam still beat the worst finished one?"""
    hypothetical = max_new_tokens if early_stopping == "never" and length_penalty > 0.0 else length
    best_open = beams.running_scores[:, :1] / (hypothetical ** length_penalty)
    worst = torch.where(beams.is_finished, torch.min(beams.finished_scores, dim=1, keepdim=True)[0], _OFF)
    return beams.improvable & torch.any(best_open > worst, dim=-1, keepdim=True)


def _result(tokens: list[int], eos: set[int], stop: tuple[str, ...], tok: Any) -> Generated:
    """A finished hypothesis as `generate_texts` reports one: EOS dropped, text cut at the first stop string."""
    if tokens and tokens[-1] in eos:
        return Generated(tok.decode(tokens[:-1], skip_special_tokens=True), tokens[:-1], "eos")
    text = tok.decode(tokens, skip_special_tokens=True)
    hits = [text.index(s) for s in stop if s in text]
    if hits:
        return Generated(text[:min(hits)], tokens, "stop")
    return Generated(text, tokens, "length")


def _batch_done(beams: _Beams, all_ended: torch.Tensor, early_stopping: EarlyStopping) -> bool:
    """Transformers' `_beam_search_has_unfinished_sequences`, negated: no prompt can improve, every prompt is full
    under `early_stopping=True`, or every candidate of this step ended."""
    improvement_possible = bool(torch.any(beams.improvable))
    all_full = bool(torch.all(beams.is_finished)) and early_stopping is True
    return not improvement_possible or all_full or bool(all_ended)


def _prefill(pair: PairedModel, strategy: Strategy, enc: list[list[int]], num_beams: int,
             ) -> tuple[PairedRunner, _Scorer, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the prompts once, then expand runner and scorer rows to `num_beams` copies per prompt (prompt-major).

    Returns (runner, scorer, attention mask, position ids, step-0 log-scores), all with B*K rows. The K copies are
    identical, as transformers' expanded prompts are; the -1e9 start scores of beams 1.. keep them from competing.
    """
    tok = pair.tokenizer
    batch = len(enc)
    need_ft, need_base = "ft" in strategy.needs, "base" in strategy.needs
    if pair.path == "base_only":
        need_ft = need_base = True
    runner = PairedRunner(pair, [need_ft] * batch, [need_base] * batch, output_hidden_states=strategy.needs_hidden)
    scorer = _Scorer(pair, strategy, runner, enc)
    ids, mask = left_pad(enc, tok.pad_token_id)
    pos = positions_from_mask(mask)
    z_b, z_f = runner.forward(ids, mask, pos, logits_to_keep=1)
    log_scores = scorer.log_scores(z_b, z_f).repeat_interleave(num_beams, dim=0)
    expand = torch.arange(batch).repeat_interleave(num_beams)
    runner.select(expand.tolist())
    scorer.select(expand, None)
    return runner, scorer, mask[expand], pos[expand], log_scores


def beam_search(pair: PairedModel, prompts: Sequence[str], strategy: Strategy | StrategySpec, num_beams: int,
                max_new_tokens: int, stop: tuple[str, ...] = (), length_penalty: float = 1.0,
                early_stopping: EarlyStopping = False, ignore_eos: bool = False) -> list[Generated]:
    """The best beam-search hypothesis of every prompt under `strategy` (one `Generated` per prompt, in order).

    The prompts are decoded together: prefilled once, the caches expanded to K beams per prompt, then one paired
    forward per step over the B*K open beams (only the sides the strategy needs), the caches reordered to follow
    the beams' parents. `num_beams=1` is greedy decoding. EOS, stop strings and `ignore_eos` behave as in
    `generate_texts`; knowledge-vector statistics are not computed (`kv` empty, `flip_rate` None).
    """
    check_beam_args(num_beams, max_new_tokens, length_penalty, early_stopping)
    if isinstance(strategy, StrategySpec):
        strategy = build(strategy)
    if not prompts:
        return []
    tok = pair.tokenizer
    eos_set = set() if ignore_eos else _eos_ids(pair)
    eos = torch.tensor(sorted(eos_set), dtype=torch.long, device=pair.device)
    batch, k, penalty = len(prompts), num_beams, float(length_penalty)
    keep = max(2, 1 + len(eos_set)) * k
    enc = [tok(p)["input_ids"] for p in prompts]
    placeholder = tok.pad_token_id if tok.pad_token_id is not None else 0  # never reported: lengths are tracked
    beams = _Beams.start(batch, k, max_new_tokens, placeholder, pair.device)
    offsets = torch.arange(batch, device=pair.device)[:, None] * k

    def ended(cand: torch.Tensor, length: int) -> torch.Tensor:
        return _ended(cand, length, max_new_tokens, eos, stop, tok)

    with torch.no_grad():
        runner, scorer, mask, pos, log_scores = _prefill(pair, strategy, enc, k)
        for length in range(1, max_new_tokens + 1):
            parents, all_ended = _advance(beams, log_scores, length, keep, ended, penalty, early_stopping)
            beams.improvable = _still_improvable(beams, length, max_new_tokens, penalty, early_stopping)
            if _batch_done(beams, all_ended, early_stopping):
                break
            rows = (parents + offsets).reshape(-1)
            nxt = beams.running[:, :, length - 1].reshape(-1)
            runner.select(rows.tolist())  # the KV caches follow the beams (repeats allowed)
            scorer.select(rows, nxt)
            mask = torch.cat([mask[rows.cpu()], mask.new_ones(batch * k, 1)], dim=1)
            pos = pos[rows.cpu()][:, -1:] + 1
            z_b, z_f = runner.forward(nxt[:, None].cpu(), mask, pos, logits_to_keep=1)
            log_scores = scorer.log_scores(z_b, z_f)
    lengths = beams.finished_len[:, 0].tolist()
    best = beams.finished[:, 0].tolist()
    return [_result(best[b][:lengths[b]], eos_set, stop, tok) for b in range(batch)]
