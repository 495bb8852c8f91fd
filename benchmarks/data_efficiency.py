"""Benchmark: hold-out error of the campaign's training sets against random sampling, per budget.

Run: ``.venv/bin/python benchmarks/data_efficiency.py [--quick] [--budgets 15 30 60]
[--seeds 0 1] [--spec FILE]``. For each seed a campaign (the spec with ``num_to_run``
set to the largest budget) runs in its own temporary project. For every budget k:

- *campaign*: the initial data plus the first k budgeted reference results (by
  ``sequence``; audits and selected frames, as the campaign paid for them);
- *random*: the same initial data plus k frames drawn uniformly from the campaign's
  frame pool (every frame its MD segments kept: the same models and temperature),
  labelled with the same reference.

Both get a fresh committee trained identically (:func:`fff_jobs.training.train_member`
with the spec's ModelSettings and TrainingSettings, cold start), evaluated with
:func:`fff_jobs.committee.predict_committee` (committee mean) on a hold-out set from
reference (GFN2-xTB) MD at two temperatures and two cluster sizes, built from other
structures than any campaign's. Writes ``benchmarks/results/data_efficiency.json`` and
``.png``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tblite beside other processes (see DESIGN.md)

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common
import numpy as np
from ase import Atoms

QUICK_SPEC = "tests/specs/tiny_water.yaml"
# --reduced: water_xtb's loop on 3-4 waters with a tiny 2-member committee and 15 epochs,
# sized so that budgets 12 24 48 and 2 seeds finish in about 20 minutes on 2 cores
REDUCED = {
    "name": "water_efficiency",
    "system.water_clusters.min_waters": 3,
    "system.water_clusters.max_waters": 4,
    "model.num_channels": 8,
    "model.num_interactions": 1,
    "model.radial_mlp": [16, 16],
    "model.mlp_irreps": "8x0e",
    "training.committee_size": 2,
    "training.max_epochs": 15,
    "training.patience": 5,
    "inference_chunk": 20,
    "retrain_freq": 12,
}


def campaign_specs(arguments: argparse.Namespace) -> list[dict]:
    """One spec per seed: num_to_run the largest budget, training and selection seeded."""
    if arguments.quick:
        path, changes = common.REPO / QUICK_SPEC, {}
    else:
        path, changes = common.REPO / arguments.spec, REDUCED if arguments.reduced else {}
    return [
        common.campaign_spec(
            path,
            **changes,
            num_to_run=max(arguments.budgets),
            **{"training.seed": seed, "selection.seed": seed},
        )
        for seed in arguments.seeds
    ]


def holdout_set(spec, sizes: tuple[int, int], steps: int, frames: int) -> list[Atoms]:
    """Reference-driven MD of fresh clusters (two sizes) at the spec's temperature and 1.5x."""
    from fff_jobs.reference import compute_references, make_calculator
    from fff_jobs.sampling import run_segment
    from fff_jobs.structures import water_cluster

    rng = np.random.default_rng(2024)  # other structures than the campaigns' (seed 0)
    calculator = make_calculator(spec.reference)
    structures = []
    for index, waters in enumerate(sizes):
        cluster = water_cluster(waters, spec.system.water_clusters, rng)
        for temperature in (spec.md.temperature, 1.5 * spec.md.temperature):
            md = spec.md.model_copy(update={"temperature": temperature, "thermostat": "none"})
            segment = run_segment(cluster, calculator, md, steps, frames, seed=100 + index)
            structures += [frame.to_atoms() for frame in segment.frames]
    results = compute_references(structures, spec.reference)
    return [result.to_atoms() for result in results if result.success]


def campaign_frames(records: dict) -> tuple[list[Atoms], list[Atoms], list[Atoms]]:
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


def random_frames(pool: list[Atoms], count: int, seed: int, reference) -> list[Atoms | None]:
    """``count`` pool frames drawn uniformly (nested across budgets), labelled by the reference."""
    from fff_jobs.reference import compute_references

    order = np.random.default_rng(seed).permutation(len(pool))[:count]
    results = compute_references([pool[i] for i in order], reference)
    return [result.to_atoms() if result.success else None for result in results]


def committee_errors(frames: list[Atoms], spec, holdout: list[Atoms]) -> dict[str, float]:
    """Train a fresh committee on ``frames``; its hold-out errors (committee mean)."""
    import mace  # noqa: F401  (mace before e3nn)

    from fff_jobs.committee import predict_committee
    from fff_jobs.training import member_seed, train_member

    models = [
        train_member(frames, spec.model, spec.training, member_seed(spec.training.seed, 0, m)).model
        for m in range(spec.training.committee_size)
    ]
    prediction = predict_committee(models, holdout, compute_forces=True)
    sizes = np.array([len(atoms) for atoms in holdout])
    reference_energy = np.array([atoms.get_potential_energy() for atoms in holdout])
    energy_error = (prediction.energies.mean(axis=0) - reference_energy) / sizes
    force_error = np.concatenate(
        [
            (forces.mean(axis=0) - atoms.get_forces()).ravel()
            for forces, atoms in zip(prediction.forces, holdout, strict=True)
        ]
    )
    return {
        "energy_mae_mev_per_atom": 1e3 * float(np.abs(energy_error).mean()),
        "force_mae": float(np.abs(force_error).mean()),
        "force_rmse": float(np.sqrt((force_error**2).mean())),
        "training_frames": len(frames),
    }


def learning_curves(records: dict, spec, budgets: list[int], holdout: list[Atoms]) -> dict:
    """Arm -> budget -> hold-out errors, for one campaign (one seed)."""
    initial, budgeted, pool = campaign_frames(records)
    drawn = random_frames(pool, max(budgets), spec.training.seed, spec.reference)
    curves: dict[str, dict[int, dict]] = {"campaign": {}, "random": {}}
    start = committee_errors(initial, spec, holdout)
    for arm, extra in (("campaign", budgeted), ("random", drawn)):
        curves[arm][0] = start
        for budget in budgets:
            frames = initial + [atoms for atoms in extra[:budget] if atoms is not None]
            errors = committee_errors(frames, spec, holdout)
            curves[arm][budget] = errors | {"budget_used": len(extra[:budget])}
            print(f"  seed {spec.training.seed} {arm:8s} budget {budget:4d}: {curves[arm][budget]}")
    return curves


def run_campaigns(specs: list[dict]) -> list[dict]:
    """Every seed's campaign, each in its own project, two at a time."""
    projects = [common.temporary_project(prefix="fff-efficiency-") for _ in specs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        records = list(pool.map(common.run_campaign, projects, specs))
    for project, record in zip(projects, records, strict=True):
        campaign = record["campaign"]
        print(f"  campaign {campaign['_id']} in {project}: {campaign['status']}, spent", end=" ")
        print(f"{campaign['budget']['spent']} of {campaign['budget']['num_to_run']}")
    return records


METRICS = ("energy_mae_mev_per_atom", "force_mae", "force_rmse")


def summarise(curves: list[dict], budgets: list[int]) -> dict:
    """Arm -> budget -> metric -> mean, min and max over the seeds; and the target's verdict."""
    summary: dict = {}
    for arm in ("campaign", "random"):
        summary[arm] = {
            budget: {
                metric: {
                    "mean": float(np.mean(values := [c[arm][budget][metric] for c in curves])),
                    "min": float(np.min(values)),
                    "max": float(np.max(values)),
                }
                for metric in METRICS
            }
            | {"budget_used": min(c[arm][budget].get("budget_used", 0) for c in curves)}
            for budget in [0, *budgets]
        }
    final = summary["random"][max(budgets)]["force_mae"]["mean"]
    reached = [b for b in budgets if summary["campaign"][b]["force_mae"]["mean"] <= final]
    summary["target"] = {
        "random_final_force_mae": final,
        "campaign_budget_reaching_it": min(reached) if reached else None,
        "met": bool(reached) and min(reached) <= max(budgets) / 2,
    }
    return summary


def plot(summary: dict, budgets: list[int], path: Path) -> None:
    """Energy MAE, force MAE and force RMSE against budget, both arms, spread over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 4))
    labels = ("energy MAE (meV/atom)", "force MAE (eV/A)", "force RMSE (eV/A)")
    x = [0, *budgets]
    for axis, metric, label in zip(axes, METRICS, labels, strict=True):
        for arm in ("campaign", "random"):
            rows = [summary[arm][b][metric] for b in x]
            mean = [r["mean"] for r in rows]
            axis.plot(x, mean, marker="o", label=arm)
            axis.fill_between(x, [r["min"] for r in rows], [r["max"] for r in rows], alpha=0.25)
        axis.set_xlabel("reference calculations (budget)")
        axis.set_ylabel(label)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")


def _spread(figures: dict) -> str:
    return f"{figures['mean']:.4g} [{figures['min']:.3g}-{figures['max']:.3g}]"


def table_rows(summary: dict, budgets: list[int]) -> list[tuple]:
    """One row per budget and arm: each metric's mean [min-max] over the seeds."""
    rows = []
    for budget in [0, *budgets]:
        for arm in ("campaign", "random"):
            figures = summary[arm][budget]
            used = figures["budget_used"]
            label = arm if used == budget or budget == 0 else f"{arm} (only {used} spent)"
            rows.append((budget, label, *(_spread(figures[metric]) for metric in METRICS)))
    return rows


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny test campaign, budget 20")
    parser.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 200, 400])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--spec", default="workflows/water_xtb.yaml")
    parser.add_argument("--reduced", action="store_true", help="a smaller committee and model")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.budgets = [10, 20]
    return arguments


def main() -> None:
    arguments = parse_arguments()
    from fff_jobs.spec import CampaignSpec

    note = common.machine_note()
    specs = campaign_specs(arguments)
    first = CampaignSpec.model_validate(specs[0])
    with ThreadPoolExecutor(max_workers=1) as background:
        running = background.submit(run_campaigns, specs)
        clusters = first.system.water_clusters
        steps, frames = (60, 6) if arguments.quick else (300, 20)
        holdout = holdout_set(first, (clusters.min_waters, clusters.max_waters), steps, frames)
        records = running.result()
    curves = [
        learning_curves(record, CampaignSpec.model_validate(spec), arguments.budgets, holdout)
        for record, spec in zip(records, specs, strict=True)
    ]
    summary = summarise(curves, arguments.budgets)
    headers = ("budget", "arm", "energy MAE meV/atom", "force MAE eV/A", "force RMSE eV/A")
    title = (
        f"hold-out errors ({len(holdout)} frames), mean [min-max] over seeds "
        f"{arguments.seeds}; {note}"
    )
    common.print_table(title, headers, table_rows(summary, arguments.budgets))
    print(f"target: {summary['target']}")
    plot(summary, arguments.budgets, common.RESULTS / "data_efficiency.png")
    figures = {"machine": note, "quick": arguments.quick, "budgets": arguments.budgets}
    figures |= {"seeds": arguments.seeds, "specs": specs, "holdout_frames": len(holdout)}
    figures |= {"campaign_ids": [r["campaign"]["_id"] for r in records]}
    common.write_results("data_efficiency", figures | {"summary": summary, "curves": curves})


if __name__ == "__main__":
    main()
