"""Benchmark: does a campaign learn more per reference calculation than random sampling?

Run: ``.venv/bin/python benchmarks/data_efficiency.py [--quick | --full] [--budgets 25 50 100]
[--seeds 0 1 2] [--workers 2] [--spec FILE] [--set KEY=VALUE ...] [--records FILE ...]``.
For each seed a campaign (the spec with ``num_to_run`` set to the largest budget) runs in
its own temporary project, as `fff run` runs it (``--records``: campaigns already run,
read back). Then, for every budget B, three training sets of the campaign's initial data
plus B frames:

- *campaign*: the first B results the campaign paid for (audits and selected frames);
- *random ML-MD*: B frames drawn uniformly from the campaign's own frame pool as it stood
  when the campaign had stored its first B results (every frame its ML-driven MD segments
  had kept by then), labelled by the reference;
- *random reference MD* (the ideal, too expensive with real DFT): B frames drawn from MD
  driven by the reference itself, from the same starting structures at the same
  temperatures and thermostat.

Each set trains a fresh committee identically (the spec's model and training settings,
cold start, ``committee_size`` members; 4 at least), scored with its committee mean on a
hold-out set: reference MD at the lowest and highest temperature of the spec's ladder, of
clusters built from another seed, two waters larger than the largest starting structure
included. Figures: force MAE, RMSE and 95th percentile of the force-component errors,
energy MAE per atom, and the stability of the committee trained on the largest budget
(MD steps, driven by its mean, at the highest temperature before a guard trips). Writes
``benchmarks/results/data_efficiency.json`` and ``.png``.

Modes: ``--quick`` the tiny test campaign (budgets 10 20, one seed: a smoke test);
default: ``workflows/water_xtb.yaml`` at budgets 24 48 96, seeds 0 1 2 (about 2 hours
on 2 CPU cores); ``--full`` budgets 50 100 200, seeds 0 1 2 (for a GPU machine: set
``--workers`` to the processes it can run at once).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tblite beside other processes (see DESIGN.md)

import argparse
import contextlib
import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from datetime import datetime
from pathlib import Path

import common
import numpy as np
from ase import Atoms

QUICK_SPEC = "tests/specs/tiny_water.yaml"
STRATEGIES = ("campaign", "random ML-MD", "random reference MD")
METRICS = ("force_mae", "force_rmse", "force_p95", "energy_mae_mev_per_atom")
LABELS = {
    "force_mae": "force MAE (eV/Å)",
    "force_rmse": "force RMSE (eV/Å)",
    "force_p95": "95th percentile |force error| (eV/Å)",
    "energy_mae_mev_per_atom": "energy MAE (meV/atom)",
}
MIN_COMMITTEE = 4
STABILITY_STEPS = 2000  # the most MD steps counted per stability run (--stability-steps)
KEPT_PER_RUN = 10  # labelled frames of a reference MD run of `steps` steps (its second half)


def set_by_the_benchmark(seed: int, committee_size: int, budget: int) -> dict[str, object]:
    """The spec settings the benchmark chooses itself (``--set`` may not change them)."""
    return {
        "num_to_run": budget,
        "training.seed": seed,
        "selection.seed": seed,
        "training.committee_size": committee_size,
        "system.water_clusters.seed": seed,
        # the campaign's own last committee is never scored (every strategy's is trained
        # afresh), so it need not train longer
        "training.final_max_epochs": None,
        "training.final_loss": None,
        "training.final_holdout": True,
    }


def campaign_specs(arguments: argparse.Namespace) -> list[dict]:
    """One spec per seed: the largest budget, training and selection seeded, >= 4 members."""
    path = common.REPO / (QUICK_SPEC if arguments.quick else arguments.spec)
    spec = common.campaign_spec(path)
    size = max(spec.get("training", {}).get("committee_size", 8), MIN_COMMITTEE)
    return [
        common.campaign_spec(
            path, **arguments.set, **set_by_the_benchmark(seed, size, max(arguments.budgets))
        )
        for seed in arguments.seeds
    ]


def setting(text: str) -> tuple[str, object]:
    """A ``--set`` item: ``dotted.key=value``, the value read as YAML."""
    import yaml

    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: write a change as dotted.key=value")
    return key, yaml.safe_load(value)


def md_frames(
    starts: list[Atoms], temperatures: list[float], spec, steps: int, kept: int = KEPT_PER_RUN
) -> list[Atoms]:
    """Reference-driven MD (the spec's thermostat) of each start at each temperature: ``kept``
    evenly spaced frames of the second half of each run, labelled by the reference."""
    from fff_jobs.reference import compute_references, make_calculator
    from fff_jobs.sampling import run_segment

    calculator = make_calculator(spec.reference)
    frames = []
    for index, atoms in enumerate(starts):
        for temperature in temperatures:
            segment = run_segment(
                atoms, calculator, spec.md, steps, 2 * kept, seed=index, temperature=temperature
            )
            frames += [frame.to_atoms() for frame in segment.frames[kept:]]
    return [r.to_atoms() for r in compute_references(frames, spec.reference) if r.success]


def holdout_set(spec, steps: int) -> list[Atoms]:
    """Reference MD of clusters no campaign starts from, up to two waters beyond the largest."""
    from fff_jobs.structures import water_cluster

    clusters = spec.system.water_clusters
    rng = np.random.default_rng(2024)
    sizes = sorted({clusters.min_waters, clusters.max_waters, clusters.max_waters + 2})
    starts = [water_cluster(size, clusters, rng) for size in sizes for _ in range(2)]
    ladder = spec.md.temperatures
    return md_frames(starts, sorted({min(ladder), max(ladder)}), spec, steps)


def reference_md_pool(spec, steps: int, size: int) -> list[Atoms]:
    """The ideal baseline's pool of at least ``size`` frames: reference MD from the campaign's
    starting structures, each trajectory at the temperature the campaign gives it, run
    longer where it must give more frames, at the same spacing."""
    from fff_jobs.steering import trajectory_starts
    from fff_jobs.structures import water_search_space

    starts = water_search_space(spec.system.water_clusters)
    plan = trajectory_starts([len(a) for a in starts], spec.trajectories, spec.md.temperatures)
    # 10 % more than asked, for failed calculations
    kept = max(KEPT_PER_RUN, math.ceil(size * 11 / (10 * len(plan))))
    frames = []
    for structure, temperature in plan:
        frames += md_frames(
            [starts[structure]], [temperature], spec, steps * kept // KEPT_PER_RUN, kept
        )
    return frames


def campaign_frames(records: dict) -> tuple[list[Atoms], list[Atoms | None], list[Atoms]]:
    """Initial data, budgeted results in the order they were stored, and the frame pool."""
    from fff_jobs.reference import ReferenceResult
    from fff_jobs.structures import Frame

    fields = ReferenceResult.model_fields
    results = [
        (doc["source"], ReferenceResult.model_validate({k: doc[k] for k in fields if k in doc}))
        for doc in records["reference_results"]
    ]
    initial = [r.to_atoms() for source, r in results if source == "initial" and r.success]
    budgeted = [r.to_atoms() if r.success else None for source, r in results if source != "initial"]
    pool = [Frame.model_validate(doc["frame"]).to_atoms() for doc in records["frame_pool"]]
    return initial, budgeted, pool


def pooled_by_budget(records: dict, budgets: list[int]) -> dict[int, list[int]]:
    """For each budget B, the indices of the pool frames stored by the time the campaign had
    stored its first B budgeted results: the MD a random sampler spending B would have had.

    A campaign run to a larger budget keeps sampling after B, and its later MD (run longer
    by better models) must not lend the random baseline at B frames the campaign at B
    never saw.
    """
    pool = records["frame_pool"]
    if any("stored_at" not in doc for doc in pool):
        raise SystemExit(
            "these records' pooled frames carry no stored_at (an fff older than the "
            "benchmark's pool at each budget): run the campaigns again"
        )
    stored = [datetime.fromisoformat(doc["stored_at"]) for doc in pool]
    budgeted = [doc for doc in records["reference_results"] if doc["source"] != "initial"]
    by_budget = {}
    for budget in budgets:
        cutoff = max(datetime.fromisoformat(doc["stored_at"]) for doc in budgeted[:budget])
        by_budget[budget] = [index for index, stamp in enumerate(stored) if stamp <= cutoff]
    return by_budget


def drawn(pool: list[Atoms], count: int, seed: int, reference=None) -> list[Atoms | None]:
    """``count`` frames drawn uniformly, labelled by the reference."""
    from fff_jobs.reference import compute_references

    if len(pool) < count:
        raise SystemExit(
            f"a pool of {len(pool)} frames cannot give {count}: lower the largest budget"
        )
    order = np.random.default_rng(seed).permutation(len(pool))[:count]
    chosen = [pool[i] for i in order]
    if reference is None:
        return chosen
    return [r.to_atoms() if r.success else None for r in compute_references(chosen, reference)]


def errors(models, holdout: list[Atoms]) -> dict[str, float]:
    """Committee-mean errors on the hold-out set."""
    from fff_jobs.committee import predict_committee

    prediction = predict_committee(models, holdout, compute_forces=True)
    sizes = np.array([len(atoms) for atoms in holdout])
    reference_energy = np.array([atoms.get_potential_energy() for atoms in holdout])
    energy_error = (prediction.energies.mean(axis=0) - reference_energy) / sizes
    force_error = np.abs(
        np.concatenate(
            [
                (forces.mean(axis=0) - atoms.get_forces()).ravel()
                for forces, atoms in zip(prediction.forces, holdout, strict=True)
            ]
        )
    )
    return {
        "energy_mae_mev_per_atom": 1e3 * float(np.abs(energy_error).mean()),
        "force_mae": float(force_error.mean()),
        "force_rmse": float(np.sqrt((force_error**2).mean())),
        "force_p95": float(np.percentile(force_error, 95)),
    }


def stability(models, starts: list[Atoms], spec, most_steps: int) -> float:
    """Mean MD steps, driven by the committee mean at the highest temperature, before a guard
    (overlap, huge forces, flying apart, NaN) trips; at most ``most_steps`` each."""
    from mace.calculators import MACECalculator

    from fff_jobs.sampling import run_segment

    device = str(next(models[0].parameters()).device)
    dtype = str(next(models[0].parameters()).dtype).removeprefix("torch.")
    calculator = MACECalculator(models=models, device=device, default_dtype=dtype)
    temperature = max(spec.md.temperatures)
    steps = [
        run_segment(atoms, calculator, spec.md, most_steps, 1, index, temperature).steps
        for index, atoms in enumerate(starts)
    ]
    return float(np.mean(steps))


def train_and_score(task: dict) -> dict:
    """One committee trained on a task's frames; its hold-out errors (and stability)."""
    import mace  # noqa: F401  (mace before e3nn)
    import torch

    from fff_jobs.spec import CampaignSpec
    from fff_jobs.training import member_seed, train_member

    torch.set_num_threads(1)
    spec = CampaignSpec.model_validate(task["spec"])
    frames = [atoms for atoms in task["frames"] if atoms is not None]
    seed = spec.training.seed
    models = [
        train_member(frames, spec.model, spec.training, member_seed(seed, 0, member)).model
        for member in range(spec.training.committee_size)
    ]
    figures = errors(models, task["holdout"]) | {"training_frames": len(frames)}
    if task["stability_starts"]:
        figures["stability_steps"] = stability(
            models, task["stability_starts"], spec, task["stability_steps"]
        )
    return {key: task[key] for key in ("seed", "strategy", "budget")} | figures


def training_tasks(
    records, spec_dict, budgets, holdout, ideal_pool, stability_steps: int
) -> list[dict]:
    """Every (strategy, budget) training set of one seed, and the budget-0 start."""
    from fff_jobs.spec import CampaignSpec

    spec = CampaignSpec.model_validate(spec_dict)
    seed = spec.training.seed
    initial, budgeted, pool = campaign_frames(records)
    ml_md = {
        budget: drawn([pool[i] for i in pooled], budget, seed, spec.reference)
        for budget, pooled in pooled_by_budget(records, budgets).items()
    }
    ideal = drawn(ideal_pool, max(budgets), seed)
    largest = max(len(atoms) for atoms in holdout)
    starts = [atoms for atoms in holdout if len(atoms) == largest][::10]
    base = {"seed": seed, "spec": spec_dict, "holdout": holdout, "stability_starts": []}
    base["stability_steps"] = stability_steps
    tasks = [base | {"strategy": "initial data", "budget": 0, "frames": initial}]
    for budget in budgets:
        stable = starts if budget == max(budgets) and stability_steps else []
        extra = {
            "campaign": budgeted[:budget],
            "random ML-MD": ml_md[budget],
            "random reference MD": ideal[:budget],
        }
        for strategy, frames in extra.items():
            tasks.append(
                base
                | {"strategy": strategy, "budget": budget, "stability_starts": stable}
                | {"frames": initial + frames, "budget_used": len(frames)}
            )
    return tasks


def summarise(rows: list[dict], budgets: list[int]) -> dict:
    """Strategy -> budget -> figure -> mean, min and max over the seeds (budget 0 shared)."""
    summary: dict = {}
    for strategy in STRATEGIES:
        summary[strategy] = {}
        for budget in [0, *budgets]:
            name = "initial data" if budget == 0 else strategy
            chosen = [r for r in rows if r["strategy"] == name and r["budget"] == budget]
            figures = [k for k in (*METRICS, "stability_steps") if k in chosen[0]]
            summary[strategy][budget] = {
                key: {
                    "mean": float(np.mean([r[key] for r in chosen])),
                    "min": float(np.min([r[key] for r in chosen])),
                    "max": float(np.max([r[key] for r in chosen])),
                }
                for key in figures
            }
    return summary


def targets(summary: dict, budgets: list[int]) -> dict:
    """The issue's three targets, each with the figures that decide it."""

    def mean(strategy: str, budget: int, metric: str) -> float:
        return summary[strategy][budget][metric]["mean"]

    halving = {
        budget: (
            mean("campaign", budget, "force_mae"),
            mean("random ML-MD", 2 * budget, "force_mae"),
        )
        for budget in budgets
        if budget >= 50 and 2 * budget in budgets
    }
    tail = {
        b: (mean("campaign", b, "force_p95"), mean("random ML-MD", b, "force_p95")) for b in budgets
    }
    ideal = {
        b: (mean("campaign", b, "force_mae"), mean("random reference MD", b, "force_mae"))
        for b in budgets
    }
    return {
        "campaign at B >= 50 reaches random ML-MD at 2B (force MAE)": {
            "figures": halving,
            "met": all(a <= b for a, b in halving.values()) if halving else None,
        },
        "campaign 95th percentile below random ML-MD at every budget": {
            "figures": tail,
            "met": all(a < b for a, b in tail.values()),
        },
        "campaign within 1.3x of random reference MD (force MAE)": {
            "figures": ideal,
            "met": all(a <= 1.3 * b for a, b in ideal.values()),
        },
    }


def plot(summary: dict, budgets: list[int], path: Path) -> None:
    """Each metric against budget, the three strategies, spread over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.8))
    x = [0, *budgets]
    for axis, metric in zip(axes, METRICS, strict=True):
        for strategy in STRATEGIES:
            rows = [summary[strategy][b][metric] for b in x]
            axis.plot(x, [r["mean"] for r in rows], marker="o", label=strategy)
            axis.fill_between(x, [r["min"] for r in rows], [r["max"] for r in rows], alpha=0.2)
        axis.set_xlabel("reference calculations (budget)")
        axis.set_ylabel(LABELS[metric])
        axis.set_yscale("log")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")


def table_rows(summary: dict, budgets: list[int]) -> list[tuple]:
    """One row per budget and strategy: each figure's mean [min-max] over the seeds."""
    rows = []
    for budget in budgets:
        for strategy in STRATEGIES:
            figures = summary[strategy][budget]
            cells = [
                f"{figures[m]['mean']:.4g} [{figures[m]['min']:.3g}-{figures[m]['max']:.3g}]"
                for m in METRICS
            ]
            stable = figures.get("stability_steps")
            rows.append((budget, strategy, *cells, f"{stable['mean']:.0f}" if stable else ""))
    return rows


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny test campaign, one seed")
    parser.add_argument("--full", action="store_true", help="budgets 50 100 200 (a GPU machine)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[24, 48, 96])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--spec", default="workflows/water_xtb.yaml")
    parser.add_argument("--workers", type=int, default=2, help="training processes at once")
    parser.add_argument(
        "--campaign-workers",
        type=int,
        default=1,
        help="workers per campaign; above 1 the campaigns run on a jongodb test server",
    )
    parser.add_argument(
        "--stability-steps",
        type=int,
        default=STABILITY_STEPS,
        help="the most MD steps of each stability run (0: no stability runs)",
    )
    parser.add_argument(
        "--set",
        type=setting,
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="change the spec, e.g. training.max_epochs=20 retrain_freq=16 (seeds, committee "
        "size and budget stay the benchmark's)",
    )
    parser.add_argument(
        "--records",
        nargs="+",
        default=[],
        help="records.json of campaigns already run with these settings, one per seed in "
        "order (each campaign's project keeps one): train and score without running them again",
    )
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.budgets, arguments.seeds = [10, 20], [0]
    elif arguments.full:
        arguments.budgets = [50, 100, 200]
    arguments.set = dict(arguments.set)
    for key in sorted(arguments.set.keys() & set_by_the_benchmark(0, 0, 0).keys()):
        parser.error(f"--set {key}: the benchmark sets it (use --budgets and --seeds)")
    if arguments.records and len(arguments.records) != len(arguments.seeds):
        parser.error(
            f"--records names {len(arguments.records)} file(s) for {len(arguments.seeds)} "
            "seed(s): give one records.json per seed, in the order of --seeds"
        )
    return arguments


def main() -> None:
    arguments = parse_arguments()
    from fff_jobs.spec import CampaignSpec

    note, started = common.machine_note(), time.perf_counter()
    specs = campaign_specs(arguments)
    first = CampaignSpec.model_validate(specs[0])
    steps = 60 if arguments.quick else 400
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(len(specs) + 2) as background:
        uri = None
        if arguments.campaign_workers > 1 and not arguments.records:
            uri = stack.enter_context(common.jongodb_server())
        if arguments.records:
            campaigns = [
                background.submit(recorded_campaign, Path(path), seed, max(arguments.budgets))
                for path, seed in zip(arguments.records, arguments.seeds, strict=True)
            ]
        else:
            campaigns = [
                background.submit(run_one_campaign, spec, uri, arguments.campaign_workers)
                for spec in specs
            ]
        holdout = background.submit(holdout_set, first, steps)
        pools = [
            background.submit(
                reference_md_pool, CampaignSpec.model_validate(spec), steps, max(arguments.budgets)
            )
            for spec in specs
        ]
        records = [campaign.result() for campaign in campaigns]
        holdout, pools = holdout.result(), [pool.result() for pool in pools]
    print(f"campaigns and pools ready after {time.perf_counter() - started:.0f} s")
    tasks = [
        task
        for record, spec, pool in zip(records, specs, pools, strict=True)
        for task in training_tasks(
            record, spec, arguments.budgets, holdout, pool, arguments.stability_steps
        )
    ]
    rows = train_all(tasks, arguments.workers)
    summary = summarise(rows, arguments.budgets)
    verdicts = targets(summary, arguments.budgets)
    headers = ("budget", "strategy", *METRICS, "stable MD steps")
    title = (
        f"hold-out ({len(holdout)} frames): mean [min-max] over seeds {arguments.seeds}; "
        f"{time.perf_counter() - started:.0f} s; {note}"
    )
    common.print_table(title, headers, table_rows(summary, arguments.budgets))
    outcome = {True: "met", False: "NOT met", None: "not measured (budgets lack B >= 50 and 2B)"}
    for name, verdict in verdicts.items():
        print(f"target: {name}: {outcome[verdict['met']]} {verdict['figures']}")
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    plot(summary, arguments.budgets, common.RESULTS / "data_efficiency.png")
    figures = {"machine": note, "budgets": arguments.budgets, "seeds": arguments.seeds}
    figures |= {"specs": specs, "holdout_frames": len(holdout), "rows": rows}
    figures |= {"campaign_ids": [r["campaign"]["_id"] for r in records]}
    figures |= {"summary": summary, "targets": verdicts}
    common.write_results("data_efficiency", figures)


def train_all(tasks: list[dict], workers: int) -> list[dict]:
    """Every task's figures; each row is also appended to a JSON-lines file as it comes in,
    so a run cut short keeps what it measured."""
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    partial = common.RESULTS / "data_efficiency_rows.jsonl"
    partial.write_text("")
    context = multiprocessing.get_context("spawn")
    rows = []
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for future in as_completed([pool.submit(train_and_score, task) for task in tasks]):
            rows.append(future.result())
            with partial.open("a") as handle:
                handle.write(json.dumps(rows[-1]) + "\n")
            print(f"  {rows[-1]}", flush=True)
    return rows


def recorded_campaign(path: Path, seed: int, budget: int) -> dict:
    """The records of a campaign already run for ``seed`` (a records.json file) that spent a
    budget of ``budget`` calculations."""
    records = json.loads(path.read_text())
    recorded = records["campaign"]["spec"]["training"]["seed"]
    if recorded != seed:
        raise SystemExit(f"{path} holds a campaign of seed {recorded}, not {seed}: order --records")
    if records["campaign"]["budget"]["num_to_run"] < budget:
        raise SystemExit(f"{path} holds a campaign with a budget below {budget}: run it again")
    return spent_budget(records, str(path))


def spent_budget(records: dict, source: str) -> dict:
    """A campaign's records, if it spent its whole budget (else there are not frames enough
    for every budget: stop, saying so)."""
    campaign = records["campaign"]
    spent, budget = campaign["budget"]["spent"], campaign["budget"]["num_to_run"]
    if spent < budget:
        raise SystemExit(
            f"{source}: campaign {campaign['_id']} spent {spent} of {budget} calculations "
            f"({campaign['status']}, {campaign.get('stop_reason')}): run it again"
        )
    return records


def run_one_campaign(spec: dict, server: str | None, workers: int) -> dict:
    """A campaign in its own temporary project, run as `fff run` runs it (or by several
    workers, on the server); its records."""
    project = common.temporary_project(prefix="fff-efficiency-")
    if server is not None:
        common.use_server(project, f"{server}/efficiency{spec['training']['seed']}")
    # no time limit worth the name: a killed campaign loses everything (the embedded store
    # is written at exit), and several campaigns at once on a busy machine take hours
    records = common.run_campaign(project, spec, timeout=12 * 3600, workers=workers)
    campaign = records["campaign"]
    print(f"  campaign {campaign['_id']} in {project}: {campaign['status']}, spent", end=" ")
    print(f"{campaign['budget']['spent']} of {campaign['budget']['num_to_run']}", flush=True)
    return spent_budget(records, str(project))


if __name__ == "__main__":
    main()
