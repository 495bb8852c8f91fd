"""MD segments: energy conservation, kept frames, guards that end bad segments; audits and jobs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.calculators.lj import LennardJones
from ase.cluster import Icosahedron
from jobflow import Flow, JobStore, run_locally
from maggma.stores import MemoryStore
from monty.json import MontyDecoder, MontyEncoder
from pydantic import ValidationError

from fff_jobs.jobs.sampling import AuditMaker, SegmentMaker
from fff_jobs.reference import make_calculator
from fff_jobs.sampling import audit_decision, kept_steps, next_run_length, run_segment
from fff_jobs.spec import AuditSettings, CalculatorSpec, MDSettings, ReferenceSettings
from fff_jobs.structures import StructureError, water_molecule


@pytest.fixture(autouse=True, scope="module")
def _one_openmp_thread():
    """xTB and PySCF on one OpenMP thread: on a busy 2-core machine two threads run 100x slower.

    OpenMP reads OMP_NUM_THREADS when tblite first loads, which happens inside the tests.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")


ARGON_LJ = {"sigma": 3.4, "epsilon": 0.0104, "rc": 10.0}
LJ_SPEC = CalculatorSpec(import_path="ase.calculators.lj.LennardJones", kwargs=ARGON_LJ)
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


def test_audit_continues_below_the_tolerance_and_sets_the_run_length():
    decision = audit_decision(-10.00, -10.03, 3, 100, None, [], 50, TIGHT)
    assert decision.action == "continue"
    assert decision.error_per_atom == pytest.approx(0.01)
    assert decision.error_per_step == pytest.approx(1e-4)
    assert decision.run_length == 200  # 0.02 / 1e-4


def test_audit_restarts_above_the_tolerance_after_a_guard_or_a_failed_reference():
    above = audit_decision(-10.0, -10.3, 3, 100, None, [], 50, TIGHT)
    assert above.action == "restart" and above.error_per_atom == pytest.approx(0.1)
    assert above.run_length == 20  # 0.02 / 1e-3
    flagged = audit_decision(-10.0, -10.0, 3, 100, "flying_apart", [], 50, TIGHT)
    assert flagged.action == "restart" and "flying_apart" in flagged.reason
    failed = audit_decision(-10.0, None, 3, 100, None, [], 50, TIGHT)
    assert failed.action == "restart" and failed.error_per_atom is None
    assert failed.error_per_step == pytest.approx(0.1)  # 10 eV/atom counted over 100 steps
    assert failed.run_length == 10  # clipped to min_run_length


def test_next_run_length_uses_the_median_of_recent_errors_clipped():
    loose = AuditSettings(energy_tolerance=0.1, min_run_length=10, max_run_length=1000)
    assert next_run_length([1e-4, 2e-4, 4e-4], 50, loose) == 500
    windowed = loose.model_copy(update={"error_history": 2})
    assert next_run_length([1e-4, 2e-4, 4e-4], 50, windowed) == 333
    assert next_run_length([1e-2], 50, loose) == 10
    assert next_run_length([1e-9], 50, loose) == 1000
    assert next_run_length([0.0], 50, loose) == 1000
    assert next_run_length([], 50, loose) == 50
    assert next_run_length([float("nan")], 5000, loose) == 1000


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        (MDSettings, {"temperature": -10}, "greater than 0"),
        (MDSettings, {"run_length": 0}, "greater than 0"),
        (MDSettings, {"timestep": 0}, "greater than 0"),
        (MDSettings, {"thermostat": "nose-hoover"}, "'none' or 'langevin'"),
        (MDSettings, {"min_distance": 6, "fragment_distance": 5}, "must be below"),
        (AuditSettings, {"energy_tolerance": 0}, "greater than 0"),
        (AuditSettings, {"min_run_length": 500, "max_run_length": 100}, "500 > max_run_length"),
        (MDSettings, {"temprature": 300}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_are_rejected_before_anything_runs(section, values, message):
    with pytest.raises(ValidationError, match=message):
        section(**values)


def run_flow(*jobs):
    serialised = json.loads(json.dumps(Flow(list(jobs)).as_dict(), cls=MontyEncoder))
    store = JobStore(MemoryStore(), additional_stores={"data": MemoryStore()})
    return run_locally(MontyDecoder().process_decoded(serialised), store=store, log=False), store


def test_segment_and_audit_jobs_route_store_frames_aside_and_decide():
    settings = MDSettings(timestep=2.0, temperature=40, num_frames=5)
    segment = SegmentMaker(settings=settings).make(Icosahedron("Ar", 2), LJ_SPEC, 40, seed=1)
    reference = ReferenceSettings(code="ase", calculator=LJ_SPEC)
    audit = AuditMaker(reference=reference, audit=TIGHT).make(segment.output, [1e-4], 50)
    assert segment.config.manager_config == {"_category": "gpu", "_priority": 0}
    assert audit.config.manager_config == {"_category": "cpu", "_priority": 10}
    responses, store = run_flow(segment, audit)
    assert len(responses[segment.uuid][1].output.frames) == 5
    document = store.query_one({"uuid": segment.uuid}, load=False)
    assert document["output"]["frames"]["store"] == "data"  # not inline in the document
    assert document["output"]["flag"] is None
    outcome = responses[audit.uuid][1].output
    assert outcome.result.success
    assert outcome.decision.action == "continue"  # the reference is the sampling calculator
    assert outcome.decision.error_per_atom == pytest.approx(0.0, abs=1e-12)
    assert outcome.decision.run_length == 400  # 0.02 / median(1e-4, 0)


@pytest.mark.slow
def test_segment_job_runs_a_mace_model_file(tmp_path):
    import mace  # noqa: F401  (before e3nn)
    import torch
    from e3nn import o3
    from mace import modules

    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=4.0, num_bessel=4, num_polynomial_cutoff=5, max_ell=1, interaction_cls=block,
        interaction_cls_first=block, num_interactions=1, num_elements=2,
        hidden_irreps=o3.Irreps("8x0e"), MLP_irreps=o3.Irreps("8x0e"),
        atomic_energies=np.array([-10.707, -102.522]), avg_num_neighbors=4.0,
        atomic_numbers=[1, 8], correlation=2, gate=torch.nn.functional.silu,
        atomic_inter_scale=1.0, atomic_inter_shift=0.0,
    )  # fmt: skip
    torch.save(model, tmp_path / "tiny.model")
    settings = MDSettings(num_frames=3, device="cpu", max_force=1e6)
    segment = SegmentMaker(settings=settings).make(water_dimer(), str(tmp_path / "tiny.model"), 6)
    responses, _ = run_flow(segment)
    output = responses[segment.uuid][1].output
    assert output.steps == 6 and len(output.frames) == 3
    assert np.isfinite(output.final_energy)


def test_segment_job_refuses_overlapping_starting_atoms_before_it_runs():
    overlapping = Atoms("H2", positions=[[0, 0, 0], [0.1, 0, 0]])
    with pytest.raises(StructureError, match="starting structure of the segment: atoms 0 and 1"):
        SegmentMaker().make(overlapping, LJ_SPEC)
