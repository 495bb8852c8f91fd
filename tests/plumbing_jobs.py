"""Jobs for the plumbing tests: each records which worker ran it, in the project's database."""

from __future__ import annotations

import os

from jobflow import Flow, Response, job

from fff_jobs.config import project_database
from fff_jobs.routing import CPU, GPU, route
from fff_jobs.workers import grow


@job
def record_execution(index: int, upstream: int | None = None) -> int:
    """Insert one document per run into `executions`; a job run twice shows up twice."""
    project_database().executions.insert_one(
        {"index": index, "worker": os.environ.get("FFF_TEST_WORKER"), "pid": os.getpid()}
    )
    return index + (upstream or 0)


def mixed_flow(pairs: int) -> Flow:
    """`pairs` GPU jobs each feeding a CPU job, plus `pairs` independent CPU jobs."""
    jobs = []
    for index in range(pairs):
        gpu_job = route(record_execution(index), GPU)
        cpu_job = route(record_execution(1000 + index, gpu_job.output), CPU)
        jobs += [gpu_job, cpu_job, route(record_execution(2000 + index), CPU)]
    return Flow(jobs, name="mixed categories")


CHAIN_WORKFLOW_JOBS = 10


@job
def chain_link(index: int, length: int) -> Response:
    """Record this link and add the next through `grow`, at most 10 jobs per workflow."""
    project_database().executions.insert_one({"index": index, "pid": os.getpid()})
    if index + 1 == length:
        return Response(output=index)
    following = route(chain_link(index + 1, length), CPU if index % 2 else GPU)
    return grow(index, [following], max_workflow_jobs=CHAIN_WORKFLOW_JOBS, workflow_name="chain")


def chain_flow(length: int) -> Flow:
    """A chain of `length` jobs that exists only as its first link until it runs."""
    return Flow([route(chain_link(0, length), GPU)], name="chain")


@job
def branching_link(index: int, length: int) -> Response:
    """Record this link; add the next link and, as a detour, a job that records a leaf.

    Completing it writes two new Fireworks, so FireWorks' update of the workflow has
    a window between them.
    """
    project_database().executions.insert_one({"index": index, "pid": os.getpid()})
    if index + 1 == length:
        return Response(output=index)
    leaf = route(record_execution(1000 + index), CPU)
    following = route(branching_link(index + 1, length), GPU)
    return Response(output=index, addition=Flow([following]), detour=leaf)


def branching_flow(length: int) -> Flow:
    """A chain of `length` links, each adding the next and a leaf: 2 * length - 1 jobs in all."""
    return Flow([route(branching_link(0, length), GPU)], name="branching chain")
