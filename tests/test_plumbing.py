"""A workflow that grows at run time reaches the right workers and keeps its results."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pymongo
import pytest
import yaml
from montydb import MontyClient

from project import lpad_fireworks, project_environment, run, submit_script, use_server

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-Pa55word-for-tests"


def lpad_full(directory: Path) -> list[dict]:
    result = run(directory, "lpad", "get_fws", "-d", "all")
    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout)
    return reported if isinstance(reported, list) else [reported]


def outputs_collection(directory: Path):
    """The job store's `outputs` collection, opened with a plain (pymongo-style) client."""
    settings = yaml.safe_load((directory / "fw_config/jobflow.yaml").read_text())
    docs_store = settings["JOB_STORE"]["docs_store"]
    if docs_store["@class"] == "MongoStore":
        client = pymongo.MongoClient(docs_store["uri"])
        return client[docs_store["database"]][docs_store["collection_name"]]
    return MontyClient(str(directory / ".fff/jobstore"))["fff"]["outputs"]


@pytest.fixture(params=["embedded", "server"])
def project(request, workdir: Path) -> Path:
    """A project on the embedded store (with credentials set) or on the live test server."""
    if request.param == "server":
        use_server(workdir, f"{request.getfixturevalue('mongo_uri')}/fff_{uuid.uuid4().hex[:8]}")
    else:
        launchpad = workdir / "my_launchpad.yaml"
        settings = yaml.safe_load(launchpad.read_text())
        settings.update(username="fff_user", password=PASSWORD, authsource="admin")
        launchpad.write_text(yaml.safe_dump(settings))
    return workdir


def test_gpu_job_with_cpu_detour_and_gpu_addition_runs_on_the_right_workers(project: Path):
    submitted = run(project, "fff", "demo", "--no-run")
    assert submitted.returncode == 0, submitted.stderr

    gpu = run(project, "rlaunch", "-w", "fw_config/my_fworker_gpu.yaml", "rapidfire")
    assert gpu.returncode == 0, gpu.stderr
    after_gpu = {fw["name"]: fw["state"] for fw in lpad_fireworks(project)}
    assert after_gpu == {
        "draw_samples": "COMPLETED",
        "fit_samples": "COMPLETED",
        "audit_samples": "READY",
        "summarize": "WAITING",
    }

    cpu = run(project, "rlaunch", "-w", "fw_config/my_fworker_cpu.yaml", "rapidfire")
    assert cpu.returncode == 0, cpu.stderr

    fireworks = lpad_full(project)
    assert len(fireworks) == 4
    for firework in fireworks:
        assert firework["state"] == "COMPLETED", firework["name"]
        (launch,) = firework["launches"]
        assert launch["fworker"]["category"] == firework["spec"]["_category"], firework["name"]
    categories = {fw["name"]: fw["spec"]["_category"] for fw in fireworks}
    assert categories == {
        "draw_samples": "gpu",
        "audit_samples": "cpu",
        "fit_samples": "gpu",
        "summarize": "cpu",
    }

    outputs = {doc["name"]: doc["output"] for doc in outputs_collection(project).find({})}
    samples = outputs["draw_samples"]["samples"]
    assert outputs["summarize"]["total"] == pytest.approx(sum(samples))
    assert outputs["fit_samples"]["mean"] == pytest.approx(sum(samples) / len(samples))
    assert outputs["audit_samples"]["checked"] == len(samples)

    embedded_file = project / ".fff/fireworks.json"
    stored = json.dumps(fireworks) + (embedded_file.read_text() if embedded_file.exists() else "")
    for firework in fireworks:
        for task in firework["spec"]["_tasks"]:
            assert task["store"] is None
    assert PASSWORD not in stored
    assert PASSWORD not in gpu.stdout + gpu.stderr + cpu.stdout + cpu.stderr


def test_a_growing_chain_fills_workflows_of_at_most_the_limit_and_runs_once(project: Path):
    (project / "submit.py").write_text(submit_script("plumbing_jobs:chain_flow"))
    submitted = run(project, "python", "submit.py", "25")
    assert submitted.returncode == 0, submitted.stderr
    worker = run(project, "rlaunch", "rapidfire")
    assert worker.returncode == 0, worker.stderr
    fireworks = lpad_full(project)
    assert len(fireworks) == 25 and {fw["state"] for fw in fireworks} == {"COMPLETED"}
    listed = run(project, "lpad", "get_wflows", "-n", "chain", "-d", "more")
    workflows = json.loads(listed.stdout)
    assert len(workflows) == 3 and {workflow["state"] for workflow in workflows} == {"COMPLETED"}
    sizes = sorted(len(workflow["states"]) for workflow in workflows)
    assert sizes == [5, 10, 10]
    executed = run(project, "python", "-c", EXECUTED_INDICES)
    assert executed.stdout.split() == [str(index) for index in range(25)]


EXECUTED_INDICES = (
    "from fff_jobs.config import activate, project_database; activate(); "
    "print(*sorted(doc['index'] for doc in project_database().executions.find({})))"
)


def test_concurrent_gpu_and_cpu_workers_run_every_firework_once(workdir: Path, mongo_uri: str):
    database = f"fff_{uuid.uuid4().hex[:8]}"
    use_server(workdir, f"{mongo_uri}/{database}")
    (workdir / "submit.py").write_text(submit_script("plumbing_jobs:mixed_flow"))
    submitted = run(workdir, "python", "submit.py", "15")
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.splitlines()[-1] == "45"

    # Long-lived workers, as on a cluster: a plain `rapidfire` worker exits as soon as
    # none of its own jobs is ready or running, although others' jobs may unlock more.
    command = ["rapidfire", "--nlaunches", "infinite", "--sleep", "1"]
    workers = [
        subprocess.Popen(
            ["rlaunch", "-w", f"fw_config/my_fworker_{category}.yaml", *command],
            cwd=workdir,
            env=project_environment(workdir, FFF_TEST_WORKER=category),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for category in ("gpu", "cpu")
    ]
    client = pymongo.MongoClient(mongo_uri)
    unfinished = {"state": {"$ne": "COMPLETED"}}
    deadline = time.monotonic() + 240
    try:
        while client[database].fireworks.count_documents(unfinished) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.5)
    finally:
        for worker in workers:
            worker.kill()

    fireworks = list(client[database].fireworks.find({}))
    assert len(fireworks) == 45
    assert {fw["state"] for fw in fireworks} == {"COMPLETED"}
    executions = list(client[database].executions.find({}))
    ran = sorted(execution["index"] for execution in executions)
    assert ran == sorted([*range(15), *range(1000, 1015), *range(2000, 2015)])
    for execution in executions:
        expected = "gpu" if execution["index"] < 1000 else "cpu"
        assert execution["worker"] == expected, execution
