"""One evaluation sample in the canonical format (see README "Dataset format")."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Sample:
    """A multiple-choice or generation sample.

    Multiple choice: `prompt` + `choices` (continuations, scored after `prompt`) + `answer`, or for partial scoring
    (WinoGrande) `choice_prompts` (one context per choice) + one `continuation` + `answer`.
    Generation: `prompt` + `reference`, optional `answer_pattern` (a regex whose first group, or whole match,
    is the extracted answer), `choices` (answers to pick from, for `choice-label` extraction), `stop` (extra stop
    sequences) and `extract` (the extraction mode, see `tad_core.extraction`).
    """

    id: str
    prompt: str = ""
    choices: tuple[str, ...] = ()
    choice_prompts: tuple[str, ...] = ()
    continuation: str = ""
    answer: int | None = None
    reference: str | None = None
    answer_pattern: str | None = None
    stop: tuple[str, ...] = ()
    extract: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> Literal["mc", "gen"]:
        return "gen" if self.reference is not None else "mc"

    @property
    def n_choices(self) -> int:
        return len(self.choice_prompts) if self.choice_prompts else len(self.choices)

    def contexts_and_continuations(self, delimiter: str = " ") -> list[tuple[str, str]]:
        """(context, continuation) per choice, lm-evaluation-harness style: joined by `delimiter`."""
        if self.choice_prompts:
            return [(c, join_continuation(self.continuation, delimiter)) for c in self.choice_prompts]
        return [(self.prompt, join_continuation(ch, delimiter)) for ch in self.choices]

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v not in ((), None, "", {})}
        d["id"] = self.id
        for k in ("choices", "choice_prompts", "stop"):
            if k in d:
                d[k] = list(d[k])
        if self.answer is not None:
            d["answer"] = self.answer
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sample":
        return cls(
            id=str(d["id"]),
            prompt=d.get("prompt", ""),
            choices=tuple(d.get("choices") or ()),
            choice_prompts=tuple(d.get("choice_prompts") or ()),
            continuation=d.get("continuation", ""),
            answer=d.get("answer"),
            reference=d.get("reference"),
            answer_pattern=d.get("answer_pattern"),
            stop=tuple(d.get("stop") or ()),
            extract=d.get("extract"),
            metadata=dict(d.get("metadata") or {}),
        )


def join_continuation(continuation: str, delimiter: str) -> str:
    """`delimiter + continuation`, always, as lm-evaluation-harness joins `target_delimiter` and a choice. (The
    delimiter used to be skipped before a choice that starts with a space or newline: 4,835 of HellaSwag's
    10,042 validation samples, whose endings start with a space, then scored one space less than lm-eval and
    OLMo's own requests.)"""
    return delimiter + continuation
