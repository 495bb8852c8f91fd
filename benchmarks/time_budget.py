"""Benchmark: where a campaign's wall time goes (training, MD, selection, reference, orchestration).

Run: ``.venv/bin/python benchmarks/time_budget.py [--quick]`` (runs workflows/water_xtb.yaml,
or tests/specs/tiny_water.yaml with --quick, in a temporary project like `fff run`), or
``--project DIR [--campaign ID]`` for a campaign already run there. The shares come from
the records the campaign keeps: ``models``, ``segments``, ``selections`` and
``reference_results`` ``wall_time``; orchestration is the total wall time minus their sum
(it holds the ingest's reference MD, imports, model loading, FireWorks and jobflow).
Writes ``benchmarks/results/time_budget.json``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import common


def time_budget(records: dict) -> dict:
    """Seconds, share of the wall time, task count and median per kind of task."""
    total = common.campaign_wall_time(records)
    times = common.task_times(records)
    rows = {
        kind: {
            "seconds": sum(values),
            "share": sum(values) / total,
            "tasks": len(values),
            "median": statistics.median(values) if values else 0.0,
        }
        for kind, values in times.items()
    }
    orchestration = total - sum(row["seconds"] for row in rows.values())
    rows["orchestration"] = {
        "seconds": orchestration,
        "share": orchestration / total,
        "tasks": 0,
        "median": 0.0,
    }
    return {"wall_time": total, "kinds": rows}


def records_to_measure(arguments: argparse.Namespace) -> dict:
    """Records of the campaign in --project, else of a campaign run here now."""
    if arguments.project:
        return common.campaign_records(arguments.project.resolve(), arguments.campaign)
    spec_file = common.REPO / ("tests/specs/tiny_water.yaml" if arguments.quick else arguments.spec)
    return common.run_campaign(common.temporary_project(), common.campaign_spec(spec_file))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny test campaign (30 s)")
    parser.add_argument("--spec", default="workflows/water_xtb.yaml", help="campaign to run")
    parser.add_argument("--project", type=Path, help="a project holding a finished campaign")
    parser.add_argument("--campaign", help="its campaign id (default: the newest)")
    arguments = parser.parse_args()
    note = common.machine_note()
    records = records_to_measure(arguments)
    figures = time_budget(records)
    campaign = records["campaign"]
    rows = [
        (kind, row["tasks"], row["seconds"], 100 * row["share"], row["median"])
        for kind, row in figures["kinds"].items()
    ]
    title = (
        f"time budget of {campaign['_id']} ({campaign['status']}, "
        f"{figures['wall_time']:.1f} s wall time; {note})"
    )
    common.print_table(title, ("kind", "tasks", "seconds", "share %", "median s"), rows)
    figures |= {"campaign_id": campaign["_id"], "machine": note, "quick": arguments.quick}
    figures["task_times"] = common.task_times(records)
    common.write_results("time_budget", figures)


if __name__ == "__main__":
    main()
