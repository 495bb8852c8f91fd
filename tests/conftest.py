"""Shared fixtures: a live MongoDB wire-protocol server (jongodb, or a real MongoDB)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pymongo
import pytest

# Before tblite or torch load: several test processes share 2 cores, and OpenMP's default
# of one thread per core each made xTB calculations 100 times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from project import REPO
from slurm_cluster import SlurmCluster, SlurmUnavailableError, start_cluster

JONGODB = REPO / "tests/server/node_modules/@jongodb/memory-server-bin-linux-x64-gnu/bin/jongodb"


def _start_jongodb() -> tuple[subprocess.Popen, str]:
    if not JONGODB.exists():
        raise RuntimeError(
            f"{JONGODB} is missing: run `bash scripts/test.sh`, which installs it with npm"
        )
    process = subprocess.Popen(
        [str(JONGODB), "--host=127.0.0.1", "--port=0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("JONGODB_URI="):
            uri = line.strip().split("=", 1)[1]
            return process, uri.rsplit("/", 1)[0]
    process.kill()
    raise RuntimeError("jongodb exited before printing its URI")


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str]:
    """URI of a live server: FFF_TEST_MONGODB_URI when set, else a jongodb on a free port."""
    if os.environ.get("FFF_TEST_MONGODB_URI"):
        yield os.environ["FFF_TEST_MONGODB_URI"]
        return
    process, uri = _start_jongodb()
    try:
        yield uri
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def mongo_database(mongo_uri: str) -> Iterator[pymongo.database.Database]:
    """A fresh, uniquely named database on the live server, dropped afterwards where it can be.

    jongodb keeps data in memory and has neither ``drop`` nor ``listCollections``:
    there the database simply goes away with the server.
    """
    client = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)
    database = client[f"fff_test_{uuid.uuid4().hex[:10]}"]
    yield database
    with contextlib.suppress(pymongo.errors.OperationFailure):
        client.drop_database(database.name)
    client.close()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test in a temporary directory holding a copy of fw_config/ and my_launchpad.yaml."""
    shutil.copytree(REPO / "fw_config", tmp_path / "fw_config")
    shutil.copy(REPO / "my_launchpad.yaml", tmp_path / "my_launchpad.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """A one-node Slurm cluster on localhost; skips, saying why, where none can run."""
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailableError as reason:
        pytest.skip(f"no Slurm cluster: {reason}")
    try:
        yield cluster
    finally:
        cluster.stop()
