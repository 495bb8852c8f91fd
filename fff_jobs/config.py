"""Builds the FireWorks LaunchPad and the jobflow JobStore from fw_config/, embedded or MongoDB.

A project is a directory holding ``my_launchpad.yaml`` and ``fw_config/``. Two modes:

- *embedded*: ``fw_config/FW_config.yaml`` names ``MONGOMOCK_SERVERSTORE_FILE``;
  FireWorks keeps the database in memory and writes that file when the process
  exits, so one process may use it at a time and a killed process loses all it
  did. Job outputs go to SQLite files (``ProjectMontyStore``) that persist on
  their own. For the quick start and single-worker tests only.
- *mongodb*: the server's LaunchPad and job store, URI and any credentials
  included, are in git-ignored files readable by their owner only
  (``.fff/private/``); ``my_launchpad.yaml`` and ``fw_config/`` name the server
  without them. Job outputs go to the collection ``outputs`` and large data to
  the GridFS bucket ``outputs_data``.

FireWorks reads its settings when it is first imported, so :func:`activate` must
run before anything imports ``fireworks`` or ``jobflow``.
"""

from __future__ import annotations

import functools
import gc
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from maggma.stores import MontyStore

EMBEDDED_KEY = "MONGOMOCK_SERVERSTORE_FILE"
EMBEDDED_FILE = ".fff/fireworks.json"
JOB_STORE_DIRECTORY = ".fff/jobstore"
PRIVATE_DIRECTORY = ".fff/private"
LAUNCHPAD_NAME = "my_launchpad.yaml"
JOBFLOW_NAME = "jobflow.yaml"
OUTPUTS_COLLECTION = "outputs"
DATA_COLLECTION = "outputs_data"
CONNECT_TIMEOUT_MS = 5000


class ConfigError(Exception):
    """A configuration file is missing or wrong, or the database cannot be reached."""


@dataclass(frozen=True)
class Project:
    """The files of one fff-jobs project directory."""

    directory: Path

    @property
    def private_directory(self) -> Path:
        """Where `fff init --uri` keeps the server's URI and credentials (git-ignored, mode 700)."""
        return self.directory / PRIVATE_DIRECTORY

    @property
    def launchpad_file(self) -> Path:
        """The LaunchPad FireWorks and fff read: the private one when a server is set, else the
        project's my_launchpad.yaml."""
        private = self.private_directory / LAUNCHPAD_NAME
        return private if private.is_file() else self.directory / LAUNCHPAD_NAME

    @property
    def fw_config_file(self) -> Path:
        return self.directory / "fw_config" / "FW_config.yaml"

    @property
    def jobflow_file(self) -> Path:
        """The jobflow settings jobflow reads: the private ones when a server is set."""
        private = self.private_directory / JOBFLOW_NAME
        return private if private.is_file() else self.directory / "fw_config" / JOBFLOW_NAME

    @property
    def configuration_files(self) -> list[Path]:
        """Every LaunchPad and jobflow file of the project that exists or must exist."""
        shared = [self.directory / LAUNCHPAD_NAME, self.directory / "fw_config" / JOBFLOW_NAME]
        return list(dict.fromkeys([*shared, self.launchpad_file, self.jobflow_file]))

    def fworker_file(self, category: str) -> Path:
        return self.directory / "fw_config" / f"my_fworker_{category}.yaml"

    @property
    def embedded_file(self) -> Path | None:
        """The embedded store's file, or None when the project uses a MongoDB server."""
        name = read_yaml(self.fw_config_file).get(EMBEDDED_KEY)
        return self.directory / name if name else None


def read_yaml(path: Path) -> dict[str, Any]:
    """Load a YAML mapping, with an error that names the file and what to do."""
    if not path.is_file():
        raise ConfigError(f"{path} is missing: run `fff init` in the project directory")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        from fff_jobs.spec import describe_yaml_error

        raise ConfigError(
            f"{path} is not valid YAML ({describe_yaml_error(error)}); "
            "fix it or rerun `fff init --force`"
        ) from None
    if not isinstance(content, dict):
        kind = type(content).__name__
        raise ConfigError(f"{path} must hold a YAML mapping of settings, not {kind}")
    return content


def find_project(start: Path | None = None) -> Project:
    """The project of ``FFF_PROJECT_DIR``, else the nearest directory upwards holding fw_config/."""
    if os.environ.get("FFF_PROJECT_DIR"):
        return Project(Path(os.environ["FFF_PROJECT_DIR"]).resolve())
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        if (directory / "fw_config" / "FW_config.yaml").is_file():
            return Project(directory)
    raise ConfigError(
        f"no fw_config/FW_config.yaml in {here} or above: run fff from the project "
        "directory, or set FFF_PROJECT_DIR"
    )


def worker_environment(project: Project) -> dict[str, str]:
    """Variables that point FireWorks and jobflow at the project, as fw_config/env.sh sets them."""
    environment = {
        "FFF_PROJECT_DIR": str(project.directory),
        "FW_CONFIG_FILE": str(project.fw_config_file),
        "FFF_LAUNCHPAD_FILE": str(project.launchpad_file),
        "JOBFLOW_CONFIG_FILE": str(project.jobflow_file),
        "FFF_PYTHON_BIN": os.environ.get("FFF_PYTHON_BIN") or str(Path(sys.executable).parent),
    }
    if project.embedded_file is not None:
        environment[EMBEDDED_KEY] = str(project.embedded_file)
    return environment


def activate(project: Project | None = None) -> Project:
    """Point this process at the project's configuration; creates the embedded store if new."""
    project = project or find_project()
    for path in project.configuration_files:
        read_yaml(path)
    environment = worker_environment(project)
    if EMBEDDED_KEY not in environment:
        os.environ.pop(EMBEDDED_KEY, None)
    os.environ.update(environment)
    embedded = project.embedded_file
    if embedded is not None and not (embedded.is_file() and embedded.stat().st_size):
        embedded.parent.mkdir(parents=True, exist_ok=True)
        embedded.write_text("{}")
    return project


def redact(text: str) -> str:
    """Text with the password of any MongoDB URI in it replaced by ***."""
    return re.sub(r"(mongodb(?:\+srv)?://[^:/@\s]+:)[^@\s]+@", r"\1***@", text)


def public_uri(uri: str) -> str:
    """A MongoDB URI without its user, password and options: the server and database only."""
    return re.sub(r"^(mongodb(?:\+srv)?://)[^@/]*@", r"\1", uri.split("?", 1)[0])


def describe_server(settings: dict[str, Any]) -> str:
    """Where a LaunchPad's settings point, without credentials."""
    if settings.get("uri_mode"):
        return redact(str(settings.get("host")))
    return f"{settings.get('host', 'localhost')}:{settings.get('port', 27017)}"


def describe_database(settings: dict[str, Any]) -> str:
    """The server and database a LaunchPad's settings name, without credentials or options."""
    name = settings.get("name") or "fireworks"
    if settings.get("uri_mode"):
        server = public_uri(str(settings.get("host"))).rstrip("/")
        return server if server.endswith(f"/{name}") else f"{server}/{name}"
    return f"{describe_server(settings)}/{name}"


@functools.cache
def load_launchpad():
    """The project's LaunchPad, checked to answer within seconds (one per process).

    An empty database is initialised here (as `lpad reset` would), so a new
    project needs no separate set-up step.
    """
    from fireworks import LaunchPad

    project = find_project()
    settings = read_yaml(project.launchpad_file)
    kwargs = dict(settings.get("mongoclient_kwargs") or {})
    kwargs.setdefault("serverSelectionTimeoutMS", CONNECT_TIMEOUT_MS)
    store = _live_embedded_store()
    if store is not None:
        kwargs["_store"] = store
    settings["mongoclient_kwargs"] = kwargs
    launchpad = LaunchPad.from_dict(settings)
    try:
        launchpad.connection.admin.command("ping")
    except Exception as error:
        raise ConfigError(
            f"cannot reach MongoDB at {describe_server(settings)} "
            f"({redact(type(error).__name__ + ': ' + str(error))[:200]}): check host and port "
            f"in {project.launchpad_file}, or run `fff init` for the embedded store"
        ) from None
    if launchpad.fw_id_assigner.find_one() is None and launchpad.fireworks.find_one() is None:
        initialise(launchpad)
    return launchpad


def initialise(launchpad) -> None:
    """Prepare an empty FireWorks database: id counters and indexes, as `lpad reset` would.

    Unlike ``reset`` it drops nothing (servers without the ``drop`` command, such as
    the jongodb test server, accept it), and two processes doing it at once agree.
    """
    launchpad.fw_id_assigner.update_one(
        {"_id": -1}, {"$setOnInsert": {"next_fw_id": 1, "next_launch_id": 1}}, upsert=True
    )
    launchpad.tuneup()


def load_job_store():
    """The jobflow JobStore of fw_config/jobflow.yaml (the one workers use)."""
    from jobflow.settings import JobflowSettings

    project = find_project()
    if "JOB_STORE" not in read_yaml(project.jobflow_file):
        raise ConfigError(f"{project.jobflow_file} has no JOB_STORE: rerun `fff init --force`")
    try:
        return JobflowSettings().JOB_STORE
    except Exception as error:
        raise ConfigError(f"{project.jobflow_file}: {redact(str(error))[:300]}") from None


@functools.cache
def project_database():
    """The database that holds the project's own collections: the LaunchPad's database."""
    return load_launchpad().db


def _live_embedded_store():
    """The embedded store this process holds already (a rocket's LaunchPad loaded it), or None.

    A second client would load its own copy of the file and the two would
    overwrite each other at exit, so a LaunchPad made here shares the live one.
    """
    from fireworks import fw_config

    if not fw_config.MONGOMOCK_SERVERSTORE_FILE:
        return None
    from mongomock.store import ServerStore

    path = os.environ[EMBEDDED_KEY]
    for candidate in gc.get_objects():
        # type(), not isinstance(): isinstance would touch every object's __class__,
        # which warns for some of torch's deprecated module attributes
        if type(candidate) is ServerStore and candidate._filename == path:
            return candidate
    return None


class ProjectMontyStore(MontyStore):
    """A MontyStore (SQLite files) whose relative path is relative to the project directory.

    Rockets run in launcher directories of their own, so a path relative to the
    working directory would give every job a different store.
    """

    def __init__(self, collection_name: str, database_path: str = JOB_STORE_DIRECTORY, **kwargs):
        path = Path(database_path)
        if not path.is_absolute():
            path = find_project().directory / path
        path.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("storage", "sqlite")
        super().__init__(collection_name, database_path=str(path), **kwargs)
