"""Committee uncertainty and calibration records: hand-computed cases, no torch."""

from __future__ import annotations

import numpy as np
import pytest

from fff_jobs.calibration import (
    Prediction,
    atom_force_deviations,
    calibration_record,
    calibration_summary,
    force_deviation,
    rank_correlation,
)


def test_force_deviation_is_the_largest_per_atom_standard_deviation():
    forces = np.zeros((2, 3, 3))  # two members, three atoms
    forces[0, 1] = [1.0, 0.0, 0.0]
    forces[1, 1] = [-1.0, 0.0, 0.0]  # atom 1: members at +-1 eV/A, deviation 1
    forces[0, 2] = [0.0, 0.3, 0.4]  # atom 2: members 0.5 eV/A apart, deviation 0.25
    assert force_deviation(forces) == pytest.approx(1.0)
    assert force_deviation(np.ones((4, 5, 3))) == 0.0  # members that agree
    assert atom_force_deviations(forces) == pytest.approx([0.0, 1.0, 0.25])


def test_a_prediction_and_its_calibration_record():
    energies = np.array([-10.0, -10.6])
    forces = np.zeros((2, 3, 3))
    forces[0, 0, 0], forces[1, 0, 0] = 0.2, 0.4
    prediction = Prediction.from_members(4, energies, forces)
    assert prediction.energy == pytest.approx(-10.3)
    assert prediction.forces[0] == pytest.approx([0.3, 0.0, 0.0])
    assert prediction.force_deviation == pytest.approx(0.1)
    assert prediction.energy_deviation == pytest.approx(0.1)  # (0.3 eV / 3 atoms)
    assert prediction.uncertainty("energy") == pytest.approx(0.1)
    reference_forces = np.zeros((3, 3))
    reference_forces[2] = [0.0, 0.0, -1.0]
    record = calibration_record(prediction, -10.0, reference_forces)
    assert record.generation == 4
    assert record.force_deviation == pytest.approx(0.1)
    assert record.force_error == pytest.approx(1.0)  # atom 2, missed entirely
    assert record.force_mae == pytest.approx(1.3 / 9)
    assert record.energy_error == pytest.approx(0.1)


def test_rank_correlation_and_summary():
    assert rank_correlation([0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 5.0]) == pytest.approx(1.0)
    assert rank_correlation([0.1, 0.2, 0.3, 0.4], [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert rank_correlation([0.1, 0.2], [1.0, 2.0]) is None  # too few frames
    energies, forces = np.array([-1.0, -1.0]), np.zeros((2, 2, 3))
    records = [
        calibration_record(Prediction.from_members(0, energies, forces), -1.0, np.zeros((2, 3)))
    ]
    summary = calibration_summary(records)
    assert summary["frames"] == 1 and summary["rank_correlation"] is None
    assert summary["median_force_error"] == 0.0
