"""Conversion of the AI2 OLMo evaluation request files into canonical samples.

The request files (`requests.jsonl.gz`) hold one line per (document, choice) request. We group lines by
`doc_id`, drop the ids from 1,000,000 up (unconditional-likelihood duplicates of the same documents) and turn each
document into one zero-shot sample: the document's own `query` is the prompt (the 5-shot request context is too
long to evaluate on a CPU), `choices` the continuations, `gold` the answer.
"""
from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tad_core.samples import Sample

UNCONDITIONAL_DOC_ID = 1_000_000


class SourceFormatError(ValueError):
    """A source request file does not have the structure the converter expects."""


def iter_docs(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(doc_id, doc)` once per document, in `doc_id` order, skipping unconditional duplicates."""
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            req = json.loads(line)
            try:
                doc_id = int(req["doc_id"])
                doc = req["doc"]
            except (KeyError, TypeError, ValueError) as e:
                raise SourceFormatError(f"{path} line {lineno}: no usable doc_id/doc ({e})") from e
            if doc_id >= UNCONDITIONAL_DOC_ID:
                continue
            docs.setdefault(doc_id, doc)
    for doc_id in sorted(docs):
        yield doc_id, docs[doc_id]


def convert_query_doc(doc: dict[str, Any], sample_id: str) -> Sample:
    """ARC, BoolQ, HellaSwag, OpenBookQA, PIQA, SocialIQA: `query` + `choices` + `gold`."""
    try:
        return Sample(id=sample_id, prompt=doc["query"], choices=tuple(doc["choices"]), answer=int(doc["gold"]))
    except KeyError as e:
        raise SourceFormatError(f"{sample_id}: source document lacks {e}") from e


def convert_winogrande_doc(doc: dict[str, Any], sample_id: str) -> Sample:
    """WinoGrande: the option fills the blank, so each choice changes the context and the rest is scored.

    lm-evaluation-harness: context = sentence up to "_" with the option substituted, continuation = the text
    after "_" (scored with a leading space as target delimiter).
    """
    sentence = doc["sentence"]
    idx = sentence.find("_")
    if idx < 0:
        raise SourceFormatError(f"{sample_id}: WinoGrande sentence has no blank '_'")
    head, tail = sentence[:idx], sentence[idx + 1:].strip()
    prompts = tuple((head + doc[opt]).rstrip() for opt in ("option1", "option2"))
    # the raw sentence and options, for instruction formats that show them whole (tad_core.formats)
    meta = {"sentence": sentence, "option1": doc["option1"], "option2": doc["option2"]}
    return Sample(id=sample_id, choice_prompts=prompts, continuation=tail, answer=int(doc["answer"]) - 1,
                  metadata=meta)


def gsm8k_reference(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after `####`, thousands separators removed."""
    if "####" not in solution:
        raise SourceFormatError(f"GSM8K solution has no '####' answer marker: {solution[-80:]!r}")
    return solution.split("####")[-1].strip().replace(",", "")


def convert_gsm8k_doc(doc: dict[str, Any], sample_id: str) -> Sample:
    """GSM8K, zero-shot generation: extraction takes the last number of the output (no `answer_pattern`)."""
    question = re.sub(r"\s+$", "", doc["question"])
    return Sample(id=sample_id, prompt=f"Question: {question}\nAnswer:", reference=gsm8k_reference(doc["answer"]))


CONVERTERS = {
    "query": convert_query_doc,
    "winogrande": convert_winogrande_doc,
    "gsm8k": convert_gsm8k_doc,
}


def convert_file(path: Path, name: str, split: str, converter: str) -> list[Sample]:
    """All samples of one request file, ids `<name>-<split>-<doc_id>`."""
    convert = CONVERTERS[converter]
    return [convert(doc, f"{name}-{split}-{doc_id}") for doc_id, doc in iter_docs(path)]


def fetch_all(progress: bool = True) -> list:
    """Same as `tad_core.datasets.fetch_all` (kept here because `tad fetch` imports it from this module)."""
    from tad_core.datasets.catalog import fetch_all as _fetch_all

    return _fetch_all(progress=progress)
