"""qlaunch with the shipped Slurm and PBS adapters submits workers that complete Fireworks."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pymongo
import pytest

from project import run, submit_script, use_server

pytestmark = pytest.mark.slow

MARKER = "fff-Option-Marker-51c"

STAND_IN = """#!/usr/bin/env bash
# Stand-in for {command}: records the submitted script and runs it in the background,
# in a session of its own whose id goes to $FFF_TEST_SUBMITTED/sessions.
cp "$1" "$FFF_TEST_SUBMITTED/{command}-$(date +%s%N).script"
setsid nohup bash "$1" > "$1.out" 2>&1 < /dev/null &
echo $! >> "$FFF_TEST_SUBMITTED/sessions"
echo "{answer}"
"""


@pytest.fixture
def scheduler(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`sbatch` and `qsub` on PATH that behave like a scheduler with a free node.

    The "jobs" go on looking for work after their rocket (the Slurm adapter runs
    rockets for several rounds): they are ended with the test, as a scheduler would.
    """
    bin_directory = tmp_path / "scheduler-bin"
    submitted = tmp_path / "submitted"
    bin_directory.mkdir()
    submitted.mkdir()
    for command, answer in (("sbatch", "Submitted batch job 4242"), ("qsub", "4243.pbs-server")):
        path = bin_directory / command
        path.write_text(STAND_IN.format(command=command, answer=answer))
        path.chmod(0o755)
    yield {
        "PATH": f"{bin_directory}{os.pathsep}{os.environ['PATH']}",
        "FFF_TEST_SUBMITTED": str(submitted),
    }
    sessions = submitted / "sessions"
    for session in sessions.read_text().split() if sessions.exists() else []:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(session), signal.SIGTERM)


def wait_for_execution(database, indices: list[int], seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        execution = database.executions.find_one({"index": {"$in": indices}})
        if execution:
            return execution
        time.sleep(0.5)
    raise AssertionError(f"no worker ran any of the jobs {indices} within {seconds} s")


def settled_states(database, seconds: float = 60) -> list[str]:
    """The Fireworks' states once none is reserved or running (a job records its run first)."""
    busy = {"state": {"$in": ["RESERVED", "RUNNING"]}}
    deadline = time.monotonic() + seconds
    while database.fireworks.count_documents(busy) and time.monotonic() < deadline:
        time.sleep(0.5)
    return sorted(firework["state"] for firework in database.fireworks.find({}))


def test_slurm_and_pbs_adapters_submit_workers_of_their_category(
    workdir: Path, mongo_uri: str, scheduler: dict[str, str]
):
    name = f"fff_{uuid.uuid4().hex[:8]}"
    use_server(workdir, f"{mongo_uri}/{name}?appname={MARKER}")
    # The shared configuration names the server without its options; pointed nowhere, it
    # shows that submitting, workers and jobflow all read the private files of `fff init`.
    for shared in ("my_launchpad.yaml", "fw_config/FW_config.yaml", "fw_config/jobflow.yaml"):
        text = (workdir / shared).read_text()
        assert MARKER not in text
        (workdir / shared).write_text(text.replace(mongo_uri, "mongodb://127.0.0.1:9"))
    (workdir / "submit.py").write_text(submit_script("plumbing_jobs:mixed_flow"))
    assert run(workdir, "python", "submit.py", "1").returncode == 0
    database = pymongo.MongoClient(mongo_uri)[name]

    slurm = run(
        workdir,
        "qlaunch",
        "-q",
        "fw_config/my_qadapter_slurm.yaml",
        "singleshot",
        FFF_TEST_WORKER="slurm",
        **scheduler,
    )
    assert slurm.returncode == 0, slurm.stderr
    assert wait_for_execution(database, [0])["worker"] == "slurm"

    pbs = run(
        workdir,
        "qlaunch",
        "-q",
        "fw_config/my_qadapter_pbs.yaml",
        "singleshot",
        FFF_TEST_WORKER="pbs",
        **scheduler,
    )
    assert pbs.returncode == 0, pbs.stderr
    assert wait_for_execution(database, [1000, 2000])["worker"] == "pbs"

    scripts = {
        path.name.split("-")[0]: path.read_text()
        for path in Path(scheduler["FFF_TEST_SUBMITTED"]).glob("*.script")
    }
    assert "#SBATCH --job-name=fff_gpu" in scripts["sbatch"]
    assert "#SBATCH --gres=gpu:1" in scripts["sbatch"]
    assert 'fw_config/my_fworker_gpu.yaml" rapidfire' in scripts["sbatch"]
    assert 'rlaunch -l "$FFF_LAUNCHPAD_FILE"' in scripts["sbatch"]
    assert "#PBS -V" in scripts["qsub"]
    assert 'fw_config/my_fworker_cpu.yaml" singleshot' in scripts["qsub"]
    assert settled_states(database) == ["COMPLETED", "COMPLETED", "READY"]
