"""Test only: wraps database updates of fff_jobs so that a worker dies or hangs right after."""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path

from fff_jobs import database as db


def _after(function, kind: str, condition, action):
    @functools.wraps(function)
    def wrapper(database, *args, **kwargs):
        result = function(database, *args, **kwargs)
        if condition(database, args, result):
            _once(kind, action)
        return result

    return wrapper


def _once(kind: str, action) -> None:
    mark = Path(os.environ["FFF_TEST_KILL_MARKS"]) / kind
    if not mark.exists():
        mark.write_text(str(os.getpid()))
        action()


def kill() -> None:
    """Die at once, as on a node failure."""
    os.kill(os.getpid(), signal.SIGKILL)


def stall() -> None:
    """Hang (at most FFF_TEST_STALL_SECONDS), as a job that outruns its wall time."""
    time.sleep(float(os.environ.get("FFF_TEST_STALL_SECONDS", "600")))


def _source(source: str):
    return lambda database, args, result: result and args[0][0].source == source


# job kind -> (database function, when to die after it)
POINTS = {
    # a generation's last member is registered and published: its follow-up is not added
    "train": ("publish_generation", lambda database, args, result: bool(result)),
    # frames pooled and the segment recorded: its audit is not handed over
    "segment": ("complete_segment", lambda database, args, result: result),
    # the audit's reference result stored, its decision not applied
    "audit": ("store_reference_results", _source("audit")),
    # the selection stored: its claim is not released, its calculations not handed over
    "select": ("store_selection", lambda database, args, result: result),
    # the first frame of a calculation job stored, the others not computed
    "calculate": ("store_reference_results", _source("active")),
}


def install(kinds: list[str], action=kill) -> None:
    for kind in kinds:
        name, condition = POINTS[kind]
        setattr(db, name, _after(getattr(db, name), kind, condition, action))
