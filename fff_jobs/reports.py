"""What users read off a campaign: its status, its learning curve, and its training set as files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from fff_jobs import database as db
from fff_jobs.calibration import CalibrationRecord, calibration_summary
from fff_jobs.structures import Frame, StructureError, read_structures

PROVENANCE = ("source", "trajectory_id", "segment", "generation", "selection_id", "frame_id")


class NothingToReportError(LookupError):
    """The campaign has no trained generation or no data yet."""


def job_states(launchpad, campaign_id: str) -> dict[str, dict[str, int]]:
    """Worker category -> Firework state -> count, for this campaign's jobs."""
    return db.job_counts(launchpad.fireworks, db.campaign_jobs_filter(campaign_id))


def audit_results(database, campaign_id: str) -> list[dict]:
    """The campaign's audits, oldest first."""
    query = {"campaign_id": campaign_id, "source": "audit"}
    return list(database[db.REFERENCE_RESULTS].find(query).sort("sequence", 1))


def campaign_status(database, launchpad, campaign_id: str) -> dict:
    """The figures `fff status ID` prints."""
    campaign = db.get_campaign(database, campaign_id)
    audits = [doc for doc in audit_results(database, campaign_id) if "audit" in doc]
    passed = sum(doc["audit"]["action"] == "continue" for doc in audits)
    trajectories = list(
        database[db.TRAJECTORIES].find(
            {"campaign_id": campaign_id}, {"status": 1, "last_audit.reason": 1}
        )
    )
    statuses = [trajectory["status"] for trajectory in trajectories]
    return {
        "campaign": campaign_id,
        "status": campaign["status"],
        "stop_reason": campaign["stop_reason"],
        "reference_spent": campaign["budget"]["spent"],
        "budget": campaign["budget"]["num_to_run"],
        "failed_calculations": db.count_results(database, campaign_id, success=False),
        "generation": campaign["generations"][-1] if campaign["generations"] else None,
        "training_running": campaign["training"]["running"],
        "live_trajectories": statuses.count("sampling"),
        "retired_trajectories": statuses.count("retired"),
        "problems": problems(database, campaign_id, trajectories),
        "audits": len(audits),
        "audit_pass_rate": passed / len(audits) if audits else None,
        "recent_audit_errors": [doc["audit"]["error_per_atom"] for doc in audits[-5:]],
        "calibration": calibration_summary(calibration_records(database, campaign_id)),
        "jobs": job_states(launchpad, campaign_id),
    }


def calibration_records(database, campaign_id: str) -> list[CalibrationRecord]:
    """Predicted uncertainty beside actual error of every computed frame that had a prediction."""
    return [
        CalibrationRecord.model_validate(doc["calibration"])
        for doc in db.calibrated_results(database, campaign_id)
    ]


def problems(database, campaign_id: str, trajectories: list[dict], last: int = 3) -> list[str]:
    """The newest reasons of failed calculations, retired trajectories and diverged members."""
    failed = database[db.REFERENCE_RESULTS].find(
        {"campaign_id": campaign_id, "success": False}, {"_id": 1, "reason": 1}
    )
    reasons = [
        f"calculation {doc['_id']}: {doc['reason']}"
        for doc in failed.sort("sequence", -1).limit(last)
    ]
    reasons += [
        f"trajectory {trajectory['_id']} retired: {trajectory['last_audit']['reason']}"
        for trajectory in trajectories
        if trajectory["status"] == "retired"
    ][-last:]
    diverged = database[db.MODELS].find(
        {"campaign_id": campaign_id, "diverged": {"$nin": [None, False]}}, {"diverged": 1}
    )
    reasons += [f"model {doc['_id']}: {doc['diverged']}" for doc in diverged.limit(last)]
    return reasons


def learning_curve(database, campaign_id: str) -> list[dict]:
    """Validation errors per generation and audit errors, against reference calculations spent."""
    campaign = db.get_campaign(database, campaign_id)
    rows = [
        {
            "reference_spent": generation["reference_spent"],
            "kind": "generation",
            "generation": generation["generation"],
            "validation_force_mae": generation["validation_force_mae"],
            "validation_energy_mae_per_atom": generation["validation_energy_mae_per_atom"],
            "audit_error_per_atom": None,
            "audit_tolerance": None,
        }
        for generation in campaign["generations"]
    ]
    query = {"campaign_id": campaign_id, "source": {"$ne": "initial"}}
    budgeted = database[db.REFERENCE_RESULTS].find(query, {"audit": 1, "generation": 1})
    for spent, doc in enumerate(budgeted.sort("sequence", 1), start=1):
        if "audit" in doc:
            rows.append(
                {
                    "reference_spent": spent,
                    "kind": "audit",
                    "generation": doc.get("generation"),
                    "validation_force_mae": None,
                    "validation_energy_mae_per_atom": None,
                    "audit_error_per_atom": doc["audit"]["error_per_atom"],
                    "audit_tolerance": doc["audit"].get("tolerance"),
                }
            )
    if not campaign["generations"]:
        raise NothingToReportError(
            f"campaign {campaign_id!r} has no trained generation yet: run its workers first"
        )
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
    for generation in db.get_campaign(database, campaign_id)["generations"]:
        _, models = load_committee(database, campaign_id, generation["generation"])
        prediction = predict_committee(models, frames, compute_forces=True)
        forces = np.concatenate([member.mean(axis=0) for member in prediction.forces])
        energy_error = np.abs(prediction.energies.mean(axis=0) - reference_energy) / sizes
        errors[generation["generation"]] = {
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
        top.legend(["validation", "hold-out"])
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

    records = calibration_records(database, campaign_id)
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
    query = {"campaign_id": campaign_id, "success": True}
    frames = []
    for doc in database[db.REFERENCE_RESULTS].find(query).sort("sequence", 1):
        atoms = Frame.model_validate(doc["frame"]).to_atoms()
        atoms.calc = SinglePointCalculator(
            atoms, energy=doc["energy"], forces=np.asarray(doc["forces"])
        )
        atoms.info.update(
            {key: doc[key] for key in PROVENANCE if doc.get(key) is not None}
            | {"result_id": doc["_id"], "code": doc["code"], "method": doc.get("method") or ""}
            | {"wall_time": doc["wall_time"], "host": doc["host"]}
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
