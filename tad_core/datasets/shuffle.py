"""Seeded choice shuffling for multiple-choice sets whose gold answer sits at a fixed position.

OLMo's SciQ request files always put the correct answer last, so a model (or a strategy) that merely prefers the
last choice looks competent. Shuffling each sample's choices with its own seeded order (seed and sample id, so the
order does not depend on which other samples are loaded or on `--limit`) removes that artefact; the original
position of every shown choice is kept in `metadata.choice_order`, so results can be mapped back.
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Sequence

from tad_core.samples import Sample


SUFFIX = "+shuffle"  # a shuffled dataset's label: NAME+shuffleSEED


def shuffled_name(name: str, seed: int) -> str:
    return f"{name}{SUFFIX}{seed}"


def unshuffled_name(name: str) -> str:
    """The dataset a label names without its shuffle suffix (`boolq+shuffle1` -> `boolq`): per-dataset wording
    and the k-shot train pool are the registered dataset's, whatever order its choices are shown in."""
    base, sep, seed = name.rpartition(SUFFIX)
    return base if sep and seed.isdigit() else name


def choice_order(sample_id: str, n: int, seed: int) -> list[int]:
    """The permutation shown for one sample: `order[k]` is the original index of the k-th shown choice."""
    order = list(range(n))
    random.Random(f"{seed}:{sample_id}").shuffle(order)
    return order


def shuffle_choices(samples: Sequence[Sample], seed: int) -> list[Sample]:
    """Every MC sample with its choices (or partial-scoring choice prompts) in a seeded order and its answer moved
    with them; generation samples are returned unchanged."""
    out = []
    for s in samples:
        if s.kind != "mc" or s.answer is None:
            out.append(s)
            continue
        order = choice_order(s.id, s.n_choices, seed)
        meta = {**s.metadata, "choice_order": order, "shuffle_seed": seed}
        options = [f"option{i}" for i in range(1, s.n_choices + 1)]
        if s.choice_prompts and all(k in meta for k in options):  # WinoGrande's options, listed by instruction
            meta.update({k: s.metadata[options[i]] for k, i in zip(options, order)})  # formats: move them too
        out.append(replace(
            s, choices=tuple(s.choices[i] for i in order) if s.choices else (),
            choice_prompts=tuple(s.choice_prompts[i] for i in order) if s.choice_prompts else (),
            answer=order.index(s.answer), metadata=meta))
    return out
