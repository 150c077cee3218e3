"""Per-sample budgets: what one sample may cost, checked at submission AND again in the worker.

One line with 10,000 choices took a worker process to 9.5 GB and minutes; a 16,700-character prompt of 4-byte
characters (under the character limit) was ~50k tokens and ran for more than 12 minutes. Characters do not bound
cost, model tokens do, so the budgets are counted with the base model's tokenizer:

- `TAD_MAX_CHOICES`: choices (or choice prompts) of a multiple-choice sample;
- `TAD_MAX_PROMPT_TOKENS`: tokens of a prompt (each choice prompt of a partial-scoring sample);
- `TAD_MAX_CONTINUATION_TOKENS`: tokens of each scored continuation (a choice, or the shared continuation);
- `TAD_MAX_GENERATED_TOKENS`: the job's `max_new_tokens`.

Submission refuses a dataset with a sample over budget (naming line, id and field; nothing stored) when the base
model's tokenizer is on the submitting machine; the worker checks every sample again before evaluating it (a job
submitted elsewhere, or before a limit was lowered) and records an over-budget sample as an error row of its own,
so it never costs its shard.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.settings import Settings
from tad_core.samples import join_continuation

TokenCounter = Callable[[Sequence[str]], list[int]]


@dataclass(frozen=True)
class Budgets:
    """The per-sample limits of a deployment (services.settings)."""

    max_choices: int
    max_prompt_tokens: int
    max_continuation_tokens: int
    max_generated_tokens: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Budgets:
        return cls(settings.max_choices, settings.max_prompt_tokens, settings.max_continuation_tokens,
                   settings.max_generated_tokens)


def token_counter(tokenizer: Any) -> TokenCounter:
    """Token counts of texts with `tokenizer` (no special tokens: they are the same for every sample)."""

    def count(texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    return count


def over_budget(sample: Any, budgets: Budgets, count: TokenCounter | None, delimiter: str = " ") -> str | None:
    """Why `sample` (a tad_core Sample) exceeds the budgets, naming the field; None when it fits.

    The choice count is checked first, so a 10k-choice line is refused without tokenizing it. `count` None (no
    tokenizer at hand) checks the choice count only.
    """
    n = sample.n_choices
    if n > budgets.max_choices:
        field = "choice_prompts" if sample.choice_prompts else "choices"
        return f"field '{field}': {n} choices, over TAD_MAX_CHOICES={budgets.max_choices}"
    if count is None:
        return None
    prompts = list(sample.choice_prompts) or [sample.prompt]
    field = "choice_prompts" if sample.choice_prompts else "prompt"
    worst = max(count(prompts), default=0)
    if worst > budgets.max_prompt_tokens:
        return f"field '{field}': {worst} tokens, over TAD_MAX_PROMPT_TOKENS={budgets.max_prompt_tokens}"
    if sample.kind == "mc":
        conts = [sample.continuation] if sample.choice_prompts else list(sample.choices)
        field = "continuation" if sample.choice_prompts else "choices"
        worst = max(count([join_continuation(c, delimiter) for c in conts]), default=0)
        if worst > budgets.max_continuation_tokens:
            return (f"field '{field}': {worst} tokens, over TAD_MAX_CONTINUATION_TOKENS="
                    f"{budgets.max_continuation_tokens}")
    return None


def generation_over_budget(max_new_tokens: int, budgets: Budgets) -> str | None:
    """Why a job's `max_new_tokens` exceeds the budget; None when it fits."""
    if max_new_tokens > budgets.max_generated_tokens:
        return f"max_new_tokens={max_new_tokens} is over TAD_MAX_GENERATED_TOKENS={budgets.max_generated_tokens}"
    return None
