"""A worker killed between any two of FireWorks' own writes: `fff recover` repairs the rest.

FireWorks completes a job that adds jobs in several writes (LaunchPad.complete_launch).
Here each link of a chain of plumbing jobs adds the next link and, as a detour, a
leaf, so its completion writes 9 times: the launch, the workflow lock, each new
Firework's id and document (``_upsert_fws``), the finished Firework, the workflow
document, the unlock. One worker after another kills itself right after the n-th
write of a completion, for n = 1 to 8 (tests/crash/fireworks_points.py), each kill
followed by `fff recover --expire 0`. After the kill that leaves a new Firework in
no workflow, a worker first picks that Firework up, as in issue 13: it fails with
"Could not find workflow" and leaves it FIZZLED.

The same repair in-process: a lock held by a live update is waited for (within a
bound), one left by a dead worker is not; a Firework in no workflow gets one.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pymongo
import pytest
from fireworks import Firework, LaunchPad, ScriptTask

from fff_jobs.config import initialise
from fff_jobs.repair import inspect, repair_fireworks

from project import TESTS, run, server_project, submit_script

LINKS = 10  # 9 completions that add jobs: one for each kill point, and one spare
COMPLETION_WRITES = 9
POINTS = [f"complete:{write}" for write in range(1, COMPLETION_WRITES)]
ORPHANING_POINT = "complete:4"  # launch, lock, id, the detour's Firework: the link's is not


def impatient_worker(project: Path):
    """A worker that waits 1 s, not 60, for a workflow lock (FW_config's WFLOCK_EXPIRATION_SECS)."""
    settings = project / "fw_config/FW_config.yaml"
    original = settings.read_text()
    settings.write_text(original.replace("WFLOCK_EXPIRATION_SECS: 60", "WFLOCK_EXPIRATION_SECS: 1"))
    try:
        return run(project, "rlaunch", "singleshot")
    finally:
        settings.write_text(original)


@pytest.fixture(scope="module")
def killed_chain(tmp_path_factory, mongo_uri: str):
    """The chain run to the end through a kill after every write of a completion but the last."""
    project = tmp_path_factory.mktemp("fireworks_kills")
    name = server_project(project, mongo_uri)
    (project / "submit.py").write_text(submit_script("plumbing_jobs:branching_flow"))
    assert run(project, "python", "submit.py", str(LINKS)).returncode == 0
    marks = project / "kills"
    marks.mkdir()
    environment = {
        "PYTHONPATH": f"{TESTS / 'crash'}:{TESTS}",
        "FFF_TEST_KILL_WRITES": ",".join(POINTS),
        "FFF_TEST_KILL_MARKS": str(marks),
    }
    recoveries, picked_orphan = {}, None
    for _ in range(len(POINTS) + 2):
        worker = run(project, "rlaunch", "rapidfire", "--sleep", "1", **environment)
        if worker.returncode == 0:
            break
        assert worker.returncode == -9, worker.stderr[-3000:]
        (point,) = {mark.name for mark in marks.iterdir()} - set(recoveries)
        if point == ORPHANING_POINT:
            picked_orphan = impatient_worker(project)
        recoveries[point] = run(project, "fff", "recover", "--expire", "0")
    return pymongo.MongoClient(mongo_uri)[name], project, recoveries, picked_orphan


@pytest.mark.slow
def test_every_write_of_a_completion_was_killed_after_and_recovered(killed_chain):
    _, _, recoveries, _ = killed_chain
    assert sorted(recoveries) == sorted(POINTS)
    for point, recovered in recoveries.items():
        assert recovered.returncode == 0, (point, recovered.stdout + recovered.stderr)
        assert recovered.stdout.splitlines()[-1] == "nothing left to repair"
        assert "found: workflow" in recovered.stdout, (point, recovered.stdout)
    assert "locked with no live owner" not in recoveries["complete:1"].stdout
    for write in range(2, COMPLETION_WRITES):
        assert "locked with no live owner" in recoveries[f"complete:{write}"].stdout


@pytest.mark.slow
def test_fireworks_left_in_no_workflow_are_brought_back(killed_chain):
    _, _, recoveries, _ = killed_chain
    for write in (4, 5, 6, 7):  # after the first new Firework, before the workflow document
        recovered = recoveries[f"complete:{write}"].stdout
        assert "is in no workflow" in recovered and "back into it" in recovered, recovered
    for write in (1, 2, 3, 8):
        assert "is in no workflow" not in recoveries[f"complete:{write}"].stdout


@pytest.mark.slow
def test_a_worker_that_picks_up_such_a_firework_fails_and_recovery_repairs_it(killed_chain):
    database, _, recoveries, picked_orphan = killed_chain
    assert picked_orphan.returncode != 0
    assert "Could not find workflow" in picked_orphan.stderr
    recovered = recoveries[ORPHANING_POINT].stdout
    assert "back into it" in recovered and "re-ran 0 lost job(s)" in recovered
    (picked,) = database.fireworks.find({"archived_launches": {"$ne": []}})
    assert picked["state"] == "COMPLETED" and len(picked["launches"]) == 1


@pytest.mark.slow
def test_every_job_ran_exactly_once(killed_chain):
    database, _, _, _ = killed_chain
    ran = sorted(execution["index"] for execution in database.executions.find({}))
    assert ran == [*range(LINKS), *range(1000, 1000 + LINKS - 1)]


@pytest.mark.slow
def test_fireworks_records_are_whole_again(killed_chain, mongo_uri: str):
    database, project, _, _ = killed_chain
    fireworks = {fw["fw_id"]: fw["state"] for fw in database.fireworks.find({})}
    assert len(fireworks) == 2 * LINKS - 1 and set(fireworks.values()) == {"COMPLETED"}
    (workflow,) = database.workflows.find({})
    assert sorted(workflow["nodes"]) == sorted(fireworks) and "locked" not in workflow
    assert {int(fw_id): state for fw_id, state in workflow["fw_states"].items()} == fireworks
    doctor = run(project, "fff", "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "invariants  FireWorks: intact" in doctor.stdout
    assert f"database    {mongo_uri}/{database.name}: reachable\n" in doctor.stdout
    assert "Warning" not in doctor.stderr


@pytest.fixture
def launchpad(mongo_uri: str) -> LaunchPad:
    name = f"fff_{uuid.uuid4().hex[:8]}"
    settings = {"host": f"{mongo_uri}/{name}", "uri_mode": True, "name": name}
    launchpad = LaunchPad.from_dict(settings)
    initialise(launchpad)
    return launchpad


def add_job(launchpad: LaunchPad, name: str) -> int:
    (fw_id,) = launchpad.add_wf(Firework(ScriptTask.from_str("true"), name=name)).values()
    return fw_id


def test_a_live_lock_is_waited_for_within_the_bound(launchpad: LaunchPad):
    fw_id = add_job(launchpad, "job")
    launchpad.workflows.update_one({"nodes": fw_id}, {"$set": {"locked": True}})
    unlock = threading.Timer(
        1, launchpad.workflows.update_one, [{"nodes": fw_id}, {"$unset": {"locked": True}}]
    )
    unlock.start()
    started = time.monotonic()
    assert not inspect(launchpad, wait=10)
    assert time.monotonic() - started < 5
    launchpad.workflows.update_one({"nodes": fw_id}, {"$set": {"locked": True}})
    started = time.monotonic()
    damage = inspect(launchpad, wait=2)
    assert 2 <= time.monotonic() - started < 6
    assert damage.describe() == [f"workflow {fw_id} (job): locked with no live owner"]
    repaired = repair_fireworks(launchpad, wait=0)
    assert repaired.lines[-1] == f"workflow {fw_id} (job): unlocked" and not repaired.unrepaired
    assert "locked" not in launchpad.workflows.find_one({"nodes": fw_id})


def test_a_firework_in_no_workflow_gets_one_unless_a_workflow_holds_its_job(launchpad):
    held = add_job(launchpad, "held")
    twin = Firework(ScriptTask.from_str("true"), name="held", fw_id=-1)
    twin.spec = launchpad.get_fw_by_id(held).spec
    lone = Firework(ScriptTask.from_str("echo lone"), name="lone", fw_id=-2)
    ids = launchpad._upsert_fws([twin, lone])  # written, but no workflow document: orphans
    repaired = repair_fireworks(launchpad, wait=0, workflow_name_for=lambda name: f"home of {name}")
    assert repaired.lines[-2:] == [
        f"deleted Firework {ids[-1]} (held): a workflow holds its job",
        f"put Fireworks [{ids[-2]}] into a new workflow 'home of lone'",
    ]
    assert launchpad.fireworks.count_documents({"fw_id": ids[-1]}) == 0
    home = launchpad.workflows.find_one({"nodes": ids[-2]})
    assert home["name"] == "home of lone" and home["fw_states"] == {str(ids[-2]): "READY"}
    assert not inspect(launchpad, wait=0)
