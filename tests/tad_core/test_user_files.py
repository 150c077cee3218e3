"""A user's dataset files: splits in one file or one file per split, labels, .json arrays, choice shuffling."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tad_core.datasets import DatasetValidationError, load_dataset
from tad_core.datasets.shuffle import shuffle_choices
from tad_core.datasets.user_files import DatasetReferenceError, parse_reference, validate_file
from tad_core.samples import Sample


def rows(n: int, split: str | None = None, prefix: str = "q") -> list[dict]:
    out = []
    for i in range(n):
        row = {"id": f"{prefix}{i}", "prompt": f"Q{i}?", "choices": ["a", "b", "c"], "answer": 2}
        if split:
            row["split"] = split
        out.append(row)
    return out


def jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


def test_one_file_with_a_split_field_selects_the_split(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "sciq.jsonl", rows(3, "train", "t") + rows(2, "val", "v") + rows(1, "test", "x"))
    val = load_dataset(str(f), "val")
    train = load_dataset(str(f), "train")
    assert [s.id for s in val.samples] == ["v0", "v1"] and [s.id for s in train.samples] == ["t0", "t1", "t2"]
    assert val.name == train.name == "sciq" and val.content_hash != train.content_hash
    assert "split=val" in val.source
    with pytest.raises(DatasetReferenceError, match=r"no split 'dev'.*available: test, train, val"):
        load_dataset(str(f), "dev")


def test_split_field_everywhere_or_nowhere(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "mixed.jsonl", rows(2, "train") + rows(1, prefix="z"))
    with pytest.raises(DatasetValidationError, match=r"mixed.jsonl: line 3: field 'split': missing"):
        validate_file(f)
    bad = jsonl(tmp_path / "bad.jsonl", [{**rows(1)[0], "split": "no spaces allowed"}])
    with pytest.raises(DatasetValidationError, match=r"line 1: field 'split': must be a split name"):
        validate_file(bad)


def test_one_file_per_split(tmp_path: Path) -> None:
    train = jsonl(tmp_path / "copa_train.jsonl", rows(3, prefix="t"))
    val = jsonl(tmp_path / "copa-validation.jsonl", rows(2, prefix="v"))
    ref = f"copa={train},{val}"
    assert parse_reference(ref).files == {"train": train, "val": val}
    assert [s.id for s in load_dataset(ref, "val").samples] == ["v0", "v1"]
    assert load_dataset(ref, "train").name == "copa"
    explicit = f"copa=test:{train},val:{val}"
    assert [s.id for s in load_dataset(explicit, "test").samples] == ["t0", "t1", "t2"]
    with pytest.raises(DatasetReferenceError, match="no split 'test'; available: train, val"):
        load_dataset(ref, "test")
    with pytest.raises(DatasetReferenceError, match="two files for split 'train'"):
        parse_reference(f"copa={train},{train}")
    with pytest.raises(DatasetReferenceError, match="does not exist"):
        parse_reference(f"copa={tmp_path / 'nope_val.jsonl'}")


def test_same_basename_different_labels(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = jsonl(tmp_path / "a" / "test.jsonl", rows(2))
    b = jsonl(tmp_path / "b" / "test.jsonl", rows(3))
    assert load_dataset(str(a), "test").name == load_dataset(str(b), "test").name == "test"  # the surprise
    assert load_dataset(f"sciq={a}", "test").name == "sciq"
    assert load_dataset(str(b), "test", name="csqa").name == "csqa"
    with pytest.raises(DatasetReferenceError, match="dataset name 'bad name'"):
        load_dataset(str(b), "test", name="bad name")


def test_json_arrays_are_read_like_jsonl_and_errors_name_the_item(tmp_path: Path) -> None:
    items = rows(3)
    arr = tmp_path / "set.json"
    arr.write_text(json.dumps(items, indent=2))
    assert [s.id for s in load_dataset(str(arr), "val").samples] == ["q0", "q1", "q2"]
    assert load_dataset(str(arr), "val").content_hash == load_dataset(str(jsonl(tmp_path / "set.jsonl", items)),
                                                                      "val").content_hash
    items[1]["answer"] = 9
    arr.write_text(json.dumps(items))
    with pytest.raises(DatasetValidationError, match=r"set.json: item 2: field 'answer': index 9 out of range"):
        load_dataset(str(arr), "val")
    arr.write_text('{"id": "x"}')
    with pytest.raises(DatasetValidationError, match="must be an array of samples, got dict"):
        validate_file(arr)


def test_shuffled_choices_follow_a_seeded_order_per_sample() -> None:
    samples = [Sample(id=f"s{i}", prompt="Q", choices=("w", "x", "y", "right"), answer=3) for i in range(40)]
    shuffled = shuffle_choices(samples, seed=1)
    assert all(s.choices[s.answer] == "right" for s in shuffled)
    assert all(sorted(s.choices) == sorted(o.choices) for s, o in zip(shuffled, samples))
    assert all([o.choices[i] for i in s.metadata["choice_order"]] == list(s.choices) for s, o in zip(shuffled, samples))
    positions = {s.answer for s in shuffled}
    assert len(positions) == 4  # the gold no longer sits at one position
    assert shuffle_choices(samples[5:7], seed=1) == shuffled[5:7]  # per sample: independent of the others
    assert shuffle_choices(samples, seed=2) != shuffled
    gen = Sample(id="g", prompt="2+2?", reference="4")
    assert shuffle_choices([gen], 1) == [gen]
    partial = Sample(id="p", choice_prompts=("A won", "B won", "C won"), continuation=".", answer=0)
    [p] = shuffle_choices([partial], 3)
    assert p.choice_prompts[p.answer] == "A won"


def test_load_dataset_shuffle_names_and_hashes_it(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "sciq.jsonl", rows(6))
    plain, shuffled = load_dataset(str(f), "val"), load_dataset(str(f), "val", shuffle_choices=1)
    assert shuffled.name == "sciq+shuffle1" and shuffled.content_hash != plain.content_hash
    assert all(s.choices[s.answer] == "c" for s in shuffled.samples)
    assert load_dataset(str(f), "val", limit=2, shuffle_choices=1).samples == shuffled.samples[:2]


def test_split_rows_are_refused_where_one_split_is_expected() -> None:
    """The planner's own file path (API uploads) reads one split: a multi-split file there is an error naming the
    field, never all splits mixed into one job."""
    from tad_core.datasets import validate_jsonl

    data = "".join(json.dumps(r) + "\n" for r in rows(1, "train") + rows(1, "val", "v")).encode()
    with pytest.raises(DatasetValidationError, match=r"line 1: field 'split': rows with splits are selected"):
        validate_jsonl(data)
    assert len(validate_jsonl(data, allow_split=True)) == 2


def test_the_same_samples_hash_alike_in_every_layout(tmp_path: Path) -> None:
    """Key order and whitespace do not make another dataset: a plain file used to be hashed over its raw bytes,
    the split layouts over their canonical ones, so the same samples were stored twice."""
    items = rows(3)
    plain = jsonl(tmp_path / "a_val.jsonl", items)
    spaced = tmp_path / "b.jsonl"
    spaced.write_text("".join(json.dumps(dict(reversed(list(x.items()))), indent=None, separators=(" , ", " : "))
                              + "\n" for x in items))
    array = tmp_path / "c.json"
    array.write_text(json.dumps(items, indent=2))
    split_rows = jsonl(tmp_path / "d.jsonl", [{**x, "split": "val"} for x in items] + rows(1, "train", "t"))
    per_split = f"e={jsonl(tmp_path / 'e_train.jsonl', rows(1, prefix='t'))},{plain}"
    hashes = {ref: load_dataset(ref, "val").content_hash for ref in (str(plain), str(spaced), str(array),
                                                                      str(split_rows), per_split)}
    assert len(set(hashes.values())) == 1, hashes
    changed = jsonl(tmp_path / "f.jsonl", rows(2) + [{**items[2], "answer": 0}])
    assert load_dataset(str(changed), "val").content_hash != hashes[str(plain)]


def test_one_file_given_as_split_is_that_split_only(tmp_path: Path) -> None:
    """`NAME=val:FILE` used to drop the prefix: any `--split` read the whole file as that split."""
    f = jsonl(tmp_path / "mine.jsonl", rows(2))
    assert parse_reference(f"mine=val:{f}").files == {"val": f}
    assert [s.id for s in load_dataset(f"mine=val:{f}", "val").samples] == ["q0", "q1"]
    with pytest.raises(DatasetReferenceError, match="no split 'test'; available: val"):
        load_dataset(f"mine=val:{f}", "test")
    assert [s.id for s in load_dataset(f"mine={f}", "test").samples] == ["q0", "q1"]  # no prefix: every split
