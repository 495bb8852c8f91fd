"""`fff init` and `fff doctor`: configuration written safely, bad configuration named in a line."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import yaml

from fff_jobs.config import Project, redact, worker_environment
from fff_jobs.project_files import embedded_files

from project import REPO, run

UNREACHABLE = "mongodb://127.0.0.1:9/fff"
MARKER = "Marker-pw-9f3c"
PRIVATE = (".fff/private/my_launchpad.yaml", ".fff/private/jobflow.yaml")
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
    launchpad = yaml.safe_load((workdir / ".fff/private/my_launchpad.yaml").read_text())
    assert launchpad["uri_mode"] is True and launchpad["name"] == "camp"
    assert "MONGOMOCK_SERVERSTORE_FILE" not in (workdir / "fw_config/FW_config.yaml").read_text()
    assert "pw" not in result.stdout
    stores = run(workdir, "python", "-c", STORE_TYPES)
    assert stores.returncode == 0, stores.stderr
    assert stores.stdout.split() == ["MongoStore", "GridFSStore"]
    assert "Warning" not in stores.stderr
    back = run(workdir, "fff", "init", "--force")
    assert back.returncode == 0, back.stderr
    assert snapshot(workdir) == embedded_files()
    assert not any((workdir / name).exists() for name in PRIVATE)


def git(directory: Path, *arguments: str) -> str:
    result = subprocess.run(["git", *arguments], cwd=directory, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_password_goes_only_to_private_files_that_git_ignores(workdir: Path):
    shutil.copy(REPO / ".gitignore", workdir)
    git(workdir, "init", "--quiet")
    private = workdir / PRIVATE[0]
    private.parent.mkdir(parents=True)
    private.write_text("left over, readable by all")
    private.chmod(0o644)
    uri = f"mongodb://fff_user:{MARKER}@db.example:27017/camp?authSource=admin"
    command = f"umask 000 && fff init --uri '{uri}' --no-check --force"
    result = run(workdir, "bash", "-c", command)  # umask 000: modes come from fff, not the shell
    assert result.returncode == 0, result.stderr
    assert MARKER not in result.stdout + result.stderr
    git(workdir, "add", "--all")
    tracked = git(workdir, "ls-files").split()
    assert "my_launchpad.yaml" in tracked and "fw_config/jobflow.yaml" in tracked
    assert not [name for name in tracked if MARKER in (workdir / name).read_text()]
    assert not set(PRIVATE) & set(tracked)
    for name in PRIVATE:
        assert MARKER in (workdir / name).read_text()
        assert (workdir / name).stat().st_mode & 0o777 == 0o600
    assert private.parent.stat().st_mode & 0o777 == 0o700
    shared = yaml.safe_load((workdir / "my_launchpad.yaml").read_text())
    assert shared["host"] == "mongodb://db.example:27017/camp"


def test_env_sh_points_fireworks_and_jobflow_where_fff_does(workdir: Path):
    init = run(workdir, "fff", "init", "--uri", UNREACHABLE, "--no-check", "--force")
    assert init.returncode == 0, init.stderr
    names = ("FW_CONFIG_FILE", "FFF_LAUNCHPAD_FILE", "JOBFLOW_CONFIG_FILE")
    echo = " ".join(f"${name}" for name in names)
    sourced = subprocess.run(
        ["bash", "-c", f"source fw_config/env.sh && echo {echo}"],
        cwd=workdir, capture_output=True, text=True, check=True,
    )  # fmt: skip
    expected = worker_environment(Project(workdir))
    assert sourced.stdout.split() == [expected[name] for name in names]
    assert expected["FFF_LAUNCHPAD_FILE"] == str(workdir / PRIVATE[0])
    probe = "from fireworks.fw_config import LAUNCHPAD_LOC; print(LAUNCHPAD_LOC)"
    assert run(workdir, "python", "-c", probe).stdout.split() == [PRIVATE[0]]


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
