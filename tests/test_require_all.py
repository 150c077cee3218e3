"""`make test` runs with TAD_REQUIRE_ALL=1: a test that skips (a service missing) fails the run instead of passing it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, require_all: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_one.py").write_text(
        "import pytest\n\n\ndef test_needs_a_service():\n    pytest.skip('no Postgres at 127.0.0.1')\n\n\n"
        "def test_plain():\n    assert True\n")
    env = {**os.environ, "TAD_REQUIRE_ALL": require_all}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_one.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_skip_fails_the_run_under_require_all(tmp_path: Path) -> None:
    proc = _run(tmp_path, "1")
    assert proc.returncode == 1, proc.stdout
    assert "1 failed, 1 passed" in proc.stdout
    assert "skipped under TAD_REQUIRE_ALL=1" in proc.stdout and "no Postgres at 127.0.0.1" in proc.stdout


def test_a_skip_stays_a_skip_otherwise(tmp_path: Path) -> None:
    proc = _run(tmp_path, "0")
    assert proc.returncode == 0, proc.stdout
    assert "1 passed, 1 skipped" in proc.stdout
