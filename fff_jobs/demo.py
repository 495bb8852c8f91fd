"""A tiny self-growing workflow proving the plumbing: a GPU job adds a CPU detour and GPU addition.

It has the shape of one turn of the campaign (sample, audit, retrain) with
arithmetic standing in for the science, so routing, dynamic growth and output
references across Fireworks can be checked in seconds.
"""

from __future__ import annotations

import os
import socket

from jobflow import Flow, Response, job

from fff_jobs.routing import CPU, GPU, route


def _where() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


@job
def draw_samples(count: int, seed: int) -> Response:
    """Stand-in for an MD segment (GPU): adds its audit as a detour and a refit as an addition.

    jobflow refuses references from dynamically created jobs to jobs outside
    them, so new jobs get small concrete values (large data goes by database id).
    """
    samples = [(seed * 7919 + 104729 * index) % 1000 / 1000 for index in range(count)]
    audit = route(audit_samples(samples), CPU, priority=2)
    refit = route(fit_samples(samples), GPU)
    return Response(output={"samples": samples, **_where()}, detour=audit, addition=refit)


@job
def audit_samples(samples: list[float]) -> dict[str, object]:
    """Stand-in for an audit (CPU): passes the samples below 0.9."""
    return {"passed": sum(value < 0.9 for value in samples), "checked": len(samples), **_where()}


@job
def fit_samples(samples: list[float]) -> dict[str, object]:
    """Stand-in for training (GPU): the mean of the samples."""
    return {"mean": sum(samples) / len(samples), **_where()}


@job
def summarize(samples: list[float]) -> dict[str, object]:
    """Stand-in for bookkeeping (CPU): runs after the detour, on the sampler's stored output."""
    return {"count": len(samples), "total": sum(samples), **_where()}


def demo_flow(count: int = 5, seed: int = 1) -> Flow:
    """The demo workflow as submitted: the GPU sampler and its CPU summary."""
    sampler = route(draw_samples(count, seed), GPU)
    summary = route(summarize(sampler.output["samples"]), CPU)
    return Flow([sampler, summary], name="fff demo")
