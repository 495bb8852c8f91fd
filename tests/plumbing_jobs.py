"""Jobs for the plumbing tests: each records which worker ran it, in the project's database."""

from __future__ import annotations

import os

from jobflow import Flow, job

from fff_jobs.config import project_database
from fff_jobs.routing import CPU, GPU, route


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
