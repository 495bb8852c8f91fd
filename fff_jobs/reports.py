"""What users read off a campaign: its status, its learning curve, and its training set as files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from ase import Atoms

from fff_jobs import database as db
from fff_jobs.calibration import CalibrationRecord, calibration_summary
from fff_jobs.schemas import RETIRED, SAMPLING
from fff_jobs.structures import StructureError, read_structures

PROVENANCE = ("source", "trajectory_id", "segment", "generation", "selection_id", "frame_id")


class NothingToReportError(LookupError):
    """The campaign has no trained generation or no data yet."""


def campaign_status(database, campaign_id: str) -> dict:
    """The figures `fff status ID` prints."""
    campaign = db.get_campaign(database, campaign_id)
    audits = [result.audit for result in db.campaign_results(database, campaign_id, "audit")]
    audits = [decision for decision in audits if decision is not None]
    passed = sum(decision.action == "continue" for decision in audits)
    trajectories = db.trajectory_states(database, campaign_id)
    statuses = [status for _, status, _ in trajectories]
    return {
        "campaign": campaign_id,
        "status": campaign.status,
        "stop_reason": campaign.stop_reason,
        "reference_spent": campaign.budget.spent,
        "budget": campaign.budget.num_to_run,
        "failed_calculations": db.count_results(database, campaign_id, success=False),
        "generation": campaign.generations[-1] if campaign.generations else None,
        "training_running": campaign.training.running,
        "live_trajectories": statuses.count(SAMPLING),
        "retired_trajectories": statuses.count(RETIRED),
        "problems": problems(database, campaign_id, trajectories),
        "audits": len(audits),
        "audit_pass_rate": passed / len(audits) if audits else None,
        "recent_audit_errors": [decision.error_per_atom for decision in audits[-5:]],
        "calibration": calibration_summary(db.calibration_records(database, campaign_id)),
        "jobs": db.job_states(database, campaign_id),
    }


def problems(
    database, campaign_id: str, trajectories: list[tuple[str, str, str | None]], last: int = 3
) -> list[str]:
    """The newest reasons of failed calculations, retired trajectories and diverged members."""
    reasons = [
        f"calculation {result_id}: {reason}"
        for result_id, reason in db.failed_calculations(database, campaign_id, last)
    ]
    reasons += [
        f"trajectory {trajectory_id} retired: {reason}"
        for trajectory_id, status, reason in trajectories
        if status == RETIRED
    ][-last:]
    reasons += [
        f"model {model_id}: {reason}"
        for model_id, reason in db.diverged_members(database, campaign_id, last)
    ]
    return reasons


def learning_curve(database, campaign_id: str) -> list[dict]:
    """Validation errors per generation and audit errors, against reference calculations spent."""
    campaign = db.get_campaign(database, campaign_id)
    if not campaign.generations:
        raise NothingToReportError(
            f"campaign {campaign_id!r} has no trained generation yet: run its workers first"
        )
    rows = [
        {
            "reference_spent": generation.reference_spent,
            "kind": "generation",
            "generation": generation.generation,
            "validation_force_mae": generation.validation_force_mae,
            "validation_energy_mae_per_atom": generation.validation_energy_mae_per_atom,
            "audit_error_per_atom": None,
            "audit_tolerance": None,
        }
        for generation in campaign.generations
    ]
    rows += [
        {
            "reference_spent": spent,
            "kind": "audit",
            "generation": result.generation,
            "validation_force_mae": None,
            "validation_energy_mae_per_atom": None,
            "audit_error_per_atom": result.audit.error_per_atom,
            "audit_tolerance": result.audit.tolerance,
        }
        for spent, result in db.budgeted_audits(database, campaign_id)
    ]
    return sorted(rows, key=lambda row: (row["reference_spent"], row["kind"]))


def read_holdout(path: Path) -> list[Atoms]:
    """Labelled frames to score generations on; each must carry an energy and forces."""
    frames = read_structures(path)
    for index, atoms in enumerate(frames):
        results = atoms.calc.results if atoms.calc is not None else {}
        if "energy" not in results or "forces" not in results:
            raise StructureError(
                f"{path}: structure {index} has no reference energy and forces; a hold-out "
                "set needs both (extxyz: energy=... in the comment line, a forces column)"
            )
    return frames


def holdout_errors(database, campaign_id: str, frames: list[Atoms]) -> dict[int, dict]:
    """Each generation's committee-mean errors on labelled frames it never trained on."""
    import mace  # noqa: F401  (mace before e3nn)

    from fff_jobs.committee import load_committee, predict_committee

    reference_energy = np.array([atoms.get_potential_energy() for atoms in frames])
    reference_forces = np.concatenate([atoms.get_forces() for atoms in frames])
    sizes = np.array([len(atoms) for atoms in frames])
    errors = {}
    for generation in db.get_campaign(database, campaign_id).generations:
        _, models = load_committee(database, campaign_id, generation.generation)
        prediction = predict_committee(models, frames, compute_forces=True)
        forces = np.concatenate([member.mean(axis=0) for member in prediction.forces])
        energy_error = np.abs(prediction.energies.mean(axis=0) - reference_energy) / sizes
        errors[generation.generation] = {
            "holdout_force_mae": float(np.abs(forces - reference_forces).mean()),
            "holdout_energy_mae_per_atom": float(energy_error.mean()),
        }
    return errors


def write_report(
    database, campaign_id: str, directory: Path, holdout: list[Atoms] | None = None
) -> tuple[Path, ...]:
    """The learning curve and the calibration as CSV and PNG in ``directory`` (with hold-out
    errors if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = learning_curve(database, campaign_id)
    if holdout:
        errors = holdout_errors(database, campaign_id, holdout)
        for row in rows:
            empty = {"holdout_force_mae": None, "holdout_energy_mae_per_atom": None}
            row |= errors.get(row["generation"], empty) if row["kind"] == "generation" else empty
    directory.mkdir(parents=True, exist_ok=True)
    csv_path = directory / f"{campaign_id}-learning-curve.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    generations = [row for row in rows if row["kind"] == "generation"]
    audits = [row for row in rows if row["kind"] == "audit" and row["audit_error_per_atom"]]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    top.plot(
        [row["reference_spent"] for row in generations],
        [row["validation_force_mae"] for row in generations],
        "o-",
    )
    if holdout:
        top.plot(
            [row["reference_spent"] for row in generations],
            [row["holdout_force_mae"] for row in generations],
            "s--",
            label="hold-out",
        )
        top.legend(["out-of-bag", "hold-out"])
    top.set_ylabel("force MAE (eV/Å)")
    top.set_title(f"campaign {campaign_id}")
    spent = [row["reference_spent"] for row in audits]
    bottom.semilogy(spent, [1000 * row["audit_error_per_atom"] for row in audits], ".")
    tolerances = [row["audit_tolerance"] for row in audits]
    if audits and None not in tolerances:
        bottom.step(spent, [1000 * t for t in tolerances], "--", color="grey", where="mid")
    bottom.set_ylabel("audit |E_ML - E_ref| (meV/atom)")
    bottom.set_xlabel("reference calculations spent")
    bottom.legend(["audit error", "its tolerance"])
    figure.tight_layout()
    png_path = directory / f"{campaign_id}-learning-curve.png"
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return csv_path, png_path, *write_calibration(database, campaign_id, directory)


def write_calibration(database, campaign_id: str, directory: Path) -> tuple[Path, ...]:
    """Predicted force deviation against actual force error, as CSV and a log-log PNG."""
    import matplotlib.pyplot as plt

    records = db.calibration_records(database, campaign_id)
    if not records:
        return ()
    csv_path = directory / f"{campaign_id}-calibration.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CalibrationRecord.model_fields))
        writer.writeheader()
        writer.writerows(record.model_dump() for record in records)
    summary = calibration_summary(records)
    figure, axis = plt.subplots(figsize=(5, 5))
    points = axis.scatter(
        [r.force_deviation for r in records],
        [r.force_error for r in records],
        c=[r.generation for r in records],
        s=12,
    )
    figure.colorbar(points, label="generation that predicted")
    values = [v for r in records for v in (r.force_deviation, r.force_error) if v > 0]
    if values:
        low, high = min(values), max(values)
        axis.plot([low, high], [low, high], ":", color="grey")
    axis.set(xscale="log", yscale="log")
    axis.set_xlabel("predicted: committee force deviation (eV/Å)")
    axis.set_ylabel("actual: largest force error (eV/Å)")
    correlation = summary["rank_correlation"]
    label = "n/a" if correlation is None else f"{correlation:.2f}"
    axis.set_title(f"{len(records)} frames, rank correlation {label}")
    figure.tight_layout()
    png_path = directory / f"{campaign_id}-calibration.png"
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return csv_path, png_path


def training_atoms(database, campaign_id: str) -> list[Atoms]:
    """Every successful reference result, with energy, forces and provenance in ``info``."""
    db.get_campaign(database, campaign_id)
    frames = []
    for result in db.campaign_results(database, campaign_id, successful=True):
        atoms = result.to_atoms()
        stored = result.model_dump()
        atoms.info.update(
            {key: stored[key] for key in PROVENANCE if stored.get(key) is not None}
            | {"result_id": result.id, "code": result.code, "method": result.method or ""}
            | {"wall_time": result.wall_time, "host": result.host}
        )
        frames.append(atoms)
    if not frames:
        raise NothingToReportError(f"campaign {campaign_id!r} has no reference results yet")
    return frames


def export_training_set(database, campaign_id: str, directory: Path) -> tuple[Path, Path]:
    """The training set as extxyz and as an ASE database."""
    import ase.db
    import ase.io

    frames = training_atoms(database, campaign_id)
    directory.mkdir(parents=True, exist_ok=True)
    extxyz = directory / f"{campaign_id}-training-set.extxyz"
    ase.io.write(extxyz, frames, format="extxyz")
    ase_db = directory / f"{campaign_id}-training-set.db"
    ase_db.unlink(missing_ok=True)
    with ase.db.connect(ase_db) as connection:
        for atoms in frames:
            connection.write(atoms, key_value_pairs=dict(atoms.info))
    return extxyz, ase_db
