"""End to end: `tad dashboard` on a free port against the seeded database, opened in real headless Chromium
(Debian's `chromium`, driven by Playwright's Python package; never a browser download)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.dashboard.conftest import ROOT, Seed, seed_database
from tests.processes import stop_group

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"tad dashboard exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().decode().strip() == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"dashboard not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def own_seed(tmp_path: Path) -> Seed:
    """A seeded database of this test's own (it writes progress to it while the page is open)."""
    from services.db.schema import upgrade

    url = f"sqlite:///{tmp_path / 'tad.db'}"
    upgrade(url)
    return seed_database(url)


def _stream_progress(url: str, job_id: int, done: int) -> None:
    """What a worker does after a batch: store the shard's progress."""
    from services.db import store
    from services.db.session import make_engine, session_scope

    engine = make_engine(url)
    with session_scope(engine) as s:
        store.shard_progress(s, store.job_shards(s, job_id)[0].id, done)
    engine.dispose()


def test_dashboard_renders_leaderboard_in_chromium(own_seed: Seed, tmp_path: Path) -> None:
    seeded = own_seed
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium not installed: run scripts/setup_browser.sh")
    playwright = pytest.importorskip("playwright.sync_api")
    port = _free_port()
    log = tmp_path / "dashboard.log"
    env = {**os.environ, "TAD_DATABASE_URL": seeded.url, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "dashboard", "--port", str(port)],
                                cwd=str(ROOT), env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 1000})
                page.goto(url, wait_until="domcontentloaded")
                page.get_by_role("heading", name="Leaderboard").wait_for(timeout=60_000)
                best = page.locator('[data-testid="stMarkdownContainer"]', has_text="Best per dataset")
                best.wait_for(state="visible", timeout=60_000)
                assert "toy-mc:val: qa-lora:2 tad(alpha=1.0,beta=0.0)" in best.inner_text()
                grid = page.locator('[data-testid="stDataFrame"]').first
                grid.wait_for(state="visible", timeout=60_000)
                # the grid paints on a canvas; its accessible cells carry the values
                best_cells = grid.locator('[role="gridcell"]', has_text=re.compile(r"0\.7000 ± 0\.1051 \(n=20\)( ▲)? ★"))
                best_cells.first.wait_for(state="attached", timeout=60_000)
                assert best_cells.count() == 2
                # v2's tad beats its weak ft significantly (Holm-adjusted McNemar): marked ▲
                assert grid.locator('[role="gridcell"]', has_text="0.7000 ± 0.1051 (n=20) ▲ ★").count() == 1
                assert grid.locator('[role="gridcell"]', has_text="tad(alpha=1.0,beta=0.0)").count() >= 2
                page.wait_for_timeout(1500)  # let the canvas paint before the screenshot
                page.screenshot(path=str(shot), full_page=True)
                # and another page: the run comparison shows the paired statistics
                page.get_by_role("link", name="Run comparison").click()
                table = page.locator('[data-testid="stTable"]').first
                table.wait_for(state="visible", timeout=60_000)
                assert "A right" in table.inner_text()
                page.locator('[data-testid="stDataFrame"]').first.wait_for(state="visible", timeout=60_000)
                page.wait_for_timeout(1500)
                page.screenshot(path=str(ARTIFACTS / "dashboard_compare.png"), full_page=True)
                # live jobs: progress streamed to the DB appears without a reload (the page's fragment polls)
                page.get_by_role("link", name="Live jobs").click()
                page.get_by_text("5/24 samples").first.wait_for(timeout=60_000)
                _stream_progress(seeded.url, seeded.jobs["running"], 8)
                page.get_by_text("8/24 samples").first.wait_for(timeout=20_000)
            finally:
                browser.close()
        assert shot.is_file() and shot.stat().st_size > 20_000
    finally:
        stop_group(proc, 15)
