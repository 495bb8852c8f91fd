"""Benchmark: orchestration per job, fff-jobs' path against plain FireWorks, and the database
round trips each campaign job makes.

Run: ``.venv/bin/python benchmarks/overhead.py [--quick] [--sizes 100 500 2000]``
(the jongodb test server must be installed: ``bash scripts/test.sh --co -q``).

Round trips: the tiny test campaign runs on a jongodb server with pymongo's command
monitoring (:class:`RoundTrips`); every command sent while a job runs is counted for
that job, as fff's own when fff_jobs code sent it (a query or update of fff's
collections, GridFS included, or fff's look-ups of FireWorks' collections), else as
FireWorks' or jobflow's (the workflow fff adds to, the job store).

Seconds: for each store (embedded mongomock, and a jongodb server) and each workflow
size N, each arm runs in a fresh project, in its own process, timed from the first
rocket to the last (imports and submission are timed apart):

- ``fireworks``: N Fireworks with an empty ``PyTask`` in one workflow (the baseline);
- ``fff``: a jobflow Flow of N empty ``@job`` s routed with :func:`fff_jobs.routing.route`
  and added with :func:`fff_jobs.workers.submit`;
- ``fff-growing``: one job that adds the next, N in all, as a campaign grows: through
  :func:`fff_jobs.workers.grow`, which starts a new workflow every ``max_workflow_jobs``
  (the campaign's default);
- ``one-workflow``: the same chain grown through plain ``Response(addition=...)``, so
  that one workflow holds all N jobs (what ``grow`` avoids).

All three run through :func:`fff_jobs.workers.run_until_done` (the rocket loop of
`fff run`). The per-job cost is compared with the median real task time of a campaign
(``benchmarks/results/time_budget.json`` if present, else a tiny campaign run here).
Writes ``benchmarks/results/overhead.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import common
import pymongo
from jobflow import Flow, Response, job

ARMS = ("fireworks", "fff", "fff-growing", "one-workflow")


@job
def empty() -> None:
    """A job that does nothing."""


@job
def link(index: int, length: int, split: bool) -> Response:
    """Add the next job of a chain of ``length``, in new workflows as they fill if ``split``."""
    from fff_jobs.routing import route
    from fff_jobs.spec import WorkerSettings
    from fff_jobs.workers import grow

    if index + 1 >= length:
        return Response(output=index)
    following = route(link(index + 1, length, split), None)
    following.name = f"link {index + 1}"  # unique, as campaign jobs are: grow looks jobs up by name
    if not split:
        return Response(output=index, addition=Flow([following]))
    limit = WorkerSettings().max_workflow_jobs
    return grow(index, [following], max_workflow_jobs=limit, workflow_name="fff growing chain")


def _submit(arm: str, size: int) -> None:
    """Add one arm's workflow of ``size`` jobs to the project's LaunchPad."""
    from fff_jobs.config import load_launchpad
    from fff_jobs.routing import route
    from fff_jobs.workers import submit

    if arm == "fireworks":
        from fireworks import Firework, PyTask, Workflow

        fireworks = [Firework(PyTask(func="time.time"), name=f"empty {i}") for i in range(size)]
        load_launchpad().add_wf(Workflow(fireworks, name="plain fireworks"))
    elif arm == "fff":
        submit(Flow([route(empty(), None) for _ in range(size)], name="fff empty jobs"))
    else:
        first = route(link(0, size, split=arm == "fff-growing"), None)
        submit(Flow([first], name="fff growing chain"))


def measure_arm(arm: str, size: int) -> dict:
    """Submit one arm's workflow and run it here; seconds in all and per rocket."""
    from fff_jobs.config import activate, load_launchpad

    directory = activate().directory
    from fff_jobs.workers import run_until_done

    load_launchpad()
    start = time.perf_counter()
    _submit(arm, size)
    submitted = time.perf_counter()
    stamps = [submitted]
    ran = run_until_done(
        on_rocket=lambda: stamps.append(time.perf_counter()),
        log_file=directory / "rockets.log",
    )
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    tenth = max(1, len(gaps) // 10)
    return {
        "jobs": ran,
        "submit_s": submitted - start,
        "run_s": stamps[-1] - submitted,
        "per_job_s": (stamps[-1] - submitted) / max(ran, 1),
        "median_job_s": statistics.median(gaps) if gaps else 0.0,
        "first_tenth_per_job_s": statistics.mean(gaps[:tenth]) if gaps else 0.0,
        "last_tenth_per_job_s": statistics.mean(gaps[-tenth:]) if gaps else 0.0,
    }


SERVER_CHATTER = frozenset({"hello", "ismaster", "isMaster", "ping", "endSessions", "buildInfo"})


class RoundTrips(pymongo.monitoring.CommandListener):
    """Counts each campaign job's commands: fff's own apart from FireWorks' and jobflow's."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, int]] = defaultdict(lambda: {"fff": 0, "other": 0})

    def started(self, event) -> None:
        from jobflow import CURRENT_JOB

        running = CURRENT_JOB.job
        if running is None or event.command_name in SERVER_CHATTER:
            return
        self.jobs[running.name]["fff" if _sent_by_fff() else "other"] += 1

    def succeeded(self, event) -> None:
        """Nothing to count."""

    def failed(self, event) -> None:
        """Nothing to count."""


def _sent_by_fff() -> bool:
    """Whether the code that called pymongo (or gridfs) lies in fff_jobs."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not any(part in name for part in ("/pymongo/", "/gridfs/", "/bson/", __file__)):
            return "/fff_jobs/" in name
        frame = frame.f_back
    return False


def count_round_trips() -> dict:
    """Run the tiny campaign here (on a server) and count each job's database round trips."""
    listener = RoundTrips()
    pymongo.monitoring.register(listener)
    from fff_jobs.config import activate

    directory = activate().directory
    from fff_jobs.jobs import submit_campaign
    from fff_jobs.spec import CampaignSpec
    from fff_jobs.workers import run_until_done

    campaign_id = submit_campaign(
        CampaignSpec.from_yaml(common.REPO / "tests/specs/tiny_water.yaml")
    )
    run_until_done(log_file=directory / "rockets.log")
    return {"campaign_id": campaign_id, "jobs": dict(listener.jobs)}


def round_trip_rows(jobs: dict[str, dict[str, int]]) -> list[tuple]:
    """Per kind of job (and all): jobs, mean and largest fff round trips, mean of the others."""
    kinds: dict[str, list[dict[str, int]]] = defaultdict(list)
    for name, counts in jobs.items():
        kinds[name.split()[1]].append(counts)
    kinds["all jobs"] = list(jobs.values())
    return [
        (
            kind,
            len(counts),
            statistics.mean(c["fff"] for c in counts),
            max(c["fff"] for c in counts),
            statistics.mean(c["other"] for c in counts),
        )
        for kind, counts in kinds.items()
    ]


def measure_round_trips(uri: str) -> list[tuple]:
    """The tiny campaign in a fresh project on the server; its round trips per kind of job."""
    directory = common.temporary_project(prefix="fff-round-trips-")
    common.use_server(directory, f"{uri}/bench_round_trips")
    output = directory / "round_trips.json"
    script = str(Path(__file__).resolve())
    common.run_in_project(directory, str(common.PYTHON), script, "--round-trips", str(output))
    figures = json.loads(output.read_text())
    rows = round_trip_rows(figures["jobs"])
    headers = ("job", "jobs", "fff mean", "fff max", "FireWorks+jobflow mean")
    title = f"database round trips per job, campaign {figures['campaign_id']} (jongodb)"
    common.print_table(title, headers, rows)
    return rows


def run_arm(arm: str, size: int, uri: str | None) -> dict:
    """One arm in a fresh project (on the server if a URI is given), in its own process."""
    directory = common.temporary_project(prefix=f"fff-overhead-{arm}-")
    if uri:
        common.use_server(directory, f"{uri}/bench_{arm.replace('-', '_')}_{size}")
    output = directory / "arm.json"
    script = str(Path(__file__).resolve())
    common.run_in_project(
        directory, str(common.PYTHON), script, "--worker", arm, str(size), str(output)
    )
    return json.loads(output.read_text())


def measure_store(store: str, sizes: list[int], arms: list[str], uri: str | None) -> list[dict]:
    """Every arm at every size on one store, printing each figure as it comes."""
    rows = []
    for size in sizes:
        for arm in arms:
            figures = run_arm(arm, size, uri)
            rows.append({"store": store, "arm": arm, "size": size} | figures)
            print(f"  {store:8s} {arm:12s} N={size:5d}: {figures['per_job_s'] * 1e3:.1f} ms/job")
    return rows


def campaign_task_times(quick: bool) -> tuple[dict[str, list[float]], str]:
    """Real task times of a campaign by kind: from time_budget.json, else a tiny campaign."""
    saved = common.RESULTS / "time_budget.json"
    if saved.is_file():
        figures = json.loads(saved.read_text())
        return figures["task_times"], f"{figures['campaign_id']} (time_budget.json)"
    spec = common.campaign_spec(common.REPO / "tests/specs/tiny_water.yaml")
    records = common.run_campaign(common.temporary_project(), spec)
    return common.task_times(records), f"{records['campaign']['_id']} (run here)"


def share_rows(rows: list[dict], times: dict[str, list[float]]) -> list[tuple]:
    """Per kind of task: its median time and the fff per-job cost (largest N) as a share."""
    largest = max(row["size"] for row in rows)
    costs = {r["store"]: r["per_job_s"] for r in rows if r["arm"] == "fff" and r["size"] == largest}
    medians = {kind: statistics.median(values) for kind, values in times.items() if values}
    medians["all tasks"] = statistics.median(t for values in times.values() for t in values)
    return [
        (kind, median, *(100 * cost / median for cost in costs.values()))
        for kind, median in medians.items()
    ]


def summarise(rows: list[dict], median_task: float) -> list[tuple]:
    """Table rows: per-job cost, ratio to plain FireWorks, share of the median task time."""
    baseline = {(r["store"], r["size"]): r["per_job_s"] for r in rows if r["arm"] == "fireworks"}
    table = []
    for row in rows:
        ratio = row["per_job_s"] / baseline[(row["store"], row["size"])]
        row |= {"ratio_to_fireworks": ratio, "share_of_median_task": row["per_job_s"] / median_task}
        table.append(
            (
                row["store"],
                row["arm"],
                row["size"],
                1e3 * row["per_job_s"],
                1e3 * row["first_tenth_per_job_s"],
                1e3 * row["last_tenth_per_job_s"],
                ratio,
                100 * row["share_of_median_task"],
            )
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 50 and 200 only")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--stores", nargs="+", default=["embedded", "jongodb"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--round-trips", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        import overhead  # the jobs must be importable by name, not from __main__

        arm, size, output = arguments.worker
        Path(output).write_text(json.dumps(overhead.measure_arm(arm, int(size))))
        return
    if arguments.round_trips:
        Path(arguments.round_trips).write_text(json.dumps(count_round_trips()))
        return
    if "fireworks" not in arguments.arms:
        parser.error("--arms must include fireworks, the baseline every ratio is taken against")
    if not common.JONGODB.exists():
        parser.error(common.NO_JONGODB)
    note = common.machine_note()
    sizes = [50, 200] if arguments.quick else arguments.sizes
    with common.jongodb_server() as uri:
        round_trips = measure_round_trips(uri)
    common.write_results("overhead_round_trips", {"machine": note, "rows": round_trips})
    rows = []
    for store in arguments.stores:
        with contextlib.ExitStack() as stack:
            uri = stack.enter_context(common.jongodb_server()) if store == "jongodb" else None
            rows += measure_store(store, sizes, arguments.arms, uri)
        common.write_results("overhead_rows", {"machine": note, "rows": rows})  # so far
    times, source = campaign_task_times(arguments.quick)
    median_task = statistics.median(t for values in times.values() for t in values)
    headers = ("store", "arm", "N", "ms/job", "first 10%", "last 10%", "x FireWorks", "% task")
    title = f"orchestration per job (ms); median task {median_task:.3f} s in {source}; {note}"
    common.print_table(title, headers, summarise(rows, median_task))
    stores = [row["store"] for row in rows if row["arm"] == "fff"][:: len(sizes)]
    shares = share_rows(rows, times)
    title = f"fff per-job cost (N={max(sizes)}) as % of the median task time of {source}"
    common.print_table(title, ("kind", "median s", *(f"% {s}" for s in stores)), shares)
    figures = {"machine": note, "median_task_s": median_task, "median_task_source": source}
    figures |= {"shares": shares, "rows": rows, "round_trips": round_trips}
    common.write_results("overhead", figures)


if __name__ == "__main__":
    main()
