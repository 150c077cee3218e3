"""Interrupting a running evaluation from outside it, within about a second.

A shard checks for cancellation between batches, but one batch can run for minutes (long generations, a huge
sample), and Celery's own time limits kill the whole child process. `interruptible` instead runs a watcher thread
that polls a condition (job cancelled, shard time limit passed) and, when it holds, raises `Interrupted` in the
evaluating thread (CPython's PyThreadState_SetAsyncExc). The exception arrives at the next Python bytecode, i.e.
between two model calls or two decoding steps; a single forward pass is not interruptible, which is one reason
the per-sample token budgets (services.budgets) exist.

`Interrupted` derives from BaseException so library code that catches `Exception` does not swallow it.
"""
from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Interrupted(BaseException):
    """The evaluation was interrupted from outside; `args[0]` says why (e.g. 'cancelled')."""

    @property
    def reason(self) -> str:
        return str(self.args[0]) if self.args else "interrupted"


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc) if exc is not None else None)


@contextmanager
def interruptible(why: Callable[[], str | None], every_s: float = 1.0) -> Iterator[None]:
    """Run the block; every `every_s` seconds call `why()` in a watcher thread, and when it returns a reason,
    interrupt the block with `Interrupted(reason)`. A failing `why()` (database briefly down) is ignored."""
    target = threading.get_ident()
    done = threading.Event()
    fired: list[str] = []

    def watch() -> None:
        while not done.wait(every_s):
            try:
                reason = why()
            except Exception:  # noqa: BLE001 - a failed check is retried at the next tick
                continue
            if reason:
                fired.append(reason)
                _raise_in(target, Interrupted)
                return

    watcher = threading.Thread(target=watch, name="tad-interrupt", daemon=True)
    watcher.start()
    try:
        yield
    except Interrupted:
        raise Interrupted(fired[0] if fired else "interrupted") from None
    finally:
        done.set()
        watcher.join()
        if fired:
            _raise_in(target, None)  # the block ended first: drop the exception still pending, if any
