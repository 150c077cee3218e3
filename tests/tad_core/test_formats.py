"""Prompt formats: llm-adapters byte for byte against real LLM-Adapters items, k-shot determinism, parsing."""
import json
from pathlib import Path

import pytest

from tad_core.datasets import load_dataset
from tad_core.formats import (ALPACA_TEMPLATE, FormatContext, FormatError, KShot, canonical_format, format_context,
                              parse_format)
from tad_core.samples import Sample

# one real LLM-Adapters test item per set (instruction, output, answer), as published with their data
REFERENCE = Path(__file__).resolve().parents[1] / "data" / "llm_adapters_commonsense_examples.jsonl"
ITEMS = {"boolq": ("val", 0), "piqa": ("val", 0), "siqa": ("val", 0), "winogrande": ("val", 0),
         "arc_easy": ("test", 0), "arc_challenge": ("test", 0), "openbookqa": ("test", 0)}
EXPECTED = {
    "boolq": ("Please answer the following question with true or false, question: does ethanol take more energy "
              "make that produces?\n\nAnswer format: true/false", "false"),
    "piqa": ("Please choose the correct solution to the question: How do I ready a guinea pig cage for it's new "
             "occupants?\n\nSolution1: Provide the guinea pig with a cage full of a few inches of bedding made of "
             "ripped paper strips, you will also need to supply it with a water bottle and a food dish.\n\nSolution2: "
             "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you "
             "will also need to supply it with a water bottle and a food dish.\n\nAnswer format: solution1/solution2",
             "solution1"),
    "siqa": ("Please choose the correct answer to the question: Tracy didn't go home that evening and resisted "
             "Riley's attacks. What does Tracy need to do before this?\n\nAnswer1: make a new plan Answer2: Go home "
             "and see Riley Answer3: Find somewhere to go\n\nAnswer format: answer1/answer2/answer3", "answer3"),
    "winogrande": ("Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was "
                   "a much better surgeon than Maria so _ always got the easier cases.\n\nOption1: Sarah Option2: "
                   "Maria Answer format: option1/option2", "option2"),
    "arc_easy": ("Please choose the correct answer to the question: Which statement best explains why "
                 "photosynthesis is the foundation of most food webs?\n\nAnswer1: Sunlight is the source of energy "
                 "for nearly all ecosystems. Answer2: Most ecosystems are found on land instead of in water. "
                 "Answer3: Carbon dioxide is more available than other gases. Answer4: The producers in all "
                 "ecosystems are plants.\n\nAnswer format: answer1/answer2/answer3/answer4", "answer1"),
    "arc_challenge": ("Please choose the correct answer to the question: An astronomer observes that a planet "
                      "rotates faster after a meteorite impact. Which is the most likely effect of this increase in "
                      "rotation?\n\nAnswer1: Planetary density will decrease. Answer2: Planetary years will become "
                      "longer. Answer3: Planetary days will become shorter. Answer4: Planetary gravity will become "
                      "stronger.\n\nAnswer format: answer1/answer2/answer3/answer4", "answer3"),
    "openbookqa": ("Please choose the correct answer to the question: A person wants to start saving money so that "
                   "they can afford a nice vacation at the end of the year. After looking over their budget and "
                   "expenses, they decide the best way to save money is to\n\nAnswer1: make more phone calls "
                   "Answer2: quit eating lunch out Answer3: buy less with monopoly money Answer4: have lunch with "
                   "friends\n\nAnswer format: answer1/answer2/answer3/answer4", "answer2"),
    # no LLM-Adapters item is available for HellaSwag: the layout the protocol describes, written out by hand
    "hellaswag": ("Please choose the correct ending to complete the given sentence: Roof shingle removal: A man is "
                  "sitting on a roof. He\n\nEnding1: is using wrap to wrap a pair of skis. Ending2: is ripping level "
                  "tiles off. Ending3: is holding a rubik's cube. Ending4: starts pulling up roofing on a roof.\n\n"
                  "Answer format: ending1/ending2/ending3/ending4", "ending4"),
}
ITEMS["hellaswag"] = ("val", 0)


@pytest.mark.parametrize("dataset", sorted(EXPECTED))
def test_llm_adapters_renders_each_set_byte_for_byte(dataset: str) -> None:
    split, index = ITEMS[dataset]
    sample = load_dataset(dataset, split).samples[index]
    rendered = parse_format("llm-adapters").render(sample, FormatContext(dataset=dataset))
    instruction, label = EXPECTED[dataset]
    assert rendered.prompt == ALPACA_TEMPLATE.format(instruction=instruction)
    assert rendered.reference == label and rendered.kind == "gen" and rendered.extract == "first-match"
    assert rendered.id == sample.id


def test_expected_texts_equal_the_shared_reference_file() -> None:
    """The texts above are the reference file's, for the 7 sets it covers."""
    lines = REFERENCE.read_text().splitlines()
    assert len(lines) == 7
    for line in REFERENCE.read_text().splitlines():
        item = json.loads(line)
        assert EXPECTED[item["dataset"]] == (item["instruction"], item["answer"])


def test_llm_adapters_training_pair_ends_with_eos() -> None:
    class Tok:
        eos_token = "<|im_end|>"

    sample = load_dataset("piqa", "val").samples[0]
    ctx, target = parse_format("llm-adapters").training_pair(sample, FormatContext("piqa", tokenizer=Tok()))
    assert ctx.endswith("### Response:\n") and target == "the correct answer is solution1<|im_end|>"


def test_llm_adapters_refuses_generation_samples() -> None:
    with pytest.raises(FormatError, match="multiple-choice samples only"):
        parse_format("llm-adapters").check(Sample("g", "2+2=", reference="4"), "x")


def test_k_shot_is_seeded_per_sample_and_never_shows_the_sample_itself() -> None:
    pool = [Sample(f"p{i}", f"Q{i}?", choices=("a", "b"), answer=i % 2) for i in range(20)]
    fmt = parse_format("k-shot:k=3,seed=7")
    assert isinstance(fmt, KShot) and fmt.key == "k-shot@1:k=3,seed=7"
    ctx = FormatContext("x", pool=pool)
    a = fmt.render(pool[4], ctx)
    assert a == fmt.render(pool[4], ctx)  # deterministic
    assert a.prompt.endswith("\n\nQ4?") and a.prompt.count("\n\n") == 3 and "Q4? " not in a.prompt
    assert parse_format("k-shot:k=3,seed=8").render(pool[4], ctx).prompt != a.prompt
    with pytest.raises(FormatError, match="pool has 1"):
        parse_format("k-shot:k=2").render(pool[0], FormatContext("x", pool=pool[:2]))


def test_k_shot_pool_is_the_train_split_of_a_registered_dataset() -> None:
    ctx = format_context("k-shot:k=2", "arc_easy")
    assert len(ctx.pool) == len(load_dataset("arc_easy", "train"))
    assert format_context("mc-loglik", "arc_easy").pool == ()


def test_parse_errors_name_the_problem() -> None:
    assert canonical_format("llm-adapters") == "llm-adapters@1" == canonical_format("llm-adapters@1")
    with pytest.raises(ValueError, match="unknown format 'nope'"):
        parse_format("nope")
    with pytest.raises(ValueError, match="version 1, not '9'"):
        parse_format("chat@9")
    with pytest.raises(ValueError, match="'k' must be an integer >= 1"):
        parse_format("k-shot:k=0")
    with pytest.raises(ValueError, match="takes no parameters"):
        parse_format("mc-loglik:x=1")


@pytest.mark.integration
def test_chat_format_uses_the_models_own_template() -> None:
    from tad_core.models import load_tokenizer, resolve_base_dir

    tok = load_tokenizer(resolve_base_dir("smollm2-135m-instruct"))
    sample = load_dataset("siqa", "val").samples[0]
    rendered = parse_format("chat").render(sample, FormatContext("siqa", tokenizer=tok))
    instruction, label = EXPECTED["siqa"]
    assert rendered.prompt == tok.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                                      add_generation_prompt=True)
    assert rendered.prompt.rstrip().endswith("assistant") and rendered.reference == label
    ctx, target = parse_format("chat").training_pair(sample, FormatContext("siqa", tokenizer=tok))
    assert ctx == rendered.prompt and target == f"the correct answer is {label}{tok.eos_token}"
    with pytest.raises(FormatError, match="no chat template"):
        parse_format("chat").render(sample, FormatContext("siqa"))


def test_shuffled_winogrande_lists_its_options_in_the_shown_order() -> None:
    """--shuffle-choices moved WinoGrande's choice prompts and answer but not the options the instruction lists,
    so for about half the samples the reference label named the wrong option (and `tad train` learnt from it)."""
    from tad_core.datasets.shuffle import shuffle_choices

    fmt = parse_format("llm-adapters")
    for sample in load_dataset("winogrande", "val", limit=40).samples:
        for seed in (1, 2):
            (shown,) = shuffle_choices([sample], seed)
            rendered = fmt.render(shown, FormatContext(dataset="winogrande"))
            gold = sample.metadata[f"option{sample.answer + 1}"]
            label = rendered.reference
            assert f"{label.capitalize()}: {gold.strip()}" in rendered.prompt, (sample.id, seed, rendered.prompt)
            assert shown.choice_prompts[shown.answer] == sample.choice_prompts[sample.answer]


def test_a_label_is_matched_whole() -> None:
    """With ten or more choices, an output naming answer10 was read as answer1 (the alternation matched a prefix)."""
    from tad_core.extraction import extract_answer

    sample = Sample("m", "Pick one", tuple(f"choice {i}" for i in range(12)), answer=9)
    rendered = parse_format("llm-adapters").render(sample, FormatContext(dataset="generic"))
    assert rendered.reference == "answer10"
    assert extract_answer("the correct answer is answer10", rendered) == "answer10"
    assert extract_answer("the correct answer is answer1.", rendered) == "answer1"


def test_a_shuffled_registered_dataset_keeps_its_wording_and_train_pool() -> None:
    """`--shuffle-choices` labels a dataset NAME+shuffleSEED; the per-dataset lookups took that label for an
    unknown dataset: BoolQ and PIQA got the generic layout, and k-shot drew demonstrations from the evaluated split
    itself instead of the train split. BoolQ's labels now follow the choice text, so a shuffled yes/no keeps its
    true/false."""
    from tad_core.datasets.shuffle import shuffle_choices

    fmt = parse_format("llm-adapters")
    for sample in load_dataset("boolq", "val", limit=12).samples:
        (shown,) = shuffle_choices([sample], 3)
        plain = fmt.render(sample, FormatContext(dataset="boolq"))
        shuffled = fmt.render(shown, FormatContext(dataset="boolq+shuffle3"))
        assert shuffled.prompt == plain.prompt and shuffled.reference == plain.reference, sample.id
    piqa = load_dataset("piqa", "val", limit=1).samples[0]
    assert "Solution1:" in fmt.render(piqa, FormatContext(dataset="piqa+shuffle1")).prompt
    ctx = format_context("k-shot:k=2", "arc_easy+shuffle1")
    assert ctx.pool and all(s.id.startswith("arc_easy-train-") for s in ctx.pool)
