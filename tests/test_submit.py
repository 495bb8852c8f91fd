"""Submitting: the spec and structures are checked and stored once, so jobs never read the
user's files; a workflow file started with `lpad add` runs the same campaign as `fff submit`."""

from __future__ import annotations

import shutil
from pathlib import Path

import ase.io
import numpy as np
import pytest
import yaml

from fff_jobs.spec import WaterClusterSettings
from fff_jobs.structures import rattled, water_cluster

from project import REPO, TESTS, run, stored_database

pytestmark = pytest.mark.slow

BUDGET = 6


def user_project(directory: Path) -> Path:
    """A project on the embedded store, with a spec that names structure files of its own."""
    shutil.copytree(REPO / "fw_config", directory / "fw_config")
    shutil.copy(REPO / "my_launchpad.yaml", directory)
    rng = np.random.default_rng(7)
    starts = [water_cluster(size, WaterClusterSettings(), rng) for size in (2, 3)]
    ase.io.write(directory / "starts.extxyz", starts)
    initial = [copy for atoms in starts for copy in rattled(atoms, 4, 0.05, rng)]
    ase.io.write(directory / "initial.extxyz", initial)
    spec = yaml.safe_load((TESTS / "specs/tiny_water.yaml").read_text())
    spec["system"] = {"starting_structures": "starts.extxyz", "initial_data": "initial.extxyz"}
    spec.update(num_to_run=BUDGET, retrain_freq=3)
    (directory / "spec.yaml").write_text(yaml.safe_dump(spec))
    return directory


def delete_structure_files(project: Path) -> None:
    for name in ("starts.extxyz", "initial.extxyz"):
        (project / name).unlink()


def run_workers(project: Path) -> None:
    worker = run(project, "rlaunch", "rapidfire", "--sleep", "1", timeout=900)
    assert worker.returncode == 0, worker.stderr[-3000:]


def assert_complete(project: Path, campaign_id: str) -> dict[str, list[dict]]:
    """The campaign completed with its budget spent exactly; the stored database."""
    stored = stored_database(project)
    (campaign,) = stored["campaigns"]
    assert (campaign["_id"], campaign["status"]) == (campaign_id, "complete")
    assert campaign["stop_reason"] == "reference budget spent"
    budgeted = [r for r in stored["reference_results"] if r["source"] != "initial"]
    assert len(budgeted) == BUDGET == campaign["budget"]["spent"]
    initial = [r for r in stored["reference_results"] if r["source"] == "initial"]
    assert len(initial) == 8 and len({r["_id"] for r in initial}) == 8
    assert {fw["state"] for fw in stored["fireworks"]} == {"COMPLETED"}
    assert len(stored["starting_structures"]) == 2 and len(stored["initial_data"]) == 8
    return stored


def test_a_campaign_completes_after_its_structure_files_are_deleted(tmp_path):
    project = user_project(tmp_path)
    submitted = run(project, "fff", "submit", "spec.yaml")
    assert submitted.returncode == 0, submitted.stderr
    campaign_id = submitted.stdout.split()[-1]
    delete_structure_files(project)
    run_workers(project)
    assert_complete(project, campaign_id)


def test_lpad_add_of_a_workflow_file_starts_the_same_campaign_once(tmp_path):
    project = user_project(tmp_path)
    written = run(project, "fff", "submit", "spec.yaml", "--to-file", "wf.yaml")
    assert written.returncode == 0, written.stderr
    campaign_id = written.stdout.split()[-1]
    assert f"`lpad add wf.yaml` starts campaign {campaign_id}" in written.stderr
    assert not (project / ".fff/fireworks.json").exists()  # nothing stored yet
    delete_structure_files(project)  # the file carries the structures
    listed = run(project, "fff", "status")  # a new database: any fff command initialises it
    assert "no campaigns yet" in listed.stdout
    for _ in range(2):  # added twice by mistake: still one campaign, computed once
        added = run(project, "lpad", "add", "wf.yaml")
        assert added.returncode == 0, added.stderr
    run_workers(project)
    stored = assert_complete(project, campaign_id)
    names = [fw["name"] for fw in stored["fireworks"]]
    assert names.count(f"{campaign_id} ingest") == 2
    others = [name for name in names if not name.endswith(" ingest")]
    assert len(others) == len(set(others))
    assert {name.split()[1] for name in others} >= {"train", "segment", "audit"}
