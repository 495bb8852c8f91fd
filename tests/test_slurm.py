"""The tiny campaign run entirely through `qlaunch rapidfire` on a real one-node Slurm cluster.

GPU and CPU workers are Slurm jobs that `qlaunch` submits with the two Slurm
adapters as `fff init --slurm` writes them for this node (partition, account, one
CPU, wall time, the GPU request). The first audit stores its reference result
and then hangs past its one-minute wall time, before it adds the trajectory's next
segment: Slurm kills it, `fff recover` re-runs it once its pings have stopped, and
the campaign still completes, with its budget spent exactly and nothing computed
twice. Without Slurm (or root) the
tests are skipped, saying why (tests/slurm_cluster.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pymongo
import pytest
import yaml

from project import REPO, TESTS, project_environment, run, use_server
from slurm_cluster import SlurmUnavailableError, terminate

pytestmark = pytest.mark.slow

BUDGET = 8
CAMPAIGN_SECONDS = 420
# Fast pings and short sleeps: a lost job is found within seconds, workers react at once.
FIREWORKS_SETTINGS = {
    "PING_TIME_SECS": 2,
    "RUN_EXPIRATION_SECS": 8,
    "RAPIDFIRE_SLEEP_SECS": 2,
    "QUEUE_UPDATE_INTERVAL": 1,
}
ADAPTERS = {
    "gpu": ("fw_config/my_qadapter_slurm.yaml", "00:05:00", ["--gres", "gpu:1"], "1"),
    "cpu": ("fw_config/my_qadapter_slurm_cpu.yaml", "00:01:00", [], "2"),
}
ACCOUNT = "fff-test"
# The job kind that hangs until Slurm kills it (tests/crash/): early, so that the rest overlaps.
STALLED = "audit"


def prepare_project(project: Path, uri: str) -> str:
    """A project on the test server with Slurm adapters for this node; the campaign's id."""
    shutil.copytree(REPO / "fw_config", project / "fw_config")
    shutil.copy(REPO / "my_launchpad.yaml", project)
    use_server(project, uri)
    fw_config = project / "fw_config/FW_config.yaml"
    fw_config.write_text(yaml.safe_dump(yaml.safe_load(fw_config.read_text()) | FIREWORKS_SETTINGS))
    for worker, (_, walltime, request, _) in ADAPTERS.items():
        written = run(project, "fff", "init", "--slurm", worker, "--cpus-per-task", "1",
                      "--walltime", walltime, "--partition", worker, "--account", ACCOUNT,
                      *request, "--force")  # fmt: skip
        assert written.returncode == 0, written.stderr
    spec = yaml.safe_load((TESTS / "specs/tiny_water.yaml").read_text())
    spec.update(num_to_run=BUDGET, retrain_freq=BUDGET)
    # Segments run their whole length, so two of them pool the frames of a selection before
    # audits spend this small budget: every kind of job runs, whatever the tiny models predict.
    spec["md"]["uncertainty_threshold"] = None
    (project / "tiny.yaml").write_text(yaml.safe_dump(spec))
    submitted = run(project, "fff", "submit", "tiny.yaml")
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.split()[-1]


def start_qlaunch(project: Path, worker: str, environment: dict[str, str]) -> subprocess.Popen:
    adapter, _, _, max_jobs = ADAPTERS[worker]
    command = ["qlaunch", "-q", adapter, "rapidfire", "--nlaunches", "infinite",
               "-m", max_jobs, "--sleep", "2"]  # fmt: skip
    with (project / f"qlaunch_{worker}.log").open("w") as log:
        return subprocess.Popen(
            command,
            cwd=project,
            env=project_environment(project, **environment),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def complete(database, campaign_id: str) -> bool:
    campaign = database.campaigns.find_one({"_id": campaign_id}, {"status": 1})
    unfinished = database.fireworks.count_documents({"state": {"$ne": "COMPLETED"}})
    return campaign["status"] == "complete" and unfinished == 0


def drive(project: Path, database, campaign_id: str, cluster, launchers) -> str:
    """Wait for the campaign to complete; recover, as a user would, once a job timed out."""
    deadline = time.monotonic() + CAMPAIGN_SECONDS
    recovered = None
    while time.monotonic() < deadline:
        cluster.check()
        for launcher in launchers:
            assert launcher.poll() is None, f"qlaunch exited: {launcher.args}"
        if complete(database, campaign_id):
            return recovered or ""
        timed_out = [job for job in cluster.finished_jobs().values() if job["state"] == "TIMEOUT"]
        if recovered is None and timed_out:
            time.sleep(FIREWORKS_SETTINGS["RUN_EXPIRATION_SECS"] + 2)
            recovery = run(project, "fff", "recover")
            assert recovery.returncode == 0, recovery.stderr
            recovered = recovery.stdout
        time.sleep(2)
    status = run(project, "fff", "status", campaign_id)
    raise AssertionError(f"campaign not complete after {CAMPAIGN_SECONDS} s:\n{status.stdout}")


@pytest.fixture(scope="module")
def slurm_campaign(tmp_path_factory, mongo_uri: str, slurm_cluster):
    """The tiny campaign run to completion by qlaunch through one wall-time kill."""
    project = tmp_path_factory.mktemp("slurm_project")
    name = f"fff_{uuid.uuid4().hex[:8]}"
    campaign_id = prepare_project(project, f"{mongo_uri}/{name}")
    database = pymongo.MongoClient(mongo_uri)[name]
    marks = project / "stalls"
    marks.mkdir()
    environment = {
        **slurm_cluster.environment(),
        "PYTHONPATH": f"{TESTS / 'crash'}:{TESTS}",
        "FFF_TEST_STALL_AT": STALLED,
        "FFF_TEST_KILL_MARKS": str(marks),
    }
    launchers = [start_qlaunch(project, worker, environment) for worker in ADAPTERS]
    try:
        recovery = drive(project, database, campaign_id, slurm_cluster, launchers)
    except SlurmUnavailableError as reason:
        pytest.skip(f"the Slurm cluster stopped: {reason}")
    finally:
        for launcher in launchers:
            terminate(launcher)
        assert slurm_cluster.cancel_jobs(), "Slurm jobs still queued 30 s after scancel"
    jobs = slurm_cluster.finished_jobs()
    return project, database, campaign_id, recovery, jobs, marks


def slurm_job_of(launch: dict) -> str:
    """The Slurm job id a rocket ran in: its launch directory lies in the job's directory."""
    (output,) = Path(launch["launch_dir"]).parent.glob("fff_*-*.out")
    return re.fullmatch(r"fff_(?:gpu|cpu)-(\d+)\.out", output.name).group(1)


def test_every_job_ran_in_a_slurm_job_of_its_worker(slurm_campaign):
    _, database, _, _, jobs, _ = slurm_campaign
    projection = {"fw_id": 1, "name": 1, "spec._category": 1}
    fireworks = {fw["fw_id"]: fw for fw in database.fireworks.find({}, projection)}
    launches = list(database.launches.find({}))
    assert {launch["fw_id"] for launch in launches} == set(fireworks)
    kinds = {firework["name"].split()[1] for firework in fireworks.values()}
    assert kinds == {"ingest", "train", "segment", "audit", "select", "calculate"}
    for launch in launches:
        job = jobs[slurm_job_of(launch)]
        category = fireworks[launch["fw_id"]]["spec"]["_category"]
        assert (job["name"], job["partition"]) == (f"fff_{category}", category)
        assert launch["fworker"]["category"] == category
    workers = {job["name"] for job in jobs.values()}
    assert workers == {"fff_gpu", "fff_cpu"}


def test_the_slurm_jobs_asked_for_what_fff_init_set(slurm_campaign):
    project, _, _, _, _, _ = slurm_campaign
    scripts = {path.read_text() for path in project.glob("block_*/launcher_*/FW_submit.script")}
    gpu = [script for script in scripts if "--job-name=fff_gpu" in script]
    cpu = [script for script in scripts if "--job-name=fff_cpu" in script]
    assert gpu and cpu and len(gpu) + len(cpu) == len(scripts)
    for script in gpu:
        for line in ("--gres=gpu:1", "--time=00:05:00", "--partition=gpu", "--cpus-per-task=1"):
            assert f"#SBATCH {line}\n" in script
    for script in cpu:
        assert "#SBATCH --time=00:01:00\n" in script and "--gres" not in script
        assert f"#SBATCH --account={ACCOUNT}\n" in script


def test_no_firework_is_left_running_or_reserved(slurm_campaign):
    _, database, _, _, _, _ = slurm_campaign
    states = {firework["state"] for firework in database.fireworks.find({}, {"state": 1})}
    assert states == {"COMPLETED"}
    assert {w["state"] for w in database.workflows.find({}, {"state": 1})} == {"COMPLETED"}


def test_the_budget_is_spent_exactly(slurm_campaign):
    _, database, campaign_id, _, _, _ = slurm_campaign
    campaign = database.campaigns.find_one({"_id": campaign_id})
    assert (campaign["status"], campaign["stop_reason"]) == ("complete", "reference budget spent")
    budgeted = database.reference_results.count_documents({"source": {"$ne": "initial"}})
    assert budgeted == BUDGET == campaign["budget"]["spent"]


def test_the_job_killed_at_its_wall_time_was_recovered_and_nothing_computed_twice(slurm_campaign):
    _, database, _, recovery, jobs, marks = slurm_campaign
    assert [mark.name for mark in marks.iterdir()] == [STALLED]
    assert "re-ran 1 lost job(s)" in recovery
    timed_out = {job_id for job_id, job in jobs.items() if job["state"] == "TIMEOUT"}
    (killed,) = database.fireworks.find({"archived_launches": {"$ne": []}})
    assert killed["name"].split()[1] == STALLED and killed["state"] == "COMPLETED"
    (lost,) = database.launches.find({"fw_id": killed["fw_id"], "state": "FIZZLED"})
    assert slurm_job_of(lost) in timed_out
    results = list(database.reference_results.find({}))
    assert len({result["_id"] for result in results}) == len(results)
    frames = [result["frame_id"] for result in results if result["source"] == "active"]
    assert len(frames) == len(set(frames))
    audited = [(r["trajectory_id"], r["segment"]) for r in results if r["source"] == "audit"]
    assert len(audited) == len(set(audited))
