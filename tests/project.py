"""Helpers for tests that act as a user: fff, lpad, rlaunch and qlaunch in a project directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import bson.json_util

from fff_jobs.config import EMBEDDED_KEY, Project, worker_environment

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BIN = Path(sys.executable).parent


def project_environment(directory: Path, **extra: str) -> dict[str, str]:
    """The environment `source fw_config/env.sh` gives, plus the tests' helper jobs on the path."""
    environment = {key: value for key, value in os.environ.items() if key != EMBEDDED_KEY}
    environment.update(worker_environment(Project(directory)))
    environment["PYTHONPATH"] = str(TESTS)
    environment.update(extra)
    environment["PATH"] = f"{BIN}{os.pathsep}{environment['PATH']}"
    return environment


def run(directory: Path, *command: str, timeout: float = 120, **extra: str):
    """Run a command in the project as a user would; returns the CompletedProcess."""
    return subprocess.run(
        command,
        cwd=directory,
        env=project_environment(directory, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def use_server(directory: Path, uri: str) -> None:
    """Switch the project to a live server with `fff init --uri`, as a user would."""
    result = run(directory, "fff", "init", "--uri", uri, "--force")
    assert result.returncode == 0, result.stderr


def server_project(directory: Path, mongo_uri: str, options: str = "") -> str:
    """A project in ``directory`` (the shipped configuration) on a new database of the live
    server, set up with `fff init --uri`; the database's name."""
    shutil.copytree(REPO / "fw_config", directory / "fw_config")
    shutil.copy(REPO / "my_launchpad.yaml", directory)
    name = f"fff_{uuid.uuid4().hex[:8]}"
    use_server(directory, f"{mongo_uri}/{name}{options}")
    return name


def lpad_fireworks(directory: Path) -> list[dict]:
    """Every Firework as `lpad get_fws -d more` reports it."""
    result = run(directory, "lpad", "get_fws", "-d", "more")
    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout)
    return reported if isinstance(reported, list) else [reported]


def submit_script(name: str) -> str:
    """Source of a Python script that submits a flow built by `name` (module:function)."""
    module, function = name.split(":")
    return (
        "import sys; from fff_jobs.config import activate; activate()\n"
        f"from {module} import {function}\n"
        "from fff_jobs.workers import submit\n"
        f"print(len(submit({function}(*map(int, sys.argv[1:])))))\n"
    )


def stored_database(project: Path) -> dict[str, list[dict]]:
    """Collection -> documents of the embedded store, as the file on disk holds them."""
    content = bson.json_util.loads((project / ".fff/fireworks.json").read_text())
    return {
        name: [document for _, document in collection["documents"]]
        for name, collection in content["fff"].items()
    }
