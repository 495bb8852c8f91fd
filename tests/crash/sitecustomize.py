"""Test only (tests put this directory on PYTHONPATH): crash points.

With ``FFF_TEST_KILL_AT`` set (comma-separated job kinds: train, segment, audit,
select, calculate), a worker kills itself with SIGKILL right after the first job of
one of these kinds has stored part of its work, as a node failure would (see
crash_points.py). With ``FFF_TEST_STALL_AT`` instead, the worker hangs there (a job
that outruns its wall time, for the scheduler to kill), at most
``FFF_TEST_STALL_SECONDS`` (600). With ``FFF_TEST_KILL_WRITES`` set, it kills itself
between two of FireWorks' own writes (see fireworks_points.py). Each point is killed
once: a file named after it in ``FFF_TEST_KILL_MARKS`` records the kill.
"""

import os

if os.environ.get("FFF_TEST_KILL_AT"):
    import crash_points

    crash_points.install(os.environ["FFF_TEST_KILL_AT"].split(","))
if os.environ.get("FFF_TEST_STALL_AT"):
    import crash_points

    crash_points.install(os.environ["FFF_TEST_STALL_AT"].split(","), crash_points.stall)
if os.environ.get("FFF_TEST_KILL_WRITES"):
    import fireworks_points

    fireworks_points.install()
