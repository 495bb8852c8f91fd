"""A campaign left stuck: `fff doctor ID` names what is stuck, `fff recover` moves it again.

A submitted campaign (its ingest job waiting) on the live test server is given, by
hand, what dead workers leave when a job dies between its claim and handing over the
job that follows: a sampling trajectory and a running training round that no job
moves. Then the campaign finishes with a trajectory still sampling and a job that
failed, which only the user can rerun.
"""

from __future__ import annotations

import pymongo
import pytest

from project import TESTS, run, server_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stuck(tmp_path_factory, mongo_uri: str):
    project = tmp_path_factory.mktemp("stuck")
    name = server_project(project, mongo_uri)
    submitted = run(project, "fff", "submit", str(TESTS / "specs/tiny_water.yaml"))
    assert submitted.returncode == 0, submitted.stderr
    campaign_id = submitted.stdout.split()[-1]
    database = pymongo.MongoClient(mongo_uri)[name]
    database.trajectories.insert_one(
        {"_id": f"{campaign_id}-t000", "campaign_id": campaign_id, "index": 0,
         "status": "sampling", "segments_completed": 3, "audits_completed": 2}
    )  # fmt: skip
    training = {"training.running": True, "training.generation": 1, "training.owner": "gone"}
    database.campaigns.update_one({"_id": campaign_id}, {"$set": training})
    return project, database, campaign_id


def test_doctor_names_what_no_job_moves(stuck):
    project, _, campaign_id = stuck
    doctor = run(project, "fff", "doctor", campaign_id)
    assert doctor.returncode == 1
    broken = [line for line in doctor.stdout.splitlines() if line.startswith("broken")]
    assert broken == [
        f"broken      {campaign_id}: trajectory {campaign_id}-t000 is sampling with no job to "
        "move it",
        f"broken      {campaign_id}: training round 1 has no job",
    ]
    assert "work        cpu: 1 READY\n" in doctor.stdout  # counted by category on any server


def test_recover_adds_the_jobs_that_move_them(stuck):
    project, database, campaign_id = stuck
    recovered = run(project, "fff", "recover", "--expire", "0")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    added = [
        f"{campaign_id} audit t000 s2",
        f"{campaign_id} train g1 m0",
        f"{campaign_id} train g1 m1",
    ]
    assert f"{campaign_id}: added {', '.join(added)}" in recovered.stdout
    jobs = {fw["name"]: fw for fw in database.fireworks.find({"name": {"$in": added}})}
    assert {name: jobs[name]["spec"]["_category"] for name in added} == dict(
        zip(added, ["cpu", "gpu", "gpu"], strict=True)
    )
    assert database.workflows.count_documents({"nodes": jobs[added[0]]["fw_id"]}) == 1
    assert recovered.stdout.splitlines()[-1] == "nothing left to repair"


def test_a_failed_job_is_left_to_the_user_and_a_finished_campaign_stops_sampling(stuck):
    project, database, campaign_id = stuck
    ingest = database.fireworks.find_one({"name": f"{campaign_id} ingest"})
    database.fireworks.update_one({"_id": ingest["_id"]}, {"$set": {"state": "FIZZLED"}})
    database.workflows.update_one(
        {"nodes": ingest["fw_id"]}, {"$set": {f"fw_states.{ingest['fw_id']}": "FIZZLED"}}
    )
    database.campaigns.update_one({"_id": campaign_id}, {"$set": {"status": "complete"}})
    recovered = run(project, "fff", "recover", "--expire", "0")
    assert recovered.returncode == 1
    assert f"{campaign_id}: finished; stopped 1 trajectory(ies)" in recovered.stdout
    assert database.trajectories.find_one({"_id": f"{campaign_id}-t000"})["status"] == "stopped"
    assert recovered.stderr.splitlines() == [
        "left to repair:",
        f"  {campaign_id}: 1 failed job(s): see `lpad get_fws -s FIZZLED -d more`, fix the "
        f"cause, then `lpad rerun_fws -i {ingest['fw_id']}`",
    ]
