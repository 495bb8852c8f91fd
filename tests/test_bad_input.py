"""Bad input everywhere a user types or loads something: one clear line, exit status 2.

The corpus is tests/bad_input/: specs, structure files, configuration files, and
`expected.yaml`, which says for each case what to run and the exact error line.
"""

from __future__ import annotations

import shlex
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pymongo
import pytest
import yaml

from project import REPO, TESTS, run, use_server

pytestmark = pytest.mark.slow

CORPUS = TESTS / "bad_input"
CASES = yaml.safe_load((CORPUS / "expected.yaml").read_text())


def run_case(case: dict, template: Path, directory: Path):
    """Run one case in its own copy of the project; (case, exit status, stderr, expected)."""
    shutil.copytree(template, directory)
    for source, target in (case.get("replace") or {}).items():
        shutil.copy(CORPUS / source, directory / target)
    values = {"input": str(CORPUS), "project": str(directory)}
    command = shlex.split(case["command"].format(**values))
    result = run(directory, *command)
    return result.returncode, result.stderr.strip(), case["error"].format(**values)


@pytest.fixture(scope="module")
def server_project(tmp_path_factory, mongo_uri: str) -> tuple[Path, pymongo.database.Database]:
    project = tmp_path_factory.mktemp("bad_input") / "template"
    project.mkdir()
    shutil.copytree(REPO / "fw_config", project / "fw_config")
    shutil.copy(REPO / "my_launchpad.yaml", project)
    name = f"fff_{uuid.uuid4().hex[:8]}"
    use_server(project, f"{mongo_uri}/{name}")
    return project, pymongo.MongoClient(mongo_uri)[name]


@pytest.fixture(scope="module")
def outcomes(server_project) -> dict[str, tuple[int, str, str]]:
    """Every case run through the `fff` command, three at a time."""
    template, _ = server_project
    with ThreadPoolExecutor(3) as pool:
        futures = {
            case["case"]: pool.submit(run_case, case, template, template.parent / f"case{index}")
            for index, case in enumerate(CASES)
        }
    return {name: future.result() for name, future in futures.items()}


def error_line(stderr: str) -> str:
    """The error fff printed: the last line (libraries may print warnings before it)."""
    assert "Traceback" not in stderr
    return stderr.splitlines()[-1] if stderr else ""


@pytest.mark.parametrize("case", [case["case"] for case in CASES])
def test_bad_input_gets_exit_status_2_and_one_clear_line(outcomes, case: str):
    returncode, stderr, expected = outcomes[case]
    assert (returncode, error_line(stderr)) == (2, expected)


def test_nothing_is_written_before_the_input_is_checked(outcomes, server_project):
    _, database = server_project
    assert database.campaigns.count_documents({}) == 0
    assert database.fireworks.count_documents({}) == 0


def test_a_campaign_with_nothing_to_report_says_so(server_project, tmp_path):
    project, _ = server_project
    submitted = run(project, "fff", "submit", str(CORPUS / "specs/valid.yaml"))
    assert submitted.returncode == 0, submitted.stderr
    campaign_id = submitted.stdout.split()[-1]
    report = run(project, "fff", "report", campaign_id, "--output", str(tmp_path))
    assert (report.returncode, error_line(report.stderr)) == (
        2,
        f"error: campaign {campaign_id!r} has no trained generation yet: run its workers first",
    )
    export = run(project, "fff", "export", campaign_id, "--output", str(tmp_path))
    assert (export.returncode, error_line(export.stderr)) == (
        2,
        f"error: campaign {campaign_id!r} has no reference results yet",
    )
