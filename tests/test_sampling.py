"""MD segments: energy conservation, kept frames, guards that end bad segments; audits and jobs."""

from __future__ import annotations

import os

import numpy as np
import pytest
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.calculators.lj import LennardJones
from ase.cluster import Icosahedron
from pydantic import ValidationError

from fff_jobs.reference import make_calculator
from fff_jobs.sampling import (
    audit_decision,
    audit_tolerance,
    kept_steps,
    next_run_length,
    run_segment,
)
from fff_jobs.spec import AuditSettings, MDSettings, ReferenceSettings
from fff_jobs.structures import water_molecule


@pytest.fixture(autouse=True, scope="module")
def _one_openmp_thread():
    """xTB and PySCF on one OpenMP thread: on a busy 2-core machine two threads run 100x slower.

    OpenMP reads OMP_NUM_THREADS when tblite first loads, which happens inside the tests.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")


ARGON_LJ = {"sigma": 3.4, "epsilon": 0.0104, "rc": 10.0}
TIGHT = AuditSettings(energy_tolerance=0.02, min_run_length=10, max_run_length=1000)


class FreeParticles(Calculator):
    """No forces at all: atoms keep the velocities they were given."""

    implemented_properties = ("energy", "forces")

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": 0.0, "forces": np.zeros((len(self.atoms), 3))}


class BreaksAfter(LennardJones):
    """Lennard-Jones that returns NaN from its `calls`-th calculation on."""

    def __init__(self, calls: int):
        super().__init__(**ARGON_LJ)
        self.calls, self.count = calls, 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        super().calculate(atoms, properties, system_changes)
        self.count += 1
        if self.count >= self.calls:
            self.results = {k: v * np.nan for k, v in self.results.items()}


def water_dimer() -> Atoms:
    second = water_molecule()
    second.positions += [2.9, 0.3, 0.2]
    return water_molecule() + second


def moving(symbols: str, positions, velocities_per_fs) -> Atoms:
    atoms = Atoms(symbols, positions=positions)
    atoms.set_velocities(np.asarray(velocities_per_fs, dtype=float) / units.fs)
    return atoms


def total_energy_per_atom(segment) -> np.ndarray:
    energies = []
    for frame, potential in zip(segment.frames, segment.energies, strict=True):
        atoms = frame.to_atoms()
        energies.append(potential + atoms.get_kinetic_energy())
    return np.array(energies) / len(segment.final_frame.numbers)


def test_nve_with_xtb_conserves_energy_on_a_water_dimer():
    settings = MDSettings(timestep=0.25, temperature=300)
    calculator = make_calculator(ReferenceSettings())
    segment = run_segment(water_dimer(), calculator, settings, num_steps=200, num_frames=200)
    assert segment.flag is None and segment.steps == 200
    assert np.ptp(total_energy_per_atom(segment)) < 1e-3  # eV/atom over 50 fs


def test_nve_with_lennard_jones_conserves_energy_and_continues_exactly():
    cluster = Icosahedron("Ar", 2)
    settings = MDSettings(timestep=2.0, temperature=40)
    whole = run_segment(cluster, LennardJones(**ARGON_LJ), settings, 200, num_frames=200, seed=3)
    assert np.ptp(total_energy_per_atom(whole)) < 1e-4
    first = run_segment(cluster, LennardJones(**ARGON_LJ), settings, 100, seed=3)
    second = run_segment(first.final_frame.to_atoms(), LennardJones(**ARGON_LJ), settings, 100)
    assert np.allclose(second.final_frame.positions, whole.final_frame.positions)


def test_segment_keeps_evenly_spaced_frames_ending_with_the_final_one():
    assert kept_steps(100, 10) == set(range(10, 101, 10))
    assert kept_steps(5, 10) == {1, 2, 3, 4, 5}
    segment = run_segment(Icosahedron("Ar", 2), LennardJones(**ARGON_LJ), MDSettings(), 100, 10)
    assert len(segment.frames) == len(segment.energies) == 10
    assert segment.frames[-1] == segment.final_frame
    assert segment.final_energy == segment.energies[-1]
    assert all(frame.velocities is not None for frame in segment.frames)


def test_langevin_is_reproducible_for_a_seed():
    settings = MDSettings(thermostat="langevin", timestep=2.0, temperature=40, friction=0.05)
    runs = [
        run_segment(Icosahedron("Ar", 2), LennardJones(**ARGON_LJ), settings, 50, seed=seed)
        for seed in (1, 1, 2)
    ]
    assert runs[0].final_frame == runs[1].final_frame
    assert runs[0].final_frame != runs[2].final_frame
    assert all(run.flag is None for run in runs)


def test_good_trajectory_trips_no_guard():
    calculator = make_calculator(ReferenceSettings())
    segment = run_segment(water_dimer(), calculator, MDSettings(), num_steps=100)
    assert segment.flag is None and segment.detail is None and segment.steps == 100


def test_close_atoms_guard_ends_the_segment_at_the_flagged_frame():
    atoms = moving("H2", [[0, 0, 0], [2.0, 0, 0]], [[0.05, 0, 0], [-0.05, 0, 0]])
    segment = run_segment(atoms, FreeParticles(), MDSettings(min_distance=0.5), 200)
    assert segment.flag == "close_atoms"
    assert segment.steps < 200
    final = segment.final_frame.to_atoms()
    assert final.get_distance(0, 1) < 0.5
    assert final.get_distance(0, 1) > 0.5 - 0.1 * 0.5  # it stopped at the first offending step


def test_flying_apart_guard_fires_when_an_atom_leaves_the_cluster():
    atoms = moving("H3", [[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 0, 0], [0.2, 0, 0], [0, 0, 0]])
    segment = run_segment(atoms, FreeParticles(), MDSettings(fragment_distance=3.0), 200)
    assert segment.flag == "flying_apart"
    assert 3.0 < segment.final_frame.to_atoms().get_distance(0, 1) < 3.2


def test_large_forces_guard_fires_when_atoms_collide():
    atoms = moving("Ar2", [[0, 0, 0], [4.5, 0, 0]], [[0.3, 0, 0], [-0.3, 0, 0]])
    settings = MDSettings(timestep=0.2, max_force=0.5)
    segment = run_segment(atoms, LennardJones(**ARGON_LJ), settings, 200)
    assert segment.flag == "large_forces"
    final = segment.final_frame.to_atoms()
    final.calc = LennardJones(**ARGON_LJ)
    assert np.abs(final.get_forces()).max() > 0.5


def test_non_finite_guard_rewinds_to_the_last_finite_frame():
    settings = MDSettings(timestep=2.0, temperature=40)
    segment = run_segment(Icosahedron("Ar", 2), BreaksAfter(calls=30), settings, 100, 100)
    assert segment.flag == "non_finite"
    assert segment.steps < 100
    assert np.isfinite(segment.final_frame.positions).all()
    assert np.isfinite(segment.final_energy)
    assert all(np.isfinite(frame.positions).all() for frame in segment.frames)
    assert len(segment.frames) == segment.steps - 1  # the NaN step itself is not kept


def test_uncertainty_guard_stops_the_segment_at_the_first_uncertain_frame():
    """The committee is asked every uncertainty_interval steps; the first frame above the
    threshold ends the segment and becomes the frame the audit computes."""
    cluster = Icosahedron("Ar", 2)
    asked = []

    def uncertainty(atoms: Atoms) -> float:  # grows as the cluster leaves its start
        asked.append(len(asked))
        return float(np.abs(atoms.positions - cluster.positions).max())

    settings = MDSettings(
        timestep=2.0, temperature=200, uncertainty_threshold=0.05, uncertainty_interval=5
    )
    segment = run_segment(cluster, LennardJones(**ARGON_LJ), settings, 400, seed=2,
                          uncertainty=uncertainty)  # fmt: skip
    assert segment.flag == "uncertain" and segment.steps < 400
    assert segment.steps % 5 == 0 and len(asked) == segment.steps // 5  # not the start
    assert segment.uncertainty > 0.05
    moved = np.abs(segment.final_frame.positions - cluster.positions).max()
    assert moved == pytest.approx(segment.uncertainty)
    calm = settings.model_copy(update={"uncertainty_threshold": None})
    unbounded = run_segment(cluster, LennardJones(**ARGON_LJ), calm, 40, uncertainty=uncertainty)
    assert unbounded.flag is None and unbounded.uncertainty is None


def test_an_uncertain_start_still_moves_to_the_first_check():
    """A start the committee already doubts (the audited frame, or the trajectory's start)
    is not the frame to stop at: the segment runs to its first check and stops there."""
    settings = MDSettings(timestep=1.0, uncertainty_threshold=0.1, uncertainty_interval=4)
    segment = run_segment(Icosahedron("Ar", 2), LennardJones(**ARGON_LJ), settings, 20, 20,
                          uncertainty=lambda atoms: 1.0)  # fmt: skip
    assert segment.flag == "uncertain" and segment.steps == 4
    assert segment.detail.startswith("step 4:")
    assert len(segment.frames) == 4 and segment.uncertainty == 1.0  # steps 1-4 are pooled


@pytest.mark.parametrize("temperature", [100.0, 600.0])
def test_a_segment_starts_at_the_temperature_of_its_trajectory(temperature):
    """Velocities are drawn at the temperature given (a rung of the ladder), not the first."""
    settings = MDSettings(temperature=[100.0, 600.0], timestep=0.5)
    atoms = Icosahedron("Ar", 3)
    segment = run_segment(atoms, FreeParticles(), settings, 1, seed=0, temperature=temperature)
    moving_atoms = segment.final_frame.to_atoms()
    degrees = 3 * len(moving_atoms) - 6  # drift and rotation removed
    kinetic = moving_atoms.get_kinetic_energy()
    assert 2 * kinetic / (degrees * units.kB) == pytest.approx(temperature, rel=0.35)


def test_audit_continues_below_the_tolerance_and_lengthens_the_next_segment():
    decision = audit_decision(-10.00, -10.03, 3, None, 50, 0.02, TIGHT)
    assert decision.action == "continue"
    assert decision.error_per_atom == pytest.approx(0.01)
    assert decision.tolerance == 0.02
    assert decision.run_length == 100  # doubled
    uncertain = audit_decision(-10.00, -10.03, 3, "uncertain", 50, 0.02, TIGHT)
    assert uncertain.action == "continue"  # an uncertain frame is not a failure by itself


def test_audit_restarts_above_the_tolerance_after_a_guard_or_a_failed_reference():
    above = audit_decision(-10.0, -10.3, 3, None, 50, 0.02, TIGHT)
    assert above.action == "restart" and above.error_per_atom == pytest.approx(0.1)
    assert above.run_length == 25  # halved
    flagged = audit_decision(-10.0, -10.0, 3, "flying_apart", 50, 0.02, TIGHT)
    assert flagged.action == "restart" and "flying_apart" in flagged.reason
    failed = audit_decision(-10.0, None, 3, None, 12, 0.02, TIGHT)
    assert failed.action == "restart" and failed.error_per_atom is None
    assert failed.run_length == 10  # clipped to min_run_length


def test_run_length_grows_with_each_passed_audit_up_to_the_maximum():
    lengths = [50]
    for _ in range(6):
        lengths.append(next_run_length(lengths[-1], True, TIGHT))
    assert lengths == [50, 100, 200, 400, 800, 1000, 1000]
    assert next_run_length(15, False, TIGHT) == 10


def test_audit_tolerance_follows_the_committee_error_within_its_bounds():
    audit = AuditSettings(energy_tolerance=0.002, max_energy_tolerance=0.02, tolerance_factor=3)
    assert audit_tolerance(audit, 0.003) == pytest.approx(0.009)
    assert audit_tolerance(audit, 0.0001) == 0.002  # never stricter than energy_tolerance
    assert audit_tolerance(audit, 0.5) == 0.02  # nor looser than max_energy_tolerance
    assert audit_tolerance(audit, None) == 0.002  # no error known yet
    fixed = audit.model_copy(update={"tolerance_factor": None})
    assert audit_tolerance(fixed, 0.003) == 0.002


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        (MDSettings, {"temperature": -10}, "above 0 K"),
        (MDSettings, {"run_length": 0}, "greater than 0"),
        (MDSettings, {"timestep": 0}, "greater than 0"),
        (MDSettings, {"thermostat": "nose-hoover"}, "'none' or 'langevin'"),
        (MDSettings, {"min_distance": 6, "fragment_distance": 5}, "must be below"),
        (AuditSettings, {"energy_tolerance": 0}, "greater than 0"),
        (AuditSettings, {"min_run_length": 500, "max_run_length": 100}, "500 > max_run_length"),
        (AuditSettings, {"energy_tolerance": 0.1}, "max_energy_tolerance"),
        (AuditSettings, {"growth": 1.0}, "greater than 1"),
        (MDSettings, {"temperature": [300, -5]}, "above 0 K"),
        (MDSettings, {"temprature": 300}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_are_rejected_before_anything_runs(section, values, message):
    with pytest.raises(ValidationError, match=message):
        section(**values)
