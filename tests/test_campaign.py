"""A tiny campaign run by real rlaunch workers on the embedded store, checked as a user would."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import ase.io
import pytest
import yaml

from project import REPO, TESTS, run, stored_database

pytestmark = pytest.mark.slow

SPEC = REPO / "tests/specs/tiny_water.yaml"
MAX_CYCLES = 30
HEAVY_MODULES = "cpu-worker-modules.txt"  # what CPU workers loaded (tests/imports/)


def campaign_document(project: Path, campaign_id: str) -> dict:
    (document,) = [c for c in stored_database(project)["campaigns"] if c["_id"] == campaign_id]
    return document


def run_workers_until_complete(project: Path, campaign_id: str) -> int:
    """Alternate a CPU and a GPU worker (one process at a time) until every job is done."""
    heavy = {"PYTHONPATH": f"{TESTS / 'imports'}:{TESTS}"}
    heavy["FFF_TEST_HEAVY_MODULES"] = str(project / HEAVY_MODULES)
    for cycle in range(1, MAX_CYCLES + 1):
        for category in ("cpu", "gpu"):
            worker = run(
                project, "rlaunch", "-w", f"fw_config/my_fworker_{category}.yaml", "rapidfire",
                "--sleep", "1", timeout=600, **(heavy if category == "cpu" else {}),
            )  # fmt: skip
            assert worker.returncode == 0, worker.stderr[-3000:]
        states = {fw["state"] for fw in stored_database(project)["fireworks"]}
        if campaign_document(project, campaign_id)["status"] == "complete" and states == {
            "COMPLETED"
        }:
            return cycle
    raise AssertionError(f"campaign not complete after {MAX_CYCLES} worker cycles")


@pytest.fixture(scope="module")
def finished_campaign(tmp_path_factory) -> tuple[Path, str]:
    """A project in which the tiny campaign was submitted with `fff submit` and run to the end."""
    project = tmp_path_factory.mktemp("campaign")
    shutil.copytree(REPO / "fw_config", project / "fw_config")
    shutil.copy(REPO / "my_launchpad.yaml", project)
    shutil.copy(SPEC, project / "tiny.yaml")
    submitted = run(project, "fff", "submit", "tiny.yaml")
    assert submitted.returncode == 0, submitted.stderr
    campaign_id = submitted.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"tiny_water-[0-9a-f]{6}", campaign_id)
    run_workers_until_complete(project, campaign_id)
    return project, campaign_id


def lpad_fireworks(project: Path) -> list[dict]:
    result = run(project, "lpad", "get_fws", "-d", "all")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_campaign_spends_its_budget_exactly_and_trains_several_generations(finished_campaign):
    project, campaign_id = finished_campaign
    stored = stored_database(project)
    campaign = campaign_document(project, campaign_id)
    assert campaign["stop_reason"] == "reference budget spent"
    results = [r for r in stored["reference_results"] if r["campaign_id"] == campaign_id]
    budgeted = [r for r in results if r["source"] != "initial"]
    assert len(budgeted) == 20 == campaign["budget"]["spent"]
    assert len({r["_id"] for r in budgeted}) == 20
    assert {r["source"] for r in budgeted} == {"audit", "active"}
    generations = sorted({m["generation"] for m in stored["models"]})
    assert len(generations) >= 2
    assert generations == list(range(len(generations)))
    assert [g["generation"] for g in campaign["generations"]] == generations
    assert len(stored["models"]) == 2 * len(generations)
    # the last generation trained on every result the campaign paid for
    last = max(stored["models"], key=lambda m: m["generation"])
    assert last["training_set_size"] == sum(r["success"] for r in results)


def test_each_generation_trains_on_one_snapshot_and_reports_out_of_sample_errors(
    finished_campaign,
):
    project, campaign_id = finished_campaign
    stored = stored_database(project)
    snapshots = {s["generation"]: s["result_ids"] for s in stored["training_snapshots"]}
    assert sorted(snapshots) == sorted({m["generation"] for m in stored["models"]})
    final = {s["generation"] for s in stored["training_snapshots"] if s["final"]}
    assert max(snapshots) in final and 0 not in final  # the delivered committee trains longest
    for model in stored["models"]:
        assert model["training_set_size"] == len(snapshots[model["generation"]])
        assert not model["diverged"] and model["attempts"] >= 1
        assert model["loss"] == ("mse" if model["generation"] in final else "huber")
        # the delivered generation holds no frame out: it trains on every result
        assert (model["validation_set_size"] == 0) == (model["generation"] in final)
    for generation in campaign_document(project, campaign_id)["generations"]:
        assert generation["healthy_members"] == 2
        if generation["generation"] in final:
            assert generation["validation_frames"] == 0
            assert math.isnan(generation["validation_force_mae"])
            continue
        assert 0 < generation["validation_frames"] <= generation["training_set_size"]
        assert 0 < generation["validation_force_mae"] <= generation["validation_force_rmse"]
    status = run(project, "fff", "status", campaign_id)
    assert "none: every result trained this generation" in status.stdout


def test_trajectories_run_on_every_size_at_the_ladder_temperatures(finished_campaign):
    project, _ = finished_campaign
    trajectories = stored_database(project)["trajectories"]
    assert sorted(t["temperature"] for t in trajectories) == [300.0, 500.0]
    assert sorted(len(t["start_frame"]["numbers"]) for t in trajectories) == [6, 9]


def test_computed_frames_keep_their_predicted_uncertainty_beside_their_error(finished_campaign):
    project, campaign_id = finished_campaign
    results = stored_database(project)["reference_results"]
    budgeted = [r for r in results if r["source"] != "initial" and r["success"]]
    calibrated = [r for r in budgeted if "calibration" in r]
    active = [r for r in budgeted if r["source"] == "active"]
    assert active and all("calibration" in r for r in active)
    assert len(calibrated) > len(active)  # audits too: the committee predicted their frame
    for result in calibrated:
        record = result["calibration"]
        assert record["force_deviation"] >= 0 and record["force_error"] > 0
        assert record["generation"] <= result["generation"] + 1
    status = run(project, "fff", "status", campaign_id)
    assert f"{len(calibrated)} frames, rank correlation" in status.stdout


def test_every_job_completed_on_a_worker_of_its_category(finished_campaign):
    project, _ = finished_campaign
    fireworks = lpad_fireworks(project)
    assert {fw["state"] for fw in fireworks} == {"COMPLETED"}
    kinds = {"train": "gpu", "segment": "gpu", "select": "gpu", "audit": "cpu",
             "calculate": "cpu", "ingest": "cpu"}  # fmt: skip
    seen = set()
    for firework in fireworks:
        kind = firework["name"].split()[1]
        seen.add(kind)
        assert firework["spec"]["_category"] == kinds[kind], firework["name"]
        for launch in firework["launches"]:
            assert launch["fworker"]["category"] == kinds[kind], firework["name"]
    assert seen == set(kinds)


def test_cpu_workers_load_neither_torch_nor_mace(finished_campaign):
    project, _ = finished_campaign
    loaded = (project / HEAVY_MODULES).read_text().splitlines()
    assert loaded and all(line.endswith(": none") for line in loaded), loaded


def test_the_campaign_spreads_over_small_workflows_of_its_name(finished_campaign):
    project, campaign_id = finished_campaign
    stored = stored_database(project)
    workflows = stored["workflows"]
    assert len(workflows) >= 3
    assert {workflow["name"] for workflow in workflows} == {f"fff campaign {campaign_id}"}
    assert {workflow["state"] for workflow in workflows} == {"COMPLETED"}
    assert max(len(workflow["nodes"]) for workflow in workflows) <= 10
    nodes = [fw_id for workflow in workflows for fw_id in workflow["nodes"]]
    assert sorted(nodes) == sorted(fw["fw_id"] for fw in stored["fireworks"])


def test_every_training_record_has_provenance(finished_campaign):
    project, campaign_id = finished_campaign
    for result in stored_database(project)["reference_results"]:
        assert result["campaign_id"] == campaign_id
        assert result["code"] == "xtb" and result["host"] and result["wall_time"] > 0
        if result["source"] == "audit":
            assert result["trajectory_id"].startswith(f"{campaign_id}-t")
            assert result["segment"] >= 0 and result["generation"] >= 0
            assert result["audit"]["action"] in ("continue", "restart")
        if result["source"] == "active":
            assert result["selection_id"].startswith(f"{campaign_id}-sel")
            assert result["frame_id"].startswith(result["trajectory_id"])
            assert result["generation"] >= 0


def test_status_report_and_export_work_on_the_finished_campaign(finished_campaign, tmp_path):
    project, campaign_id = finished_campaign
    status = run(project, "fff", "status", campaign_id)
    assert status.returncode == 0, status.stderr
    assert "20 / 20" in status.stdout and "complete" in status.stdout
    assert "live trajectories      │ 0 " in status.stdout
    assert "invariants             │ all hold" in status.stdout
    assert "jobs (cpu)" in status.stdout and "jobs (gpu)" in status.stdout

    report = run(project, "fff", "report", campaign_id, "--output", str(tmp_path))
    assert report.returncode == 0, report.stderr
    with (tmp_path / f"{campaign_id}-learning-curve.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["kind"] for row in rows].count("generation") >= 2
    assert (tmp_path / f"{campaign_id}-learning-curve.png").stat().st_size > 1000
    with (tmp_path / f"{campaign_id}-calibration.csv").open() as handle:
        calibration = list(csv.DictReader(handle))
    assert calibration and float(calibration[0]["force_error"]) > 0
    assert (tmp_path / f"{campaign_id}-calibration.png").stat().st_size > 1000

    export = run(project, "fff", "export", campaign_id, "--output", str(tmp_path))
    assert export.returncode == 0, export.stderr
    frames = ase.io.read(tmp_path / f"{campaign_id}-training-set.extxyz", index=":")
    successful = [r for r in stored_database(project)["reference_results"] if r["success"]]
    assert len(frames) == len(successful)
    assert {frame.info["source"] for frame in frames} == {"initial", "audit", "active"}
    assert all(frame.get_forces().shape == (len(frame), 3) for frame in frames)


def test_unknown_campaign_gets_one_clear_line(finished_campaign):
    project, _ = finished_campaign
    result = run(project, "fff", "status", "no-such-campaign")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: no campaign 'no-such-campaign' in this database: `fff status` lists the campaigns"
    )


def readme_queries() -> str:
    """The README's pymongo queries, without the two lines that say where to connect."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- queries -->")[1].split("```python")[1].split("```")[0]
    skipped = ("database = ", "campaign_id = ", "import pymongo")
    return "\n".join(line for line in block.splitlines() if not line.startswith(skipped))


def as_mongo_database(project: Path):
    """The embedded store's file, loaded into an in-memory database with pymongo's API."""
    import mongomock

    database = mongomock.MongoClient()["fff"]
    for name, documents in stored_database(project).items():
        if documents:
            database[name].insert_many(documents)
    return database


def test_readme_queries_answer_what_they_promise(finished_campaign):
    project, campaign_id = finished_campaign
    namespace = {"database": as_mongo_database(project), "campaign_id": campaign_id}
    exec(readme_queries(), namespace)
    stored = stored_database(project)
    successful = [r for r in stored["reference_results"] if r["success"]]
    assert len(namespace["training_set"]) == len(successful)
    assert [m["member"] for m in namespace["committee"]] == [0, 1]
    last = max(m["generation"] for m in stored["models"])
    assert {m["generation"] for m in namespace["committee"]} == {last}
    assert len(namespace["failed"]) == sum(not r["success"] for r in stored["reference_results"])
    audits = namespace["audits"]
    assert audits and [a["segment"] for a in audits] == sorted(a["segment"] for a in audits)
    assert all(a["trajectory_id"] == f"{campaign_id}-t000" for a in audits)
    assert [row[0] for row in namespace["errors"]] == list(range(last + 1))


def test_pooled_frames_are_stamped_before_their_segment_is_audited(finished_campaign):
    """The benchmark's random ML-MD pool at budget B is what was stored by the B-th result."""
    stored = stored_database(finished_campaign[0])
    audited = {
        (r["trajectory_id"], r["segment"]): r["stored_at"]
        for r in stored["reference_results"]
        if r["source"] == "audit"
    }
    frames = [f for f in stored["frame_pool"] if (f["trajectory_id"], f["segment"]) in audited]
    assert frames
    for frame in frames:
        assert frame["stored_at"] <= audited[frame["trajectory_id"], frame["segment"]]


def test_rerunning_a_finished_selection_and_audit_duplicates_nothing(finished_campaign):
    project, campaign_id = finished_campaign
    before = stored_database(project)
    names = {fw["name"]: fw["fw_id"] for fw in lpad_fireworks(project)}
    targets = [names[f"{campaign_id} select 0"], names[f"{campaign_id} audit t000 s0"]]
    rerun = run(project, "lpad", "rerun_fws", "-i", ",".join(map(str, targets)))
    assert rerun.returncode == 0, rerun.stderr
    assert {fw["state"] for fw in lpad_fireworks(project)} != {"COMPLETED"}
    run_workers_until_complete(project, campaign_id)
    after = stored_database(project)
    fireworks = lpad_fireworks(project)
    assert {fw["state"] for fw in fireworks} == {"COMPLETED"}
    assert len(fireworks) == len(names)
    for collection in ("reference_results", "selections", "models", "frame_pool"):
        assert sorted(d["_id"] for d in after[collection]) == sorted(
            d["_id"] for d in before[collection]
        ), collection
    assert campaign_document(project, campaign_id)["budget"]["spent"] == 20


def test_fff_run_is_the_quick_start_on_the_embedded_store(tmp_path: Path):
    shutil.copytree(REPO / "fw_config", tmp_path / "fw_config")
    shutil.copy(REPO / "my_launchpad.yaml", tmp_path)
    spec = yaml.safe_load(SPEC.read_text()) | {"num_to_run": 8, "retrain_freq": 4}
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(spec))
    result = run(tmp_path, "fff", "run", "quick.yaml", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embedded store: this process holds the whole database" in result.stderr
    campaign_id = re.search(r"campaign (tiny_water-[0-9a-f]{6}) \(job output", result.stdout)[1]
    assert "complete (reference budget spent)" in result.stdout
    assert "8 / 8" in result.stdout
    campaign = campaign_document(tmp_path, campaign_id)
    assert (campaign["status"], campaign["budget"]["spent"]) == ("complete", 8)
    assert {fw["state"] for fw in stored_database(tmp_path)["fireworks"]} == {"COMPLETED"}
    assert "Rocket finished" in (tmp_path / f".fff/launches/{campaign_id}.log").read_text()
