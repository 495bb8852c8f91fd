"""Reference calculations: xTB, PySCF, ASE import paths; failures are recorded, never raised."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.calculators.lj import LennardJones
from jobflow import Flow, run_locally
from pydantic import ValidationError

from fff_jobs.reference import compute_reference, compute_references, make_calculator
from fff_jobs.spec import CalculatorSpec, ReferenceSettings
from fff_jobs.structures import water_molecule


@pytest.fixture(autouse=True, scope="module")
def _one_openmp_thread():
    """xTB and PySCF on one OpenMP thread: on a busy 2-core machine two threads run 100x slower.

    OpenMP reads OMP_NUM_THREADS when tblite first loads, which happens inside the tests.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")


LJ = CalculatorSpec(
    import_path="ase.calculators.lj.LennardJones", kwargs={"sigma": 3.0, "epsilon": 0.01}
)


class RaisingCalculator(Calculator):
    """Fails like a crashed reference code."""

    implemented_properties = ("energy", "forces")

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        raise RuntimeError("the reference code crashed")


class ConstantCalculator(Calculator):
    """Returns the energy and forces it was given (NaN or huge ones, in these tests)."""

    implemented_properties = ("energy", "forces")

    def __init__(self, energy: float = 0.0, force: float = 0.0):
        super().__init__()
        self.value, self.force = energy, force

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        super().calculate(atoms, properties, system_changes)
        forces = np.full((len(self.atoms), 3), self.force)
        self.results = {"energy": self.value, "forces": forces}


class HangingCalculator(LennardJones):
    """Lennard-Jones, except that it hangs on structures of three or more atoms."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        if len(atoms) >= 3:
            time.sleep(600)
        super().calculate(atoms, properties, system_changes)


def water_dimer() -> Atoms:
    second = water_molecule()
    second.positions += [2.9, 0.3, 0.2]
    return water_molecule() + second


def assert_forces_match_finite_differences(atoms: Atoms, settings, components, step=1e-3, tol=5e-3):
    result = compute_reference(atoms, settings)
    assert result.success, result.reason
    assert np.isfinite(result.energy)
    for atom, axis in components:
        energies = []
        for sign in (1, -1):
            displaced = atoms.copy()
            displaced.positions[atom, axis] += sign * step
            energies.append(compute_reference(displaced, settings).energy)
        numerical = -(energies[0] - energies[1]) / (2 * step)
        assert result.forces[atom][axis] == pytest.approx(numerical, abs=tol)


def test_xtb_water_dimer_forces_are_minus_the_energy_gradient():
    assert_forces_match_finite_differences(
        water_dimer(), ReferenceSettings(), [(0, 0), (1, 1), (4, 2)]
    )


def test_xtb_takes_charge_and_spin_from_settings():
    hydroxyl = Atoms("OH", positions=[[0, 0, 0], [0.97, 0, 0]])
    radical = compute_reference(hydroxyl, ReferenceSettings(multiplicity=2))
    anion = compute_reference(hydroxyl, ReferenceSettings(charge=-1))
    assert radical.success and anion.success
    assert anion.energy < radical.energy  # OH- binds the extra electron


def test_pyscf_hartree_fock_water_matches_finite_differences():
    settings = ReferenceSettings(code="pyscf", method="HF", basis="sto-3g")
    result = compute_reference(water_molecule(), settings)
    assert result.success, result.reason
    assert result.energy == pytest.approx(-74.96 * 27.2114, abs=1.0)  # HF/STO-3G, about -74.96 Ha
    assert_forces_match_finite_differences(water_molecule(), settings, [(1, 0)], tol=2e-3)


def test_pyscf_failures_are_recorded_with_their_reason():
    unconverged = ReferenceSettings(code="pyscf", method="HF", basis="sto-3g", max_scf_cycles=1)
    result = compute_reference(water_molecule(), unconverged)
    assert not result.success
    assert result.energy is None and result.forces is None
    assert "SCFNotConverged" in result.reason
    odd_spin = ReferenceSettings(code="pyscf", method="HF", basis="sto-3g", multiplicity=2)
    assert not compute_reference(water_molecule(), odd_spin).success  # 10 electrons: no doublet


def test_ase_import_path_calculator_matches_finite_differences():
    argon = Atoms("Ar3", positions=[[0, 0, 0], [3.4, 0, 0], [1.6, 2.9, 0.3]])
    settings = ReferenceSettings(code="ase", calculator=LJ)
    assert isinstance(make_calculator(settings), LennardJones)
    assert_forces_match_finite_differences(argon, settings, [(0, 0), (2, 1)], tol=1e-5)


@pytest.mark.parametrize(
    ("calculator", "reason"),
    [
        (RaisingCalculator(), "the reference code crashed"),
        (ConstantCalculator(energy=float("nan")), "non-finite energy"),
        (ConstantCalculator(force=float("inf")), "non-finite forces"),
        (ConstantCalculator(force=1e4), "above max_force"),
    ],
)
def test_a_failed_calculation_is_a_result_with_its_reason(calculator, reason):
    result = compute_reference(water_molecule(), ReferenceSettings(), calculator)
    assert not result.success
    assert reason in result.reason
    assert result.energy is None and result.forces is None
    assert result.host and result.wall_time >= 0
    assert result.to_atoms().calc is None  # a failed result carries no labels


@pytest.mark.slow
def test_time_limit_kills_a_hung_calculation_and_the_next_one_runs():
    hanging = CalculatorSpec(import_path="test_reference.HangingCalculator", kwargs={})
    settings = ReferenceSettings(code="ase", calculator=hanging, time_limit=1.0)
    argon_dimer = Atoms("Ar2", positions=[[0, 0, 0], [3.8, 0, 0]])
    start = time.perf_counter()
    hung, fine = compute_references([Atoms("Ar3", positions=np.eye(3) * 4), argon_dimer], settings)
    assert time.perf_counter() - start < 30
    assert not hung.success and "time limit of 1.0 s exceeded" in hung.reason
    assert fine.success and np.isfinite(fine.energy)


def test_labelled_atoms_of_a_result_carry_energy_and_forces():
    (result,) = compute_references([water_molecule()], ReferenceSettings())
    atoms = result.to_atoms()
    assert atoms.get_potential_energy() == result.energy
    assert np.allclose(atoms.get_forces(), result.forces)
    assert result.code == "xtb" and result.method == "GFN2-xTB"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"code": "ase"}, "give `calculator`"),
        ({"code": "xtb", "method": "PBE"}, "is not one of"),
        ({"code": "ase", "calculator": LJ.model_dump(), "charge": 1}, "calculator.kwargs"),
        ({"multiplicity": 0}, "greater than or equal to 1"),
        ({"time_limit": -1}, "greater than 0"),
    ],
)
def test_bad_reference_settings_are_rejected_with_a_clear_message(settings, message):
    with pytest.raises(ValidationError, match=message):
        ReferenceSettings(**settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"code": "ase", "calculator": {"import_path": "nowhere.Calc"}}, "cannot be imported"),
        ({"code": "ase", "calculator": {"import_path": "ase.calculators.lj.Nope"}}, "has no"),
        ({"code": "pyscf", "method": "GFN2-xTB"}, "give HF or a functional"),
        ({"code": "pyscf", "basis": "no-such-basis"}, "unknown to pyscf"),
    ],
)
def test_a_reference_code_this_machine_cannot_run_is_refused_at_submit_only(settings, message):
    reference = ReferenceSettings(**settings)  # valid as stored: a job never imports the code
    with pytest.raises(ValueError, match=message):
        reference.check_code()


@pytest.mark.slow
def test_atomate2_static_maker_gives_the_same_energy_as_a_task_document(tmp_path, monkeypatch):
    from pymatgen.io.ase import AseAtomsAdaptor

    monkeypatch.chdir(tmp_path)  # atomate2 writes final_atoms_object.xyz where it runs

    from fff_jobs.reference import atomate2_static_maker

    static = atomate2_static_maker(ReferenceSettings()).make(
        AseAtomsAdaptor.get_molecule(water_molecule())
    )
    responses = run_locally(Flow([static]), log=False)
    document = responses[static.uuid][1].output
    assert type(document).__name__ == "ForceFieldMoleculeTaskDocument"
    expected = compute_reference(water_molecule(), ReferenceSettings())
    assert document.output.energy == pytest.approx(expected.energy, abs=1e-8)
    assert np.allclose(document.output.forces, expected.forces, atol=1e-6)


def test_a_stored_pyscf_spec_is_read_back_without_importing_pyscf():
    """A job validates its campaign's stored spec on any worker, PySCF installed or not."""
    code = (
        "import sys; from fff_jobs.spec import ReferenceSettings; "
        "ReferenceSettings(code='pyscf', basis='no-such-basis'); "
        "print('pyscf' in sys.modules)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "False"
