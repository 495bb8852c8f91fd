"""`fff init` and `fff doctor`: configuration written safely, bad configuration named in a line."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fff_jobs.cli import app
from fff_jobs.config import Project, redact, worker_environment
from fff_jobs.project_files import (
    SLURM_ADAPTER_FILES,
    embedded_files,
    slurm_adapter_text,
    slurm_settings,
)

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


def test_shipped_slurm_adapters_are_what_init_writes_with_the_defaults():
    for worker, name in SLURM_ADAPTER_FILES.items():
        assert (REPO / name).read_text() == slurm_adapter_text(worker, slurm_settings(worker))


def submit_script(adapter: Path, directory: Path) -> str:
    """The batch script qlaunch would submit with this adapter file."""
    from fireworks.user_objects.queue_adapters.common_adapter import CommonAdapter

    return CommonAdapter.from_dict(yaml.safe_load(adapter.read_text())).get_script_str(directory)


def test_init_writes_a_slurm_adapter_for_the_cluster(workdir: Path):
    result = CliRunner().invoke(app, [
        "init", "--slurm", "gpu", "--cpus-per-task", "8", "--walltime", "1-00:00:00",
        "--partition", "a100", "--account", "chem42", "--gres", "gpu:a100:2", "--force",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    script = submit_script(workdir / "fw_config/my_qadapter_slurm.yaml", workdir)
    for line in ("--cpus-per-task=8", "--time=1-00:00:00", "--partition=a100",
                 "--account=chem42", "--gres=gpu:a100:2", "--job-name=fff_gpu"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script
    assert 'my_fworker_gpu.yaml" rapidfire --nlaunches infinite' in script
    assert "--timeout 43200" in script and "OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}" in script
    cpu_adapter = workdir / "fw_config/my_qadapter_slurm_cpu.yaml"
    assert cpu_adapter.read_text() == (REPO / "fw_config/my_qadapter_slurm_cpu.yaml").read_text()
    result = CliRunner().invoke(app, ["init", "--slurm", "cpu", "--cpus-per-task", "4", "--force"])
    assert result.exit_code == 0, result.output
    script = submit_script(cpu_adapter, workdir)
    assert "#SBATCH --cpus-per-task=4\n" in script and "--gres" not in script
    assert "#SBATCH --time=01:00:00\n" in script and "--partition" not in script
    assert 'my_fworker_cpu.yaml" rapidfire' in script


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--cpus-per-task", "2"], "Slurm options need --slurm gpu or --slurm cpu"),
        (["--slurm", "tpu"], "unknown worker 'tpu' for --slurm: give gpu or cpu"),
        (["--slurm", "cpu", "--gres", "gpu:1"], "--gres is the GPU worker's request"),
        (["--slurm", "gpu", "--walltime", "4h"], "wall time '4h' is not [days-]hours:minutes"),
        (["--slurm", "gpu", "--walltime", "00:00:30"], "is under a minute"),
        (["--slurm", "gpu", "--walltime", "01:75:00"], "minutes and seconds go up to 59"),
        (["--slurm", "gpu", "--cpus-per-task", "0"], "--cpus-per-task 0: give 1 or more"),
        (["--slurm", "gpu", "--uri", UNREACHABLE], "give --slurm or --uri/--uri-env"),
        (["--slurm", "gpu", "--cpus-per-task", "2"], "my_qadapter_slurm.yaml exists and differs"),
    ],
)
def test_init_refuses_wrong_slurm_options_and_writes_nothing(workdir, arguments, message):
    before = {path: path.read_text() for path in workdir.rglob("*") if path.is_file()}
    result = CliRunner().invoke(app, ["init", *arguments])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert {path: path.read_text() for path in workdir.rglob("*") if path.is_file()} == before
