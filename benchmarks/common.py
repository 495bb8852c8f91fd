"""Shared pieces of the benchmarks: temporary projects, servers, campaigns, their records, tables.

Campaigns and workers run in a subprocess per project (``python benchmarks/common.py
campaign|records ...`` with the project's environment), so that each has its own
FireWorks settings and embedded store, as a user's `fff run` would.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
PYTHON = Path(sys.executable)
JONGODB = REPO / "tests/server/node_modules/@jongodb/memory-server-bin-linux-x64-gnu/bin/jongodb"
NO_JONGODB = (
    "the jongodb test server is not installed: run `bash scripts/test.sh --co -q` first "
    "(it installs it with npm into tests/server/)"
)
EMBEDDED_KEY = "MONGOMOCK_SERVERSTORE_FILE"
STALLED_SECONDS = 120  # a worker with nothing to run, and no job running anywhere, stops
# where each kind of task records its own wall time
TASK_COLLECTIONS = {
    "training": "models",
    "md": "segments",
    "inference+selection": "selections",
    "reference": "reference_results",
}


def machine_note() -> str:
    """What the figures were measured on: cores and the load other work put on them."""
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores, load average {load:.1f} at the start (other work may run)"


# --- projects and servers ---


def temporary_project(prefix: str = "fff-bench-") -> Path:
    """A fresh project directory (fw_config/ and my_launchpad.yaml copied), embedded store."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.copytree(REPO / "fw_config", directory / "fw_config")
    shutil.copy(REPO / "my_launchpad.yaml", directory / "my_launchpad.yaml")
    return directory


def project_environment(directory: Path, **extra: str) -> dict[str, str]:
    """The environment `source fw_config/env.sh` gives, with one thread per process."""
    from fff_jobs.config import Project, worker_environment

    environment = {key: value for key, value in os.environ.items() if key != EMBEDDED_KEY}
    environment.update(worker_environment(Project(directory)))
    environment["PATH"] = f"{PYTHON.parent}{os.pathsep}{environment['PATH']}"
    paths = [str(BENCHMARKS), os.environ.get("PYTHONPATH", "")]
    environment["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    environment.setdefault("OMP_NUM_THREADS", "1")
    environment.update(extra)
    return environment


def run_in_project(directory: Path, *command: str, timeout: float = 3600) -> str:
    """Run a command in the project as a user would; its standard output (raises on failure)."""
    result = subprocess.run(
        command,
        cwd=directory,
        env=project_environment(directory),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed in {directory}:\n{result.stderr[-3000:]}")
    return result.stdout


@contextlib.contextmanager
def jongodb_server() -> Iterator[str]:
    """A jongodb server on a free port for the duration; yields its URI (no database name)."""
    if not JONGODB.exists():
        raise SystemExit(f"error: {NO_JONGODB}")
    process = subprocess.Popen(
        [str(JONGODB), "--host=127.0.0.1", "--port=0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in process.stdout:
            if line.startswith("JONGODB_URI="):
                yield line.strip().split("=", 1)[1].rsplit("/", 1)[0]
                return
        raise RuntimeError("jongodb exited before printing its URI")
    finally:
        process.terminate()
        process.wait(timeout=10)


def use_server(directory: Path, uri: str) -> None:
    """Switch a project to a server with `fff init --uri`, as a user would."""
    run_in_project(directory, "fff", "init", "--uri", uri, "--force", timeout=120)


# --- campaigns and their records ---


def run_campaign(directory: Path, spec: dict, timeout: float = 3600, workers: int = 1) -> dict:
    """Submit and run a campaign in its project; its records.

    One worker runs every job in one process, like `fff run`. Several workers need the
    project on a server (:func:`use_server`): they run jobs side by side, as workers
    on a node would.
    """
    (directory / "spec.yaml").write_text(yaml.safe_dump(spec))
    output = directory / "records.json"
    script = str(BENCHMARKS / "common.py")
    arguments = ("campaign", "spec.yaml", str(output), "--workers", str(workers))
    run_in_project(directory, str(PYTHON), script, *arguments, timeout=timeout)
    return json.loads(output.read_text())


def campaign_records(directory: Path, campaign_id: str | None = None) -> dict:
    """The records of a campaign already in a project (the newest one if no id is given)."""
    output = Path(tempfile.mkdtemp()) / "records.json"
    arguments = ["records", str(output)] + ([campaign_id] if campaign_id else [])
    run_in_project(directory, str(PYTHON), str(BENCHMARKS / "common.py"), *arguments)
    return json.loads(output.read_text())


def _jsonable(value: object) -> object:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return str(value)


def dump_records(database, campaign_id: str, path: Path, run_wall_time: float | None) -> None:
    """Write what the campaign keeps about itself (and its pooled frames) to a JSON file."""
    from fff_jobs import database as db

    campaign = database[db.CAMPAIGNS].find_one({"_id": campaign_id}, {"budget.claims": 0})
    query = {"campaign_id": campaign_id}
    records = {
        "campaign": campaign,
        "run_wall_time": run_wall_time,
        "reference_results": list(database[db.REFERENCE_RESULTS].find(query).sort("sequence", 1)),
        "segments": [record.model_dump() for record in db.segment_records(database, campaign_id)],
        "models": list(database[db.MODELS].find(query)),
        "selections": list(database[db.SELECTIONS].find(query, {"frame_ids": 0, "spreads": 0})),
        "frame_pool": list(database[db.FRAME_POOL].find(query).sort("_id", 1)),
    }
    path.write_text(json.dumps(records, default=_jsonable))


def _campaign_command(spec_file: str, output: str, workers: int) -> None:
    """Inside a project: submit the campaign, run its jobs here (and in ``workers - 1``
    other processes), dump its records."""
    from fff_jobs.config import activate, project_database

    activate()
    from fff_jobs.jobs import submit_campaign
    from fff_jobs.spec import CampaignSpec
    from fff_jobs.workers import run_until_done

    start = time.perf_counter()
    campaign_id = submit_campaign(CampaignSpec.from_yaml(spec_file))
    log = Path(output).with_suffix(".log").resolve()
    if workers == 1:
        run_until_done(log_file=log)
    else:
        command = [str(PYTHON), __file__, "work", campaign_id, str(log)]
        others = [subprocess.Popen(command) for _ in range(workers - 1)]
        _work_command(campaign_id, str(log))
        for other in others:
            other.wait()
    elapsed = time.perf_counter() - start
    dump_records(project_database(), campaign_id, Path(output), elapsed)


def _work_command(campaign_id: str, log: str) -> None:
    """One of several workers on a server: run rockets until the campaign is complete and no
    job is left to run (rlaunch rapidfire would stop while other workers' jobs still add)."""
    from fireworks import FWorker
    from fireworks.core.rocket_launcher import launch_rocket

    from fff_jobs import database as db
    from fff_jobs.config import activate, load_launchpad, project_database
    from fff_jobs.workers import output_to

    activate()
    launchpad, database, worker = load_launchpad(), project_database(), FWorker(category="")
    idle_since = time.monotonic()
    with output_to(Path(log)):
        while time.monotonic() - idle_since < STALLED_SECONDS:
            if launchpad.run_exists(worker):
                launch_rocket(launchpad, worker)
                idle_since = time.monotonic()
                continue
            busy = launchpad.fireworks.count_documents({"state": {"$in": ["RUNNING", "RESERVED"]}})
            if not busy and not db.get_campaign(database, campaign_id).running:
                return
            if busy:
                idle_since = time.monotonic()
            time.sleep(0.5)


def _records_command(output: str, campaign_id: str | None) -> None:
    """Inside a project: dump the records of a campaign (the newest if no id is given)."""
    from fff_jobs import database as db
    from fff_jobs.config import activate, project_database

    activate()
    database = project_database()
    campaign_id = campaign_id or db.list_campaigns(database)[0].id
    dump_records(database, campaign_id, Path(output), None)


def campaign_wall_time(records: dict) -> float:
    """Seconds from submission to the end: the run's own clock, else created_at to finished_at."""
    if records.get("run_wall_time"):
        return float(records["run_wall_time"])
    campaign = records["campaign"]
    start = datetime.datetime.fromisoformat(campaign["created_at"])
    # a campaign that stalled has no finished_at: its last stored result ends it
    end = campaign.get("finished_at") or max(d["stored_at"] for d in records["reference_results"])
    return (datetime.datetime.fromisoformat(end) - start).total_seconds()


def task_times(records: dict) -> dict[str, list[float]]:
    """Kind of task -> the wall times its records keep (seconds)."""
    return {
        kind: [float(doc["wall_time"]) for doc in records[collection] if doc.get("wall_time")]
        for kind, collection in TASK_COLLECTIONS.items()
    }


def campaign_spec(path: Path, **changes: object) -> dict:
    """A campaign spec file as a mapping, with dotted keys ("training.seed") changed."""
    spec = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        section = spec
        for parent in parents:
            section = section.setdefault(parent, {})
        section[key] = value
    return spec


# --- output ---


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain-text table, numbers formatted to 4 significant figures."""
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def write_results(name: str, figures: dict) -> Path:
    """Write a benchmark's figures to benchmarks/results/<name>.json; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(figures, indent=2, default=_jsonable))
    print(f"\nfigures written to {path}")
    return path


def main() -> None:
    """Subprocess entry points, run inside a project: `campaign SPEC OUT`, `records OUT [ID]`."""
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    campaign = commands.add_parser("campaign")
    campaign.add_argument("spec")
    campaign.add_argument("output")
    campaign.add_argument("--workers", type=int, default=1)
    work = commands.add_parser("work")
    work.add_argument("campaign_id")
    work.add_argument("log")
    records = commands.add_parser("records")
    records.add_argument("output")
    records.add_argument("campaign_id", nargs="?")
    arguments = parser.parse_args()
    if arguments.command == "campaign":
        _campaign_command(arguments.spec, arguments.output, arguments.workers)
    elif arguments.command == "work":
        _work_command(arguments.campaign_id, arguments.log)
    else:
        _records_command(arguments.output, arguments.campaign_id)


if __name__ == "__main__":
    main()
