"""Stopping the subprocesses tests start (workers, `tad serve`, the dashboard)."""
from __future__ import annotations

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM a process started with `start_new_session=True` and everything it forked (a worker's pool children,
    a server's reloader), SIGKILL them if they are still there after `grace_s`."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
