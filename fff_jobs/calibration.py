"""Committee uncertainty and how well it predicts real errors: plain numpy, no torch.

The committee's uncertainty of a structure is the largest per-atom force standard
deviation over its members (eV/A), the model deviation of DP-GEN and of most
active-learning codes for interatomic potentials: force errors are what a potential
is judged on, and the largest one finds the one atom a model gets wrong. The spread
of the energy per atom (eV/atom) is the alternative. A *calibration record* puts a
frame's predicted uncertainty beside its actual error once the reference has computed
it; their rank correlation says how far the uncertainty can be trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel

Uncertainty = Literal["force", "energy"]


def atom_force_deviations(member_forces: np.ndarray) -> np.ndarray:
    """Each atom's force standard deviation over members (eV/A) of one structure.

    ``member_forces`` has shape (members, atoms, 3); the deviation of atom i is
    sqrt(mean over members of |F_i - mean F_i|^2).
    """
    forces = np.asarray(member_forces, dtype=float)
    deviation = forces - forces.mean(axis=0)
    return np.sqrt((deviation**2).sum(axis=2).mean(axis=0))


def force_deviation(member_forces: np.ndarray) -> float:
    """Largest per-atom force standard deviation over members (eV/A) of one structure."""
    deviations = atom_force_deviations(member_forces)
    return float(deviations.max()) if deviations.size else 0.0


class Prediction(BaseModel):
    """The committee's view of one frame: its mean energy and forces, and its uncertainty."""

    generation: int
    energy: float  # committee mean, eV
    forces: list[list[float]]  # committee mean, eV/A
    force_deviation: float  # eV/A, largest per-atom force standard deviation
    energy_deviation: float  # eV/atom, standard deviation of the energy per atom

    @classmethod
    def from_members(
        cls, generation: int, energies: np.ndarray, member_forces: np.ndarray
    ) -> Prediction:
        """From every member's energy (members,) and forces (members, atoms, 3)."""
        energies = np.asarray(energies, dtype=float)
        forces = np.asarray(member_forces, dtype=float)
        size = max(forces.shape[1], 1)
        return cls(
            generation=generation,
            energy=float(energies.mean()),
            forces=forces.mean(axis=0).tolist(),
            force_deviation=force_deviation(forces),
            energy_deviation=float((energies / size).std()),
        )

    def uncertainty(self, kind: Uncertainty) -> float:
        """The force deviation (eV/A) or the energy spread (eV/atom)."""
        return self.force_deviation if kind == "force" else self.energy_deviation


class CalibrationRecord(BaseModel):
    """A computed frame's predicted uncertainty beside the committee's actual errors."""

    generation: int  # the committee that predicted
    force_deviation: float  # predicted, eV/A
    energy_deviation: float  # predicted, eV/atom
    force_error: float  # actual largest per-atom force error of the committee mean, eV/A
    force_mae: float  # eV/A, over force components
    energy_error: float  # |E_mean - E_ref| / atoms, eV/atom


def calibration_record(
    prediction: Prediction, energy: float, forces: np.ndarray
) -> CalibrationRecord:
    """Compare a prediction with the reference energy (eV) and forces (eV/A) of the same frame."""
    error = np.asarray(prediction.forces, dtype=float) - np.asarray(forces, dtype=float)
    size = max(len(error), 1)
    return CalibrationRecord(
        generation=prediction.generation,
        force_deviation=prediction.force_deviation,
        energy_deviation=prediction.energy_deviation,
        force_error=float(np.linalg.norm(error, axis=1).max()) if len(error) else 0.0,
        force_mae=float(np.abs(error).mean()) if len(error) else 0.0,
        energy_error=abs(prediction.energy - energy) / size,
    )


def rank_correlation(predicted: Sequence[float], actual: Sequence[float]) -> float | None:
    """Spearman's rank correlation of predicted uncertainty and actual error (None: too few)."""
    from scipy.stats import spearmanr

    predicted, actual = np.asarray(predicted, dtype=float), np.asarray(actual, dtype=float)
    if predicted.size < 3 or np.ptp(predicted) == 0 or np.ptp(actual) == 0:
        return None
    return float(spearmanr(predicted, actual).statistic)


def calibration_summary(records: Sequence[CalibrationRecord]) -> dict[str, float | int | None]:
    """How many frames, the rank correlation, and the median predicted and actual force errors."""
    predicted = [record.force_deviation for record in records]
    actual = [record.force_error for record in records]
    return {
        "frames": len(records),
        "rank_correlation": rank_correlation(predicted, actual),
        "median_force_deviation": float(np.median(predicted)) if records else None,
        "median_force_error": float(np.median(actual)) if records else None,
    }
