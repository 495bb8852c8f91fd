"""The configuration files `fff init` writes: embedded store or MongoDB server, Slurm qadapters.

The files shipped in the repository (my_launchpad.yaml, fw_config/FW_config.yaml,
fw_config/jobflow.yaml) are exactly what ``write_configuration(directory, None)``
writes, and the Slurm qadapters what ``write_slurm_adapter`` writes with the
default settings; tests keep them equal. For a server, those files name it without
credentials or options; the full URI goes only into git-ignored files under
``.fff/private/``, created readable by their owner only (mode 600) from the start.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from pymongo.errors import InvalidURI
from pymongo.uri_parser import parse_uri

from fff_jobs.config import (
    CONNECT_TIMEOUT_MS,
    DATA_COLLECTION,
    EMBEDDED_FILE,
    EMBEDDED_KEY,
    JOB_STORE_DIRECTORY,
    JOBFLOW_NAME,
    LAUNCHPAD_NAME,
    OUTPUTS_COLLECTION,
    PRIVATE_DIRECTORY,
    ConfigError,
    public_uri,
    redact,
)
from fff_jobs.routing import CPU, GPU

DATABASE_NAME = "fff"

LAUNCHPAD_HEADER = """\
# FireWorks LaunchPad: where fff-jobs, lpad, rlaunch and qlaunch find the database.
"""
EMBEDDED_LAUNCHPAD_NOTE = """\
#
# As shipped this is the EMBEDDED store (fw_config/FW_config.yaml sets
# MONGOMOCK_SERVERSTORE_FILE): FireWorks keeps the whole database in memory and
# writes .fff/fireworks.json only when the process exits. One process at a time;
# a killed process loses everything it did. Quick start and tests only.
#
# For a real MongoDB: `fff init --uri mongodb://HOST:27017/fff --force`, which
# rewrites this file, FW_config.yaml and jobflow.yaml together.
"""
MONGODB_LAUNCHPAD_NOTE = f"""\
# Written by `fff init --uri`: the server, without credentials or options. The
# full LaunchPad is {PRIVATE_DIRECTORY}/{LAUNCHPAD_NAME} (git-ignored, readable by you
# only); fw_config/FW_config.yaml points FireWorks there (CONFIG_FILE_DIR) and
# `source fw_config/env.sh` sets FFF_LAUNCHPAD_FILE to it. `fff init --force`
# goes back to the embedded store.
"""
PRIVATE_NOTE = """\
# Written by `fff init --uri`: holds the server's full URI, credentials included.
# Readable by you only; git-ignored (.fff/). Never copy it into the repository.
"""
FW_CONFIG = """\
# FireWorks settings for this project. `source fw_config/env.sh` (done by
# .venv/bin/activate) points FW_CONFIG_FILE here; my_launchpad.yaml is looked up
# in the directory you run lpad/rlaunch from (the project directory).
{embedded}
# Rockets ping the database while a job runs; a job not pinged for
# RUN_EXPIRATION_SECS is what `lpad detect_lostruns` reports as lost.
PING_TIME_SECS: 600
RUN_EXPIRATION_SECS: 2400

# Seconds rapidfire waits before asking again when nothing is ready.
RAPIDFIRE_SLEEP_SECS: 5

# A worker waits this long for a workflow another process holds locked, then
# takes the lock: a lock this old has no live owner (its worker died inside
# FireWorks' update; `fff recover` repairs such a workflow).
WFLOCK_EXPIRATION_SECS: 60
WFLOCK_EXPIRATION_KILL: true

# Oversized dynamic Firework documents go to GridFS under this collection.
GRIDFS_FALLBACK_COLLECTION: fw_gridfs
{server}"""
FW_CONFIG_EMBEDDED = f"""
# Embedded store (quick start and tests): the whole database in one file,
# written when the process exits; one process at a time. `fff init --uri ...`
# removes this line and points my_launchpad.yaml at a MongoDB server.
{EMBEDDED_KEY}: {EMBEDDED_FILE}
"""
JOBFLOW_HEADER = """\
# jobflow settings: where job outputs go. `source fw_config/env.sh` points
# JOBFLOW_CONFIG_FILE here. Workers use this store; none is written into a
# Firework spec, so no credentials travel with the workflow.
"""
FW_CONFIG_SERVER = f"""
# Written by `fff init --uri`: lpad, rlaunch and qlaunch look for my_launchpad.yaml
# here first, the LaunchPad with the server's URI and credentials (relative to the
# project directory: run them from there; the qadapters pass FFF_LAUNCHPAD_FILE).
CONFIG_FILE_DIR: {PRIVATE_DIRECTORY}
LAUNCHPAD_LOC: {PRIVATE_DIRECTORY}/{LAUNCHPAD_NAME}
"""
MONGODB_JOBFLOW_NOTE = f"""\
#
# The server, without credentials or options. jobflow reads the full settings,
# {PRIVATE_DIRECTORY}/{JOBFLOW_NAME}: `source fw_config/env.sh` points JOBFLOW_CONFIG_FILE there.
"""
EMBEDDED_JOBFLOW_NOTE = """\
#
# As shipped: the EMBEDDED store, SQLite files under .fff/jobstore (a relative
# path is relative to the project directory, the parent of fw_config/).
# `fff init --uri ...` replaces it with MongoDB: job documents in the collection
# `outputs`, large data (trajectories, weights) in the GridFS bucket `outputs_data`.
"""


def _embedded_store(collection: str) -> dict:
    return {
        "@module": "fff_jobs.config",
        "@class": "ProjectMontyStore",
        "database_path": JOB_STORE_DIRECTORY,
        "database_name": DATABASE_NAME,
        "collection_name": collection,
    }


def _server_store(module: str, kind: str, uri: str, database: str, collection: str) -> dict:
    """A maggma store on the server at ``uri`` (MongoStore, GridFSStore: not the deprecated
    URI variants)."""
    return {
        "@module": module,
        "@class": kind,
        "uri": uri,
        "database": database,
        "collection_name": collection,
    }


def _job_store(docs_store: dict, data_store: dict) -> dict:
    return {
        "JOB_STORE": {
            "@module": "jobflow.core.store",
            "@class": "JobStore",
            "docs_store": docs_store,
            "additional_stores": {"data": data_store},
        }
    }


def _dump(settings: dict) -> str:
    return yaml.safe_dump(settings, sort_keys=False, default_flow_style=False)


def embedded_files() -> dict[str, str]:
    """Relative path -> text of the configuration for the embedded store."""
    launchpad = {
        "host": "localhost",
        "port": 27017,
        "name": DATABASE_NAME,
        "mongoclient_kwargs": {"serverSelectionTimeoutMS": CONNECT_TIMEOUT_MS},
    }
    stores = _job_store(_embedded_store(OUTPUTS_COLLECTION), _embedded_store(DATA_COLLECTION))
    return {
        "my_launchpad.yaml": LAUNCHPAD_HEADER + EMBEDDED_LAUNCHPAD_NOTE + _dump(launchpad),
        "fw_config/FW_config.yaml": FW_CONFIG.format(embedded=FW_CONFIG_EMBEDDED, server=""),
        "fw_config/jobflow.yaml": JOBFLOW_HEADER + EMBEDDED_JOBFLOW_NOTE + _dump(stores),
    }


def _parse_server(uri: str) -> str:
    """The database a MongoDB URI names (default ``fff``); an error if it is no MongoDB URI."""
    try:
        parsed = parse_uri(uri, validate=True)
    except (InvalidURI, ValueError) as error:
        raise ConfigError(
            f"{redact(uri)} is not a MongoDB URI ({error}); "
            "give mongodb://[user:password@]host[:port]/database[?options]"
        ) from None
    return parsed.get("database") or DATABASE_NAME


def _server_settings(uri: str, database: str) -> tuple[dict, dict]:
    """The LaunchPad and jobflow settings for the server at ``uri``."""
    launchpad = {
        "host": uri,
        "uri_mode": True,
        "name": database,
        "mongoclient_kwargs": {"serverSelectionTimeoutMS": CONNECT_TIMEOUT_MS},
    }
    stores = _job_store(
        _server_store("maggma.stores", "MongoStore", uri, database, OUTPUTS_COLLECTION),
        _server_store("maggma.stores.gridfs", "GridFSStore", uri, database, DATA_COLLECTION),
    )
    return launchpad, stores


def mongodb_files(uri: str) -> dict[str, str]:
    """Relative path -> text of the shared configuration for the server at ``uri``: the server
    and database only, no credentials or options."""
    launchpad, stores = _server_settings(public_uri(uri), _parse_server(uri))
    return {
        LAUNCHPAD_NAME: LAUNCHPAD_HEADER + MONGODB_LAUNCHPAD_NOTE + _dump(launchpad),
        "fw_config/FW_config.yaml": FW_CONFIG.format(embedded="", server=FW_CONFIG_SERVER),
        f"fw_config/{JOBFLOW_NAME}": JOBFLOW_HEADER + MONGODB_JOBFLOW_NOTE + _dump(stores),
    }


def private_files(uri: str) -> dict[str, str]:
    """Relative path -> text of the files that hold the full URI (and so any credentials)."""
    launchpad, stores = _server_settings(uri, _parse_server(uri))
    return {
        f"{PRIVATE_DIRECTORY}/{LAUNCHPAD_NAME}": PRIVATE_NOTE + _dump(launchpad),
        f"{PRIVATE_DIRECTORY}/{JOBFLOW_NAME}": PRIVATE_NOTE + _dump(stores),
    }


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file readable by its owner only, never readable by others even briefly.

    The content goes to a new file created with mode 600 (os.open), which then
    replaces ``path``: an existing file with other permissions is never written to.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.replace(partial, path)


def check_server(uri: str) -> None:
    """Fail within seconds, naming the server, when nothing answers at ``uri``."""
    import pymongo

    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=CONNECT_TIMEOUT_MS)
    try:
        client.admin.command("ping")
    except pymongo.errors.PyMongoError as error:
        raise ConfigError(
            f"cannot reach MongoDB at {redact(uri)} ({type(error).__name__}): start the server, "
            "fix the URI, or pass --no-check to write the configuration anyway"
        ) from None
    finally:
        client.close()


def write_configuration(directory: Path, uri: str | None, force: bool, check: bool) -> list[Path]:
    """Write the three mode-dependent files (and, for a server, the private ones); nothing is
    written unless all of them can be."""
    files = mongodb_files(uri) if uri else embedded_files()
    targets = {directory / name: text for name, text in files.items()}
    changed = [path for path, text in targets.items() if path.exists() and path.read_text() != text]
    if changed and not force:
        raise ConfigError(
            f"{changed[0]} exists and differs: pass --force to overwrite "
            f"({len(changed)} file(s) would change)"
        )
    if uri and check:
        check_server(uri)
    private = {directory / name: text for name, text in (private_files(uri) if uri else {}).items()}
    for path, text in private.items():
        write_private(path, text)
    for path in (directory / PRIVATE_DIRECTORY).glob("*.yaml"):
        if path not in private:
            path.unlink()
    for path, text in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o644)
    return [*targets, *private]


@dataclass(frozen=True)
class SlurmSettings:
    """What a Slurm job of one worker asks for; `fff init --slurm WORKER` writes its adapter."""

    cpus_per_task: int = 1
    walltime: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    gres: str | None = None


SLURM_ADAPTER_FILES = {
    GPU: "fw_config/my_qadapter_slurm.yaml",
    CPU: "fw_config/my_qadapter_slurm_cpu.yaml",
}
SLURM_DEFAULTS = {GPU: SlurmSettings(gres="gpu:1"), CPU: SlurmSettings(walltime="01:00:00")}
WORKER_DUTIES = {
    GPU: "training, MD sampling, committee inference",
    CPU: "reference calculations, audits",
}
# A Slurm job runs rockets for this many rounds of looking for work, RAPIDFIRE_SLEEP_SECS apart.
ROCKET_ROUNDS = 24
WALLTIME = re.compile(r"(?:(\d+)-)?(\d+):(\d{2}):(\d{2})")
SLURM_HEADER = """\
# qlaunch -q {file} rapidfire --nlaunches infinite -m 1
# Slurm jobs of the {worker} worker: {duties}.
# Each job runs rockets of fw_config/my_fworker_{worker}.yaml one after another for
# {rounds} rounds of looking for work (RAPIDFIRE_SLEEP_SECS apart, see FW_config.yaml) and
# starts none after half its wall time ({timeout} s), so a job shorter than that is never
# cut off; one cut off all the same (wall time, node failure) is re-run by `fff recover`.
# Written by `fff init --slurm {worker}`; its options --cpus-per-task, --walltime,
# --partition, --account and --gres (GPU request) rewrite this file for your cluster.
# sbatch passes the environment on: FFF_PROJECT_DIR, FFF_LAUNCHPAD_FILE (the LaunchPad,
# credentials included) and FFF_PYTHON_BIN (where rlaunch is: a login shell may reset
# PATH) come from fw_config/env.sh.
"""


def walltime_seconds(walltime: str) -> int:
    """Seconds of a Slurm wall time written [days-]hours:minutes:seconds."""
    match = WALLTIME.fullmatch(walltime)
    if not match:
        raise ConfigError(
            f"wall time {walltime!r} is not [days-]hours:minutes:seconds: give e.g. 04:00:00"
        )
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    if minutes > 59 or seconds > 59:
        raise ConfigError(f"wall time {walltime!r}: minutes and seconds go up to 59")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total < 60:
        raise ConfigError(f"wall time {walltime!r} is under a minute, the least Slurm grants")
    return total


def slurm_settings(worker: str, **given) -> SlurmSettings:
    """The worker's default Slurm settings with those given (not None) in their place, checked."""
    if worker not in SLURM_DEFAULTS:
        raise ConfigError(f"unknown worker {worker!r} for --slurm: give {GPU} or {CPU}")
    settings = replace(
        SLURM_DEFAULTS[worker],
        **{name: value for name, value in given.items() if value is not None},
    )
    if settings.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task {settings.cpus_per_task}: give 1 or more")
    if worker == CPU and settings.gres:
        raise ConfigError("--gres is the GPU worker's request: use it with --slurm gpu")
    walltime_seconds(settings.walltime)
    return settings


def slurm_adapter_text(worker: str, settings: SlurmSettings) -> str:
    """The qadapter file of the worker's Slurm jobs, with a header that says how it works."""
    timeout = walltime_seconds(settings.walltime) // 2
    project = "$FFF_PROJECT_DIR"
    adapter = {
        "_fw_name": "CommonAdapter",
        "_fw_q_type": "SLURM",
        "rocket_launch": 'rlaunch -l "$FFF_LAUNCHPAD_FILE" -w '
        f'"{project}/fw_config/my_fworker_{worker}.yaml" rapidfire --nlaunches infinite '
        f"--max_loops {ROCKET_ROUNDS} --timeout {timeout}",
        "pre_rocket": f'export PATH="$FFF_PYTHON_BIN:$PATH"; source "{project}/fw_config/env.sh"; '
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        "nodes": 1,
        "ntasks": 1,
        "cpus_per_task": settings.cpus_per_task,
        "gres": settings.gres or None,
        "walltime": settings.walltime,
        "queue": settings.partition,
        "account": settings.account,
        "job_name": f"fff_{worker}",
        "logdir": None,
    }
    header = SLURM_HEADER.format(
        file=SLURM_ADAPTER_FILES[worker], worker=worker, duties=WORKER_DUTIES[worker],
        rounds=ROCKET_ROUNDS, timeout=timeout,
    )  # fmt: skip
    kept = {key: value for key, value in adapter.items() if value is not None or key == "logdir"}
    return header + yaml.safe_dump(kept, sort_keys=False, width=1000)


def write_slurm_adapter(directory: Path, worker: str, settings: SlurmSettings, force: bool) -> Path:
    """Write the worker's Slurm qadapter; an existing different file needs ``force``."""
    path = directory / SLURM_ADAPTER_FILES[worker]
    text = slurm_adapter_text(worker, settings)
    if path.exists() and path.read_text() != text and not force:
        raise ConfigError(f"{path} exists and differs: pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
