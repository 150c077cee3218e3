"""The adapter directory layout: which weights file counts, and how a manifest is read."""
from __future__ import annotations

from pathlib import Path

from tad_core.adapter_dir import MANIFEST, PICKLED, SAFETENSORS, read_manifest, weights_file


def test_safetensors_weights_win_over_pickled_ones(tmp_path: Path) -> None:
    assert weights_file(tmp_path) is None
    (tmp_path / PICKLED).write_bytes(b"x")
    assert weights_file(tmp_path) == tmp_path / PICKLED
    (tmp_path / SAFETENSORS).write_bytes(b"y")
    assert weights_file(tmp_path) == tmp_path / SAFETENSORS


def test_manifest_read_in_order_and_unreadable_ones_are_empty(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) == {}
    (tmp_path / "manifest.json").write_text('{"base": "old"}')
    assert read_manifest(tmp_path) == {"base": "old"}
    (tmp_path / MANIFEST).write_text('{"base": "smollm2-135m-instruct"}')
    assert read_manifest(tmp_path) == {"base": "smollm2-135m-instruct"}
    (tmp_path / MANIFEST).write_text("{not json")
    assert read_manifest(tmp_path) == {}
    (tmp_path / MANIFEST).write_text("[1, 2]")
    assert read_manifest(tmp_path) == {}
