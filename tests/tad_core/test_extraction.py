"""Extraction modes: no label, two labels, trailing text, empty-matching patterns."""
import pytest

from tad_core.extraction import answers_match, extract_answer
from tad_core.samples import Sample

LABELS = Sample("s", "p", reference="answer2", choices=("answer1", "answer2", "answer3"),
                answer_pattern="(answer1|answer2|answer3)", extract="first-match")


@pytest.mark.parametrize("text,expected", [
    ("the correct answer is answer2", "answer2"),
    ("the correct answer is answer3, not answer2", "answer3"),  # two labels: the first wins
    ("answer2\n\n### Instruction: more text answer1", "answer2"),  # trailing text is ignored
    ("I am not sure", None),  # no label: unparsed
])
def test_first_match_of_label_regex(text: str, expected: str | None) -> None:
    assert extract_answer(text, LABELS) == expected


def test_pattern_matching_the_empty_string_is_no_answer() -> None:
    s = Sample("z", "q", reference="7", answer_pattern="(zzz)?")
    assert extract_answer("nothing here", s) is None
    assert extract_answer("a zzz b", s) == "zzz"


def test_a_match_is_read_from_its_first_non_empty_group_as_lmeval_does() -> None:
    """lm-eval's GSM8K flexible-extract pattern: the first match's answer may sit in its second group. Reading
    group 1 only skipped that match and answered with a later number. Checked against lm-eval's RegexFilter."""
    from lm_eval.filters.extraction import RegexFilter

    pattern = "(-?[$0-9.,]{2,})|(-?[0-9]+)"
    s = Sample("g", "q", reference="7", answer_pattern=pattern, extract="first-match")
    for text in ("I have 7 apples and 12 pears", "It costs $1,250 then 3", "no digits", "x 4"):
        (ours_theirs,) = RegexFilter(regex_pattern=pattern, group_select=0).apply([[text]], [{}])
        assert (extract_answer(text, s) or "[invalid]") == ours_theirs[0].strip(), text
    assert extract_answer("I have 7 apples and 12 pears", s) == "7"


def test_first_line_judges_what_the_model_said_first() -> None:
    s = Sample("a", "20 - 9 =", reference="10")
    rambling = " 10\nexplain: 20 - 9 = 11"
    assert extract_answer(rambling, s) == "11"  # the default for a bare reference: the last number
    assert extract_answer(rambling, s, "first-line") == "10" and answers_match("10", "10")
    assert extract_answer("\n\n", s, "first-line") is None


def test_choice_label_and_last_number() -> None:
    mc = Sample("m", "q", reference="blue", choices=("red", "blue"))
    assert extract_answer("B) blue", mc) == "blue"
    assert extract_answer("I think red", mc) == "red"
    assert extract_answer("so 1,234.", Sample("x", "q", reference="1234")) == "1234"


def test_unknown_mode_and_missing_pattern_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown extraction mode 'x'"):
        extract_answer("t", LABELS, "x")
    with pytest.raises(ValueError, match="needs an answer_pattern"):
        extract_answer("t", Sample("n", "q", reference="1"), "first-match")
