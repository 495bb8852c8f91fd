"""Workers killed anywhere: the campaign recovers, loses nothing and computes nothing twice.

One campaign on the live test server (jongodb, or FFF_TEST_MONGODB_URI). A worker
runs every job and dies (SIGKILL) in turn:

- inside fff's own database calls: right after a job of the next kind on the list
  has stored part of its work (tests/crash/crash_points.py);
- inside FireWorks' own updates (tests/crash/fireworks_points.py): a completing job
  killed right after its first new Firework was written (the workflow stays locked,
  its fw_states stale, the Firework in no workflow), and a job killed between the
  Fireworks of the new workflow it starts and that workflow's document;
- at random instants: seeded delays, a few of them, once the points above are used.

Each kill is recovered as a user would, with `lpad detect_lostruns --rerun` or
`fff recover`, and a new worker carries on, until the campaign is complete.

The server's URI carries a secret (as a query option: jongodb has no
authentication, so no password can be used), which must appear nowhere: not in
any Firework, job output, stored document, launch directory, log line or fff output.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import bson.json_util
import pymongo
import pytest
import yaml

from project import TESTS, project_environment, run, server_project

pytestmark = pytest.mark.slow

BUDGET = 14
# job kind -> how the user recovers from the kill
KILL_POINTS = {
    "train": ["lpad", "detect_lostruns", "--rerun", "--time", "0"],
    "segment": ["fff", "recover", "--expire", "0"],
    "audit": ["lpad", "detect_lostruns", "--rerun", "--time", "0"],
    "select": ["fff", "recover", "--expire", "0"],
    "calculate": ["fff", "recover", "--expire", "0"],
}
RECOVER = ["fff", "recover", "--expire", "0"]
# FireWorks' own writes: after the first new Firework of a completing job (launch,
# lock, id, Firework), and between a new workflow's Fireworks and its document
FIREWORKS_POINTS = ("complete:4", "add_wf:3")
RANDOM_KILLS, SEED = 2, 13
MAX_WORKERS = 2 * (len(KILL_POINTS) + len(FIREWORKS_POINTS) + RANDOM_KILLS) + 2
SECRET = "fff-Secret-Marker-7d1"
COLLECTIONS = (
    "fireworks", "launches", "workflows", "fw_id_assigner", "outputs", "outputs_data.files",
    "outputs_data.chunks", "campaigns", "reference_results", "starting_structures",
    "trajectories", "segments", "frame_pool", "selections", "budget_claims", "models",
    "model_registry", "model_weights.files",
)  # fmt: skip


def tiny_spec(directory: Path) -> Path:
    spec = yaml.safe_load((TESTS / "specs/tiny_water.yaml").read_text())
    spec.update(num_to_run=BUDGET, retrain_freq=6)
    # Segments run their whole length, so selections (and their kills) come before audits
    # spend the budget, whatever the tiny models predict.
    spec["md"]["uncertainty_threshold"] = None
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def result_ids(database) -> set[str]:
    return {doc["_id"] for doc in database.reference_results.find({}, {"_id": 1})}


def run_worker(project: Path, environment: dict, kill_after: float | None) -> tuple[int, str, bool]:
    """One `rlaunch rapidfire` worker, killed after ``kill_after`` seconds if given and alive."""
    worker = subprocess.Popen(
        ["rlaunch", "rapidfire", "--sleep", "1"],
        cwd=project,
        env=project_environment(project, **environment),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = worker.communicate(timeout=kill_after or 900)
        return worker.returncode, output, False
    except subprocess.TimeoutExpired:
        worker.kill()
        output, _ = worker.communicate()
        return worker.returncode, output, kill_after is not None


@pytest.fixture(scope="module")
def crashed_campaign(tmp_path_factory, mongo_uri: str):
    """The tiny campaign run to completion through one kill (and recovery) per kill point."""
    project = tmp_path_factory.mktemp("recovery")
    name = server_project(project, mongo_uri, f"?appname={SECRET}")
    database = pymongo.MongoClient(mongo_uri)[name]
    submitted = run(project, "fff", "submit", str(tiny_spec(project)))
    assert submitted.returncode == 0, submitted.stderr
    campaign_id = submitted.stdout.split()[-1]
    marks = project / "kills"
    marks.mkdir()
    environment = {
        "PYTHONPATH": f"{TESTS / 'crash'}:{TESTS}",
        "FFF_TEST_KILL_AT": ",".join(KILL_POINTS),
        "FFF_TEST_KILL_WRITES": ",".join(FIREWORKS_POINTS),
        "FFF_TEST_KILL_MARKS": str(marks),
    }
    points = {*KILL_POINTS, *FIREWORKS_POINTS}
    seeded = random.Random(SEED)
    delays = [seeded.uniform(3, 12) for _ in range(RANDOM_KILLS)]
    stored_before_kills, recoveries, printed = set(), {}, [submitted.stdout + submitted.stderr]
    for _ in range(MAX_WORKERS):
        random_kills = sorted(kind for kind in recoveries if kind.startswith("random"))
        timed = points <= set(recoveries) and len(random_kills) < RANDOM_KILLS
        returncode, output, timed_out = run_worker(
            project, environment, delays[len(random_kills)] if timed else None
        )
        printed.append(output)
        if returncode == 0:
            break
        assert returncode == -9, output[-3000:]
        new = {mark.name for mark in marks.iterdir()} - set(recoveries)
        kind = new.pop() if new else f"random {len(random_kills)}"
        assert new == set() and (timed_out or not kind.startswith("random")), output[-3000:]
        stored_before_kills |= result_ids(database)
        recovered = run(project, *KILL_POINTS.get(kind, RECOVER))
        assert recovered.returncode == 0, recovered.stdout + recovered.stderr
        recoveries[kind] = recovered.stdout + recovered.stderr
    status = run(project, "fff", "status", campaign_id)
    printed += [*recoveries.values(), status.stdout + status.stderr]
    launch_files = [path for path in project.glob("launcher_*/*") if path.is_file()]
    printed += [path.read_text(errors="replace") for path in launch_files]
    return database, campaign_id, stored_before_kills, recoveries, "\n".join(printed), project


@pytest.mark.parametrize("kind", KILL_POINTS)
def test_the_killed_job_was_rerun_and_completed(crashed_campaign, kind: str):
    database, _, _, recoveries, _, _ = crashed_campaign
    assert kind in recoveries
    if KILL_POINTS[kind][0] == "fff":
        assert "re-ran 1 lost job(s)" in recoveries[kind]
    fireworks = list(database.fireworks.find({}, {"name": 1, "state": 1, "archived_launches": 1}))
    killed = [f for f in fireworks if f["archived_launches"] and f["name"].split()[1] == kind]
    assert killed and {firework["state"] for firework in killed} == {"COMPLETED"}


def test_every_job_completed(crashed_campaign):
    database, _, _, recoveries, _, _ = crashed_campaign
    random_kills = {f"random {index}" for index in range(RANDOM_KILLS)}
    assert set(recoveries) == {*KILL_POINTS, *FIREWORKS_POINTS, *random_kills}
    assert {firework["state"] for firework in database.fireworks.find({})} == {"COMPLETED"}
    workflows = list(database.workflows.find({}, {"nodes": 1, "state": 1}))
    assert len(workflows) >= 3 and {workflow["state"] for workflow in workflows} == {"COMPLETED"}
    assert max(len(workflow["nodes"]) for workflow in workflows) <= 10


def test_the_campaign_completes_with_its_budget_spent_exactly(crashed_campaign):
    database, campaign_id, _, _, _, _ = crashed_campaign
    campaign = database.campaigns.find_one({"_id": campaign_id})
    assert (campaign["status"], campaign["stop_reason"]) == ("complete", "reference budget spent")
    budgeted = list(database.reference_results.find({"source": {"$ne": "initial"}}))
    assert len(budgeted) == BUDGET == campaign["budget"]["spent"]
    claims = list(database.budget_claims.find({"campaign_id": campaign_id}))
    assert sorted(claim["slot"] for claim in claims) == list(range(BUDGET))
    assert {claim["result_id"] for claim in claims} == {result["_id"] for result in budgeted}


def test_nothing_is_computed_twice_and_nothing_stored_is_lost(crashed_campaign):
    database, _, stored_before_kills, _, _, _ = crashed_campaign
    results = list(database.reference_results.find({}))
    assert stored_before_kills <= {result["_id"] for result in results}
    frames = [result["frame_id"] for result in results if result["source"] == "active"]
    assert len(frames) == len(set(frames))
    audited = [(r["trajectory_id"], r["segment"]) for r in results if r["source"] == "audit"]
    assert len(audited) == len(set(audited))


def test_every_generation_is_trained_once_and_the_newest_is_complete(crashed_campaign):
    database, campaign_id, _, _, _, _ = crashed_campaign
    campaign = database.campaigns.find_one({"_id": campaign_id})
    members = [(model["generation"], model["member"]) for model in database.models.find({})]
    generations = sorted({generation for generation, _ in members})
    assert generations == list(range(len(generations))) and len(generations) >= 2
    assert sorted(members) == [(g, m) for g in generations for m in (0, 1)]
    assert [g["generation"] for g in campaign["generations"]] == generations
    registry = database.model_registry.find_one({"_id": campaign_id})
    assert registry["current_generation"] == generations[-1]
    assert len(registry["members"]) == 2


def test_no_credentials_in_the_database_launches_or_output(crashed_campaign):
    database, _, _, _, printed, _ = crashed_campaign
    stored = [bson.json_util.dumps(list(database[name].find({}))) for name in COLLECTIONS]
    assert database.fireworks.count_documents({}) > 20 and database.outputs.count_documents({})
    assert all(SECRET not in text for text in stored)
    assert "Rocket finished" in printed and "reference calculations" in printed
    assert SECRET not in printed


def test_a_kill_inside_fireworks_update_is_repaired_by_fff_recover(crashed_campaign):
    _, campaign_id, _, recoveries, _, _ = crashed_campaign
    completion = recoveries["complete:4"]
    assert "locked with no live owner" in completion and "is in no workflow" in completion
    assert "unlocked" in completion and "back into it" in completion
    new_workflow = recoveries["add_wf:3"]
    assert f"into a new workflow 'fff campaign {campaign_id}'" in new_workflow
    assert "re-ran 1 lost job(s)" in new_workflow
    for kind in (*FIREWORKS_POINTS, *(f"random {index}" for index in range(RANDOM_KILLS))):
        assert recoveries[kind].rstrip().endswith("nothing left to repair"), recoveries[kind]


def test_no_firework_is_left_outside_a_workflow_and_no_workflow_locked(crashed_campaign):
    database, _, _, _, _, _ = crashed_campaign
    workflows = list(database.workflows.find({}))
    nodes = [fw_id for workflow in workflows for fw_id in workflow["nodes"]]
    assert sorted(nodes) == sorted(fw["fw_id"] for fw in database.fireworks.find({}))
    assert not [workflow for workflow in workflows if workflow.get("locked")]
    states = {fw["fw_id"]: fw["state"] for fw in database.fireworks.find({})}
    for workflow in workflows:
        assert {int(fw_id): state for fw_id, state in workflow["fw_states"].items()} == {
            fw_id: states[fw_id] for fw_id in workflow["nodes"]
        }


def test_every_invariant_holds_and_nothing_is_left_to_recover(crashed_campaign):
    database, campaign_id, _, _, _, project = crashed_campaign
    doctor = run(project, "fff", "doctor", campaign_id)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert f"invariants  {campaign_id}: every one holds" in doctor.stdout
    recovered = run(project, *RECOVER)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert recovered.stdout.splitlines()[-1] == "nothing left to repair"
    statuses = {trajectory["status"] for trajectory in database.trajectories.find({})}
    assert "sampling" not in statuses
