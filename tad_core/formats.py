"""Prompt formats: how a canonical sample becomes the prompt a model sees, its training target and the rule that
reads the answer back out of the model's output.

A format is versioned: its key (`name@version`, plus parameters) is part of a run's identity, so results rendered
with different wording never mix. Bump `version` whenever a format's output changes for some sample.

Built in:
- `mc-loglik`: the sample as written. Multiple-choice samples are scored by log-likelihood, generation samples are
  decoded from their own prompt. The default.
- `llm-adapters`: the instruction protocol of LLM-Adapters (Hu et al., 2023), under which TaD and its successors
  report their commonsense numbers: an Alpaca-style template around a per-dataset instruction that lists the
  choices as `Answer1: ...`; the model *generates* "the correct answer is answer2" and the first match of the
  dataset's label regex is compared with the gold label.
- `chat`: the same instruction wrapped in the model's own chat template (needs a tokenizer with one).
- `k-shot`: `k` demonstrations drawn (seeded, per sample) from a pool (the train split) before the sample, for
  multiple choice and generation alike.
"""
from __future__ import annotations

import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Sequence

from tad_core.datasets.shuffle import unshuffled_name
from tad_core.samples import Sample

ALPACA_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
TARGET_TEMPLATE = "the correct answer is {label}"


class FormatError(ValueError):
    """A sample cannot be rendered by a format (the message names the sample and what is missing)."""


@dataclass(frozen=True)
class FormatContext:
    """What rendering may need besides the sample: the dataset's registered name (for per-dataset wording), the
    tokenizer (chat templates, end-of-sequence text) and the demonstration pool (k-shot)."""

    dataset: str = ""
    tokenizer: Any = None
    pool: Sequence[Sample] = ()


class PromptFormat(ABC):
    """One prompt format: validated parameters in `__init__`, pure `render` / `training_pair` methods."""

    name: ClassVar[str]
    version: ClassVar[int]
    description: ClassVar[str]
    needs_pool: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        if params:
            raise ValueError(f"format {self.name!r} takes no parameters, got {sorted(params)}")

    @property
    def params(self) -> dict[str, Any]:
        return {}

    @property
    def key(self) -> str:
        """`name@version` plus parameters: the identity stored with a run."""
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.name}@{self.version}" + (f":{extra}" if extra else "")

    @abstractmethod
    def render(self, sample: Sample, ctx: FormatContext) -> Sample:
        """The sample to evaluate (same id): MC stays MC under log-likelihood formats, becomes generation under
        instruction formats."""

    @abstractmethod
    def training_pair(self, sample: Sample, ctx: FormatContext) -> tuple[str, str]:
        """(context, target) to fine-tune on: the loss covers the target."""

    def check(self, sample: Sample, dataset: str) -> None:
        """Raise FormatError when `sample` cannot be rendered (called at submission, before anything is stored)."""
        self.render(sample, FormatContext(dataset=dataset))


# ---------------------------------------------------------------------------------------------------------------
# mc-loglik


def gold_continuation(sample: Sample, delimiter: str = " ") -> tuple[str, str]:
    """(context, gold continuation) of a sample, exactly as MC scoring reads it (generation: the reference)."""
    if sample.kind == "gen":
        return sample.prompt, " " + str(sample.reference).strip()
    if sample.answer is None:
        raise FormatError(f"sample {sample.id!r} has no answer to train on")
    return sample.contexts_and_continuations(delimiter)[sample.answer]


class McLoglik(PromptFormat):
    name = "mc-loglik"
    version = 1
    description = "the sample as written: MC by summed log-likelihood of each choice, generation from its prompt"

    def render(self, sample: Sample, ctx: FormatContext) -> Sample:
        return sample

    def training_pair(self, sample: Sample, ctx: FormatContext) -> tuple[str, str]:
        return gold_continuation(sample)


# ---------------------------------------------------------------------------------------------------------------
# llm-adapters


@dataclass(frozen=True)
class _Layout:
    """How one dataset is worded: the opening sentence, the label word and how choices are laid out."""

    opening: str
    label: str  # answer / solution / ending / option
    choice_sep: str = " "  # between "Answer1: ..." items
    before_format: str = "\n\n"  # between the last choice and "Answer format: ..."


_MC_LAYOUT = _Layout("Please choose the correct answer to the question: ", "answer")
LAYOUTS: dict[str, _Layout] = {
    "piqa": _Layout("Please choose the correct solution to the question: ", "solution", choice_sep="\n\n"),
    "siqa": _MC_LAYOUT,
    "arc_easy": _MC_LAYOUT,
    "arc_challenge": _MC_LAYOUT,
    "openbookqa": _MC_LAYOUT,
    "hellaswag": _Layout("Please choose the correct ending to complete the given sentence: ", "ending"),
    "winogrande": _Layout("Please choose the correct answer to fill in the blank to complete the given sentence: ",
                          "option", before_format=" "),
}
BOOLQ_OPENING = "Please answer the following question with true or false, question: "


def _question(sample: Sample, dataset: str) -> str:
    """The bare question of a canonical sample: the OLMo queries wrap it as `Question: ...\\nAnswer:` (ARC, OBQA,
    SIQA), `Goal: ...\\nAnswer:` (PIQA) or `passage\\nQuestion: ...?\\nAnswer:` (BoolQ); HellaSwag's query is
    already `activity label: context`."""
    text = sample.prompt
    if dataset == "boolq":
        _, sep, text = text.rpartition("\nQuestion: ")
        if not sep:
            raise FormatError(f"sample {sample.id!r}: BoolQ prompt has no '\\nQuestion: ' line")
    text = re.sub(r"\s*\n?Answer:\s*$", "", text)
    return re.sub(r"^(Question|Goal):\s*", "", text).strip()


def instruction_label(sample: Sample, dataset: str) -> tuple[str, list[str]]:
    """(instruction text, the label of each choice) in LLM-Adapters' wording for `dataset`.

    Unregistered datasets get the generic question layout (`Answer1: ... AnswerN`); a shuffled registered dataset
    (`boolq+shuffle1`) keeps its own wording."""
    dataset = unshuffled_name(dataset)
    if sample.kind != "mc":
        raise FormatError(f"sample {sample.id!r}: the llm-adapters format renders multiple-choice samples only "
                          "(a generation sample has no choices to label)")
    if dataset == "boolq":
        if len(sample.choices) != 2:
            raise FormatError(f"sample {sample.id!r}: BoolQ needs 2 choices (yes, no)")
        labels = ["true" if c.strip().lower() == "yes" else "false" for c in sample.choices]  # shuffled: by text
        if sorted(labels) != ["false", "true"]:
            raise FormatError(f"sample {sample.id!r}: BoolQ needs the choices yes and no, got {list(sample.choices)}")
        return f"{BOOLQ_OPENING}{_question(sample, dataset)}\n\nAnswer format: true/false", labels
    layout = LAYOUTS.get(dataset, _MC_LAYOUT)
    if sample.choice_prompts:  # WinoGrande: the options fill the blank of a sentence
        meta = sample.metadata
        if not all(k in meta for k in ("sentence", "option1", "option2")):
            raise FormatError(f"sample {sample.id!r}: a partial-scoring sample needs metadata sentence/option1/"
                              "option2 for the llm-adapters format")
        question, choices = meta["sentence"], [meta["option1"], meta["option2"]]
    else:
        question, choices = _question(sample, dataset), list(sample.choices)
    word = layout.label
    labels = [f"{word}{i}" for i in range(1, len(choices) + 1)]
    listed = layout.choice_sep.join(f"{word.capitalize()}{i}: {c.strip()}" for i, c in enumerate(choices, 1))
    instruction = (f"{layout.opening}{question}\n\n{listed}{layout.before_format}"
                   f"Answer format: {'/'.join(labels)}")
    return instruction, labels


def label_pattern(labels: Sequence[str]) -> str:
    """A regex matching any one label whole: `answer1` must not match the start of `answer10` (the alternation
    took the first label that matched a prefix, so an output naming answer10 was read as answer1)."""
    return "(" + "|".join(map(re.escape, labels)) + r")(?!\d)"


def _eos_text(ctx: FormatContext) -> str:
    tok = ctx.tokenizer
    return str(tok.eos_token) if tok is not None and tok.eos_token else ""


class LlmAdapters(PromptFormat):
    name = "llm-adapters"
    version = 1
    description = ("LLM-Adapters' instruction template; the model generates 'the correct answer is <label>' and "
                   "the first label match is scored")

    def instruction_prompt(self, instruction: str, ctx: FormatContext) -> str:
        return ALPACA_TEMPLATE.format(instruction=instruction)

    def render(self, sample: Sample, ctx: FormatContext) -> Sample:
        instruction, labels = instruction_label(sample, ctx.dataset)
        assert sample.answer is not None
        return Sample(id=sample.id, prompt=self.instruction_prompt(instruction, ctx), reference=labels[sample.answer],
                      choices=tuple(labels), answer_pattern=label_pattern(labels),
                      extract="first-match", metadata=sample.metadata)

    def training_pair(self, sample: Sample, ctx: FormatContext) -> tuple[str, str]:
        rendered = self.render(sample, ctx)
        # the end-of-sequence text teaches the model to stop after the answer
        return rendered.prompt, TARGET_TEMPLATE.format(label=rendered.reference) + _eos_text(ctx)


class Chat(LlmAdapters):
    name = "chat"
    version = 1
    description = "the llm-adapters instruction as a user turn of the model's own chat template"

    def instruction_prompt(self, instruction: str, ctx: FormatContext) -> str:
        tok = ctx.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise FormatError("format 'chat': the model's tokenizer has no chat template")
        text = tok.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                       add_generation_prompt=True)
        bos = tok.bos_token
        if bos and text.startswith(bos) and tok("x")["input_ids"][:1] == [tok.bos_token_id]:
            text = text[len(bos):]  # the tokenizer adds its BOS itself: do not encode it twice
        return text

    def check(self, sample: Sample, dataset: str) -> None:
        instruction_label(sample, dataset)  # the template itself is known only once the model is loaded


# ---------------------------------------------------------------------------------------------------------------
# k-shot


class KShot(PromptFormat):
    name = "k-shot"
    version = 1
    description = "k demonstrations (seeded per sample, drawn from the train split) before each sample"
    needs_pool = True

    delimiter = "\n\n"  # between demonstrations, lm-evaluation-harness' default fewshot_delimiter

    def __init__(self, k: int = 5, seed: int = 0) -> None:
        for pname, value in (("k", k), ("seed", seed)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if pname == "k" else 0):
                raise ValueError(f"format k-shot: parameter {pname!r} must be an integer >= "
                                 f"{1 if pname == 'k' else 0}, got {value!r}")
        self.k, self.seed = k, seed

    @property
    def params(self) -> dict[str, Any]:
        return {"k": self.k, "seed": self.seed}

    def demonstrations(self, sample: Sample, pool: Sequence[Sample]) -> list[Sample]:
        """`k` pool samples other than `sample`, drawn by a generator seeded with (seed, sample id): the same
        sample always gets the same demonstrations, whichever shard or batch it lands in."""
        candidates = [p for p in pool if p.id != sample.id and (p.kind == "gen" or p.answer is not None)]
        if len(candidates) < self.k:
            raise FormatError(f"format k-shot: k={self.k} demonstrations needed, the pool has {len(candidates)}")
        return random.Random(f"{self.seed}:{sample.id}").sample(candidates, self.k)

    def _prefix(self, sample: Sample, ctx: FormatContext) -> str:
        shots = ["".join(gold_continuation(d)) for d in self.demonstrations(sample, ctx.pool)]
        return self.delimiter.join(shots) + self.delimiter

    def render(self, sample: Sample, ctx: FormatContext) -> Sample:
        prefix = self._prefix(sample, ctx)
        if sample.choice_prompts:
            return replace(sample, choice_prompts=tuple(prefix + c for c in sample.choice_prompts))
        return replace(sample, prompt=prefix + sample.prompt)

    def training_pair(self, sample: Sample, ctx: FormatContext) -> tuple[str, str]:
        return gold_continuation(self.render(sample, ctx))

    def check(self, sample: Sample, dataset: str) -> None:
        gold_continuation(sample)  # demonstrations are this sample's kind: it must have a gold answer itself


REGISTRY: dict[str, type[PromptFormat]] = {f.name: f for f in (McLoglik, LlmAdapters, Chat, KShot)}
DEFAULT_FORMAT = "mc-loglik"


def parse_format(text: str) -> PromptFormat:
    """`name`, `name@version` or `name:param=value,...` (e.g. `k-shot:k=5,seed=1`) -> a format instance.

    A version, when given, must be the current one: results of an older wording cannot be reproduced."""
    head, _, rest = str(text).strip().partition(":")
    name, _, version = head.partition("@")
    cls = REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"format: unknown format {name!r}; known: {', '.join(REGISTRY)}")
    if version and version != str(cls.version):
        raise ValueError(f"format: {name!r} is at version {cls.version}, not {version!r}")
    params: dict[str, Any] = {}
    for token in filter(None, (t.strip() for t in rest.split(","))):
        key, eq, value = token.partition("=")
        if not eq:
            raise ValueError(f"format: parameter {token!r} of {name!r} needs the form name=value")
        params[key.strip()] = int(value) if re.fullmatch(r"-?\d+", value.strip()) else value.strip()
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"format {name!r}: {e}") from None


def canonical_format(text: str | None) -> str:
    """The stored key of a format spec (`llm-adapters` -> `llm-adapters@1`)."""
    return parse_format(text or DEFAULT_FORMAT).key


def format_context(fmt: PromptFormat | str, dataset: str, samples: Sequence[Sample] = ()) -> FormatContext:
    """The rendering context of a dataset: its name and, for formats that draw demonstrations, the pool: the
    registered dataset's train split, else the dataset's own `samples` (a sample is never its own demonstration)."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    pool: Sequence[Sample] = ()
    if fmt.needs_pool:
        from tad_core.datasets import REGISTRY, load_dataset

        registered = unshuffled_name(dataset)
        spec = REGISTRY.get(registered)
        pool = load_dataset(registered, "train").samples if spec and "train" in spec.splits else list(samples)
    return FormatContext(dataset=dataset, pool=pool)


def example(fmt: PromptFormat) -> str:
    """A rendered example for `tad formats`: an ARC-style question (k-shot with one demonstration)."""
    sample = Sample(id="example", prompt="Question: Which gas do plants absorb?\nAnswer:",
                    choices=("oxygen", "carbon dioxide", "helium"), answer=1)
    demo = Sample(id="demo", prompt="Question: What is frozen water called?\nAnswer:", choices=("ice", "steam"),
                  answer=0)
    if isinstance(fmt, KShot):
        fmt = KShot(k=1, seed=fmt.seed)
    if isinstance(fmt, Chat):
        instruction, _ = instruction_label(sample, "arc_easy")
        return f"<chat template of the model>(user: {instruction!r})"
    r = fmt.render(sample, FormatContext(dataset="arc_easy", pool=[demo]))
    if r.kind == "gen":
        return f"{r.prompt}⟶ generates: {TARGET_TEMPLATE.format(label=r.reference)}"
    pairs = r.contexts_and_continuations()
    return f"{pairs[0][0]}⟶ scores each choice: " + " | ".join(repr(cont) for _, cont in pairs)
