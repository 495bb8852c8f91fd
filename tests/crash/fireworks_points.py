"""Test only: a worker dies between two of FireWorks' own database writes, as on a node failure.

``FFF_TEST_KILL_WRITES`` lists kill points ``<update>:<n>``: the worker kills itself
(SIGKILL) right after the n-th write command (insert, update, delete, findAndModify,
as pymongo's command monitoring sees them reach the server) of an ``<update>``:

- ``complete``: ``LaunchPad.complete_launch`` of a job whose action adds jobs: the
  launch, the workflow lock, each new Firework's id and document (``_upsert_fws``),
  the finished Firework, the workflow document, the unlock;
- ``add_wf``: ``LaunchPad.add_wf`` inside a running job (a job that starts a new
  workflow): the ids, the Fireworks, the workflow document.

Each point kills once, at the first such update of a worker that has not used it;
a file named after it in ``FFF_TEST_KILL_MARKS`` records the kill.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from pathlib import Path

from pymongo import monitoring

WRITE_COMMANDS = {"insert", "update", "delete", "findAndModify"}
_counting = threading.local()


def _marks() -> Path:
    return Path(os.environ["FFF_TEST_KILL_MARKS"])


def _next_point(update: str) -> str | None:
    """The first kill point of this update not used yet by an earlier worker."""
    for point in os.environ["FFF_TEST_KILL_WRITES"].split(","):
        if point.startswith(f"{update}:") and not (_marks() / point).exists():
            return point
    return None


class KillAfterWrite(monitoring.CommandListener):
    """Counts the write commands of the update being watched; dies after the chosen one."""

    def started(self, event) -> None:
        pass

    def failed(self, event) -> None:
        pass

    def succeeded(self, event) -> None:
        point = getattr(_counting, "point", None)
        if point is None or event.command_name not in WRITE_COMMANDS:
            return
        _counting.writes += 1
        if _counting.writes == int(point.split(":")[1]):
            (_marks() / point).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def _watched(function, update: str, condition):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        point = _next_point(update) if condition(*args, **kwargs) else None
        _counting.point, _counting.writes = point, 0
        try:
            return function(*args, **kwargs)
        finally:
            _counting.point = None

    return wrapper


def _adds_jobs(launchpad, launch_id, action=None, state="COMPLETED") -> bool:
    return state == "COMPLETED" and bool(action and (action.additions or action.detours))


def install() -> None:
    from fireworks.core.launchpad import LaunchPad

    monitoring.register(KillAfterWrite())
    LaunchPad.complete_launch = _watched(LaunchPad.complete_launch, "complete", _adds_jobs)
    LaunchPad.add_wf = _watched(LaunchPad.add_wf, "add_wf", lambda *args, **kwargs: True)
