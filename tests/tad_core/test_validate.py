"""The canonical JSONL validator: one test per error kind, whole-file rejection, limits, round trip, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tad_core.datasets import DatasetLimits, DatasetValidationError, validate_jsonl, write_jsonl
from tad_core.samples import Sample

MC = {"id": "a", "prompt": "Question: 2+2?\nAnswer:", "choices": ["4", "5", "6"], "answer": 0}
PARTIAL = {"id": "w", "choice_prompts": ["Ann beat Bo so Ann", "Ann beat Bo so Bo"], "continuation": "won.",
           "answer": 0}
GEN = {"id": "g", "prompt": "Question: 3*3?\nAnswer:", "reference": "9", "answer_pattern": r"(\d+)",
       "metadata": {"source": "unit"}}


def lines(*rows: object) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode() + b"\n"


def errors_of(data: bytes, limits: DatasetLimits = DatasetLimits()) -> list[str]:
    with pytest.raises(DatasetValidationError) as info:
        validate_jsonl(data, limits)
    assert isinstance(info.value, ValueError)
    return info.value.errors


def only_error(data: bytes, limits: DatasetLimits = DatasetLimits()) -> str:
    errs = errors_of(data, limits)
    assert len(errs) == 1, errs
    return errs[0]


def test_good_file_all_kinds():
    samples = validate_jsonl(lines(MC, "", PARTIAL, "   ", GEN))
    assert [s.id for s in samples] == ["a", "w", "g"]
    assert [s.kind for s in samples] == ["mc", "mc", "gen"]
    assert samples[0].choices == ("4", "5", "6") and samples[0].answer == 0
    assert samples[1].contexts_and_continuations()[1] == ("Ann beat Bo so Bo", " won.")
    assert samples[2].reference == "9" and samples[2].metadata == {"source": "unit"}


def test_round_trip(tmp_path: Path):
    first = validate_jsonl(lines(MC, PARTIAL, GEN))
    path = write_jsonl(first, tmp_path / "out.jsonl")
    second = validate_jsonl(path)
    assert second == first
    assert validate_jsonl(str(path)) == first  # a str is a path too
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


def test_bad_json_names_line():
    err = only_error(lines(MC, '{"id": "b", "prompt": ', {**MC, "id": "c"}))
    assert err.startswith("line 2:") and "invalid JSON" in err


def test_not_an_object():
    assert only_error(lines(MC, [1, 2])).startswith("line 2: expected a JSON object")


def test_missing_id():
    row = {k: v for k, v in MC.items() if k != "id"}
    assert only_error(lines(row)) == "line 1: field 'id': missing"


def test_wrong_typed_id():
    assert "line 1: field 'id': must be a non-empty string" in only_error(lines({**MC, "id": 7}))


def test_duplicate_id():
    err = only_error(lines(MC, {**MC, "id": "b"}, MC))
    assert err.startswith("line 3: field 'id'") and "duplicate id 'a' (first on line 1)" in err


def test_answer_out_of_range():
    err = only_error(lines(MC, MC | {"id": "b", "answer": 5}))
    assert err == "line 2: field 'answer': index 5 out of range for 3 choices"


def test_negative_answer_out_of_range():
    assert "field 'answer': index -1 out of range" in only_error(lines(MC | {"answer": -1}))


def test_answer_wrong_type():
    assert "line 1: field 'answer': must be an integer index, got str" in only_error(lines(MC | {"answer": "0"}))
    assert "got bool" in only_error(lines(MC | {"answer": True}))


def test_missing_answer():
    row = {k: v for k, v in MC.items() if k != "answer"}
    assert only_error(lines(row)).startswith("line 1: field 'answer': missing")


def test_fewer_than_two_choices():
    assert only_error(lines(MC | {"choices": ["4"]})) == "line 1: field 'choices': needs at least 2 entries, got 1"


def test_choices_wrong_type():
    assert only_error(lines(MC | {"choices": "4, 5"})) == "line 1: field 'choices': must be a list of strings"
    assert "field 'choices': entry 1 is empty" in only_error(lines(MC | {"choices": ["4", " "]}))


def test_empty_prompt():
    assert only_error(lines(MC, GEN | {"prompt": "  "})) == "line 2: field 'prompt': empty prompt"


def test_missing_prompt():
    row = {k: v for k, v in MC.items() if k != "prompt"}
    assert only_error(lines(row)) == "line 1: field 'prompt': missing"


def test_unknown_field():
    err = only_error(lines(MC | {"anwser": 1}))
    assert err.startswith("line 1: field 'anwser': unknown field")


def test_no_task_fields():
    err = only_error(lines({"id": "x", "prompt": "hi"}))
    assert err.startswith("line 1: missing fields") and "'reference'" in err


def test_partial_needs_continuation_and_two_prompts():
    row = {k: v for k, v in PARTIAL.items() if k != "continuation"}
    assert only_error(lines(row)).startswith("line 1: field 'continuation': missing")
    errs = errors_of(lines(PARTIAL | {"choice_prompts": ["only one"]}))
    assert errs == ["line 1: field 'choice_prompts': needs at least 2 entries, got 1"]


def test_mixed_kind_fields_rejected():
    assert "line 1: field 'continuation': not allowed in a generation" in only_error(lines(GEN | {"continuation": "x"}))
    assert "field 'extract': not allowed in a multiple-choice" in only_error(lines(MC | {"extract": "first-line"}))
    assert "field 'prompt': not allowed in a partial-scoring" in only_error(lines(PARTIAL | {"prompt": "p"}))


def test_generation_reference_and_pattern():
    assert only_error(lines(GEN | {"reference": 9})) == "line 1: field 'reference': must be a string, got int"
    err = only_error(lines(GEN | {"answer_pattern": "(unclosed"}))
    assert err.startswith("line 1: field 'answer_pattern': not a valid regular expression")


def test_metadata_must_be_object():
    assert only_error(lines(GEN | {"metadata": [1]})) == "line 1: field 'metadata': must be a JSON object"


def test_one_bad_line_rejects_whole_file_and_lists_all_errors():
    rows = [MC | {"id": f"s{i}"} for i in range(10)]
    rows[4] = rows[4] | {"answer": 9}
    rows[7] = rows[7] | {"prompt": ""}
    errs = errors_of(lines(*rows))
    assert errs == ["line 5: field 'answer': index 9 out of range for 3 choices", "line 8: field 'prompt': empty prompt"]


def test_error_count_is_capped():
    errs = errors_of(lines(*["{bad"] * 20), DatasetLimits(max_errors=5))
    assert len(errs) == 6 and errs[-1] == "stopped after 5 errors"


def test_row_limit():
    err = only_error(lines(*[MC | {"id": f"s{i}"} for i in range(4)]), DatasetLimits(max_rows=3))
    assert err == "line 4: file has more than 3 rows (limit)"
    assert len(validate_jsonl(lines(*[MC | {"id": f"s{i}"} for i in range(3)]), DatasetLimits(max_rows=3))) == 3


def test_byte_limit(tmp_path: Path):
    data = lines(MC, PARTIAL)
    assert "over the limit of 10 bytes" in only_error(data, DatasetLimits(max_bytes=10))
    path = tmp_path / "big.jsonl"
    path.write_bytes(data)
    assert "over the limit of 10 bytes" in only_error(path, DatasetLimits(max_bytes=10))  # type: ignore[arg-type]


def test_field_length_limit():
    limits = DatasetLimits(max_field_chars=30)
    assert only_error(lines(MC | {"prompt": "x" * 31}), limits) == "line 1: field 'prompt': longer than 30 characters (limit)"
    assert "field 'choices': longer than 30" in only_error(lines(MC | {"choices": ["a", "b" * 40]}), limits)


def test_empty_file_and_bad_utf8(tmp_path: Path):
    assert only_error(b"\n\n") == "file has no samples"
    assert only_error(lines(MC) + b"\xff\xfe\n").startswith("line 2: not valid UTF-8")
    assert "not found" in only_error(tmp_path / "missing.jsonl")  # type: ignore[arg-type]


def test_write_jsonl_is_canonical(tmp_path: Path):
    path = write_jsonl([Sample(id="x", prompt="p", choices=("a", "b"), answer=1)], tmp_path / "d" / "x.jsonl")
    assert path.read_text() == '{"id": "x", "prompt": "p", "choices": ["a", "b"], "answer": 1}\n'


# --- CLI ------------------------------------------------------------------------------------------------------

@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_cli_validate_ok(runner: CliRunner, tmp_path: Path):
    from services.cli.main import app

    path = tmp_path / "good.jsonl"
    path.write_bytes(lines(MC, PARTIAL, GEN))
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "ok: 3 samples" in result.output


def test_cli_validate_errors(runner: CliRunner, tmp_path: Path):
    from services.cli.main import app

    path = tmp_path / "bad.jsonl"
    path.write_bytes(lines(MC, MC | {"id": "b", "answer": 7}, "{oops", MC))
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 2  # bad input: the same exit code as tad run / tad submit
    assert "line 2: field 'answer': index 7 out of range for 3 choices" in result.output
    assert "line 3: invalid JSON" in result.output
    assert "line 4: field 'id': duplicate id 'a'" in result.output
    assert "Traceback" not in result.output


def test_cli_validate_missing_file(runner: CliRunner, tmp_path: Path):
    from services.cli.main import app

    result = runner.invoke(app, ["data", "validate", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2 and "not found" in result.output


def test_generation_sample_with_choices_stop_and_extract_as_documented():
    row = GEN | {"choices": ["red", "blue"], "stop": ["\n"], "extract": "choice-label"}
    (sample,) = validate_jsonl(lines(row))
    assert sample.choices == ("red", "blue") and sample.stop == ("\n",) and sample.extract == "choice-label"
    assert sample.kind == "gen"


def test_stop_and_extract_errors_name_the_field():
    assert only_error(lines(GEN | {"stop": "\n"})) == "line 1: field 'stop': must be a list of non-empty strings"
    assert only_error(lines(GEN | {"extract": "best"})).startswith("line 1: field 'extract': unknown extraction mode")
    no_pattern = {k: v for k, v in GEN.items() if k != "answer_pattern"}
    assert only_error(lines(no_pattern | {"extract": "first-match"})) == (
        "line 1: field 'extract': 'first-match' needs an answer_pattern")
    assert "field 'choices': must be a list of non-empty strings" in only_error(lines(GEN | {"choices": [""]}))


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_unicode_line_separators_inside_strings_round_trip(tmp_path: Path, sep: str):
    """JSON strings may hold U+2028 and other characters `str.splitlines` splits at; `dumps_jsonl` writes them
    raw, so a file split that way could not be read back. JSONL lines end at `\\n` only (`\\r\\n` too)."""
    from tad_core.datasets.user_files import load_user_split, parse_reference

    first = [Sample("a", f"Line one{sep}line two", ("x", "y"), answer=1), Sample("g", "Sum?", reference=f"4{sep}")]
    path = write_jsonl(first, tmp_path / "sep.jsonl")
    assert sep.encode() in path.read_bytes()
    assert validate_jsonl(path) == first
    assert load_user_split(parse_reference(str(path)), "val").samples == first
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert validate_jsonl(crlf) == first


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(constant: str):
    """Python's json reads them; Postgres refused the stored row (an unnamed error) and SQLite stored JSON that
    nothing else reads. Refused with the line."""
    row = '{"id": "q", "prompt": "p", "choices": ["a", "b"], "answer": 0, "metadata": {"x": %s}}' % constant
    with pytest.raises(DatasetValidationError) as e:
        validate_jsonl(lines(row))
    assert e.value.errors == [f"line 1: invalid JSON: {constant} is not a JSON value (write a number or null)"]
