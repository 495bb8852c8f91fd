"""Submitting flows to the LaunchPad and running workers in this process (the quick start)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from jobflow import Flow, Job, Response

from fff_jobs.config import ConfigError, find_project, load_launchpad, project_database, read_yaml
from fff_jobs.routing import CPU, GPU

KNOWN_CATEGORIES = (GPU, CPU)


def submit(flow: Flow) -> dict[str, int]:
    """Add a flow to the LaunchPad as one workflow; returns job uuid -> Firework id.

    No store is passed to ``flow_to_workflow``: it would serialise the store,
    credentials included, into every Firework spec. Workers use their own.
    """
    from jobflow.managers.fireworks import flow_to_workflow

    workflow = flow_to_workflow(flow)
    return load_launchpad().add_wf(workflow)


def grow(
    output,
    additions: list[Job],
    detour: Job | None = None,
    *,
    max_workflow_jobs: int,
    workflow_name: str,
) -> Response:
    """A running job's Response that adds ``additions`` (and ``detour``) to the workflow.

    FireWorks rewrites a workflow's whole document for every job that completes or
    adds jobs, so one ever-growing workflow makes every job slower. Once the running
    job's workflow would pass ``max_workflow_jobs``, the new jobs go into a new
    workflow named ``workflow_name`` instead (the detour as an ordinary job: for a
    job without children, as every fff job is, that is the same thing).
    """
    from jobflow import CURRENT_JOB

    from fff_jobs import database as db

    new = [*additions, *([detour] if detour else [])]
    running = CURRENT_JOB.job
    if new and running is not None:
        database = project_database()
        fw_id = running.metadata.get("fw_id") or db.firework_id(
            database, running.name, running.uuid
        )
        held = 0 if fw_id is None else db.workflow_size(database, fw_id)
        if held and held + len(new) > max_workflow_jobs:
            submit(Flow(new, name=workflow_name))
            return Response(output=output)
    return Response(output=output, addition=Flow(additions) if additions else None, detour=detour)


def load_fworker(path: Path):
    """A FireWorker from its file, refusing categories that no fff job carries."""
    from fireworks import FWorker

    settings = read_yaml(path)
    category = settings.get("category") or ""
    categories = category if isinstance(category, list) else [category]
    unknown = [name for name in categories if name and name not in KNOWN_CATEGORIES]
    if unknown:
        raise ConfigError(
            f"{path}: unknown worker category {unknown[0]!r}; fff jobs carry "
            f"{' or '.join(KNOWN_CATEGORIES)} (or leave category empty to run everything)"
        )
    return FWorker.from_dict({**settings, "query": settings.get("query") or "{}"})


def waiting_work(launchpad) -> dict[str, dict[str, int]]:
    """Worker category -> Firework state -> count, for the states a worker cares about."""
    from fff_jobs import database as db

    states = ["READY", "WAITING", "RESERVED", "RUNNING", "FIZZLED"]
    return db.job_counts(launchpad.fireworks, {"state": {"$in": states}})


@contextlib.contextmanager
def output_to(path: Path | None) -> Iterator[None]:
    """Send this process's standard output and error, file descriptors included, to a file."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with path.open("a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for descriptor, original in zip((1, 2), saved, strict=True):
                os.dup2(original, descriptor)
                os.close(original)


def run_until_done(
    category: str | None = None,
    on_rocket: Callable[[], None] | None = None,
    log_file: Path | None = None,
) -> int:
    """Run rockets here, one after another, until no job can become ready; returns how many ran.

    Like ``rlaunch rapidfire``, calling ``on_rocket`` after each rocket (the progress
    bar of `fff run`); with ``log_file`` the rockets' output goes there, not to the
    terminal. Unlike it, no ``run_exists`` query comes before each rocket: checking a
    job out already says whether one was ready, and that query (a Firework and its
    launches read, then thrown away) is about a tenth of FireWorks' cost per job. Only
    while nothing is ready does it poll, without launching empty rockets.
    """
    import time

    from fireworks import FWorker
    from fireworks.core.rocket_launcher import launch_rocket

    project = find_project()
    worker = load_fworker(project.fworker_file(category)) if category else FWorker(category="")
    launchpad = load_launchpad()
    launch_directory = project.directory / ".fff" / "launches"
    launch_directory.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    ran = 0
    try:
        os.chdir(launch_directory)
        with output_to(log_file):
            while True:
                if launch_rocket(launchpad, worker):
                    ran += 1
                    if on_rocket:
                        on_rocket()
                    continue
                while not launchpad.run_exists(worker):  # wait quietly for a job to be ready
                    if not launchpad.future_run_exists(worker):
                        return ran
                    time.sleep(0.5)
    finally:
        os.chdir(here)
