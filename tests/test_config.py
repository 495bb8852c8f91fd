"""`fff init` and `fff doctor`: configuration written safely, bad configuration named in a line."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from fff_jobs.config import redact
from fff_jobs.project_files import embedded_files

from project import REPO, run

UNREACHABLE = "mongodb://127.0.0.1:9/fff"
STORE_TYPES = (
    "from fff_jobs.config import activate, load_job_store; activate(); store = load_job_store(); "
    "print(type(store.docs_store).__name__, type(store.additional_stores['data']).__name__)"
)


def snapshot(directory: Path) -> dict[str, str]:
    return {name: (directory / name).read_text() for name in embedded_files()}


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_shipped_configuration_is_what_init_writes_for_the_embedded_store():
    assert snapshot(REPO) == embedded_files()


def test_init_refuses_to_overwrite_a_different_configuration_without_force(workdir: Path):
    before = snapshot(workdir)
    result = run(workdir, "fff", "init", "--uri", UNREACHABLE, "--no-check")
    assert_one_line_error(result, "my_launchpad.yaml exists and differs", "--force")
    assert snapshot(workdir) == before


def test_init_switches_to_a_server_and_back(workdir: Path):
    result = run(workdir, "fff", "init", "--uri", "mongodb://u:pw@db.example:27017/camp",
                 "--no-check", "--force")  # fmt: skip
    assert result.returncode == 0, result.stderr
    launchpad = yaml.safe_load((workdir / "my_launchpad.yaml").read_text())
    assert launchpad["uri_mode"] is True and launchpad["name"] == "camp"
    assert "MONGOMOCK_SERVERSTORE_FILE" not in (workdir / "fw_config/FW_config.yaml").read_text()
    assert (workdir / "my_launchpad.yaml").stat().st_mode & 0o077 == 0
    assert "pw" not in result.stdout
    stores = run(workdir, "python", "-c", STORE_TYPES)
    assert stores.returncode == 0, stores.stderr
    assert stores.stdout.split() == ["MongoURIStore", "GridFSURIStore"]
    back = run(workdir, "fff", "init", "--force")
    assert back.returncode == 0, back.stderr
    assert snapshot(workdir) == embedded_files()


def test_init_fails_fast_on_an_unreachable_server_and_writes_nothing(workdir: Path):
    before = snapshot(workdir)
    started = time.monotonic()
    result = run(workdir, "fff", "init", "--uri", UNREACHABLE, "--force")
    assert time.monotonic() - started < 15
    assert_one_line_error(result, "cannot reach MongoDB at mongodb://127.0.0.1:9/fff")
    assert snapshot(workdir) == before


def test_init_rejects_what_is_not_a_mongodb_uri(workdir: Path):
    result = run(workdir, "fff", "init", "--uri", "http://db.example", "--force")
    assert_one_line_error(result, "is not a MongoDB URI")


def test_doctor_reports_the_embedded_store_and_worker_categories(workdir: Path):
    result = run(workdir, "fff", "doctor")
    assert result.returncode == 0, result.stderr
    assert "embedded store" in result.stdout
    assert "my_fworker_gpu.yaml: category 'gpu'" in result.stdout
    assert "my_fworker_cpu.yaml: category 'cpu'" in result.stdout
    assert (workdir / ".fff/fireworks.json").is_file()


def test_doctor_names_a_malformed_launchpad_file(workdir: Path):
    (workdir / "my_launchpad.yaml").write_text("host: [unclosed\n")
    assert_one_line_error(run(workdir, "fff", "doctor"), "my_launchpad.yaml is not valid YAML")


def test_doctor_names_a_missing_jobflow_file(workdir: Path):
    (workdir / "fw_config/jobflow.yaml").unlink()
    assert_one_line_error(run(workdir, "fff", "doctor"), "jobflow.yaml is missing", "fff init")


def test_doctor_fails_within_seconds_naming_an_unreachable_server(workdir: Path):
    switched = run(workdir, "fff", "init", "--uri", UNREACHABLE, "--force", "--no-check")
    assert switched.returncode == 0, switched.stderr
    started = time.monotonic()
    result = run(workdir, "fff", "doctor")
    assert time.monotonic() - started < 15
    assert_one_line_error(result, "cannot reach MongoDB at mongodb://127.0.0.1:9/fff")


def test_doctor_refuses_an_unknown_worker_category(workdir: Path):
    worker = workdir / "fw_config/my_fworker_gpu.yaml"
    worker.write_text(worker.read_text().replace("category: gpu", "category: gpux"))
    result = run(workdir, "fff", "doctor")
    assert_one_line_error(result, "my_fworker_gpu.yaml: unknown worker category 'gpux'")


def test_passwords_in_uris_are_redacted():
    text = "cannot reach mongodb+srv://alice:hunter2@cluster.example/fff and mongodb://h:1/x"
    assert redact(text) == (
        "cannot reach mongodb+srv://alice:***@cluster.example/fff and mongodb://h:1/x"
    )
