"""Reference calculations: energies and forces of frames from xTB, PySCF or any ASE calculator.

A calculation never raises: whatever goes wrong (an exception, an SCF that does not
converge, non-finite or implausibly large values, the time limit) becomes a failed
`ReferenceResult` with its reason, and failed results never enter a training set.

Threads: nothing here sets thread counts. tblite (OpenMP) and PySCF read
OMP_NUM_THREADS, which the worker sets; a child process inherits it.

Time limit: with `time_limit` set, calculations run in a spawned child process that
is reused from one structure to the next and killed (SIGKILL) when a calculation runs
past the limit, so even a calculation hung inside compiled code stops. Spawn, not fork:
a forked child of a process that already ran OpenMP or torch threads can deadlock.
Without a limit, calculations run in-process, without that overhead.
"""

from __future__ import annotations

import multiprocessing
import socket
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import CalculationFailed, Calculator, InputError, all_changes
from ase.units import Bohr, Hartree

from fff_jobs.schemas import Frame, ReferenceResult
from fff_jobs.spec import ReferenceSettings, import_object

CHILD_START_TIMEOUT = 120.0  # s allowed for a child process to import the reference code


class SCFNotConverged(CalculationFailed):
    """The self-consistent field did not converge."""


class PySCFCalculator(Calculator):
    """ASE calculator over PySCF's SCF energy and analytic gradient: pyscf ships none.

    Molecules only (no periodic cell). Restricted for singlets, unrestricted otherwise.
    """

    implemented_properties = ("energy", "forces")
    default_parameters: dict[str, Any] = {  # noqa: RUF012 (ASE's interface)
        "method": "HF",
        "basis": "def2-svp",
        "charge": 0,
        "multiplicity": 1,
        "max_cycle": 200,
    }

    def calculate(
        self, atoms: Atoms | None = None, properties: Any = ("energy",), system_changes: Any = None
    ) -> None:
        """Run the SCF and its nuclear gradient; raise SCFNotConverged when it does not converge."""
        super().calculate(atoms, properties, system_changes or all_changes)
        if self.atoms.pbc.any():
            raise InputError("the PySCF calculator handles molecules only (no periodic cell)")
        scf = _scf_method(self.atoms, self.parameters)
        energy = scf.kernel()
        if not scf.converged:
            raise SCFNotConverged(f"SCF did not converge in {self.parameters.max_cycle} cycles")
        gradient = scf.nuc_grad_method().kernel()
        self.results = {"energy": energy * Hartree, "forces": -gradient * Hartree / Bohr}


def _scf_method(atoms: Atoms, parameters: Any) -> Any:
    from pyscf import dft, gto, scf

    molecule = gto.M(
        atom=list(zip(atoms.get_chemical_symbols(), atoms.positions.tolist(), strict=True)),
        unit="Angstrom",
        basis=parameters.basis,
        charge=parameters.charge,
        spin=parameters.multiplicity - 1,
        verbose=0,
    )
    open_shell = molecule.spin > 0
    if parameters.method.upper() == "HF":
        method = scf.UHF(molecule) if open_shell else scf.RHF(molecule)
    else:
        method = dft.UKS(molecule) if open_shell else dft.RKS(molecule)
        method.xc = parameters.method
    method.max_cycle = parameters.max_cycle
    return method


def calculator_import(settings: ReferenceSettings) -> tuple[str, dict[str, Any]]:
    """Import path and keyword arguments of the calculator the settings ask for."""
    if settings.code == "xtb":
        kwargs = {"charge": settings.charge, "multiplicity": settings.multiplicity}
        return "tblite.ase.TBLite", {"method": settings.method, **kwargs, "verbosity": 0}
    if settings.code == "pyscf":
        return f"{__name__}.PySCFCalculator", {
            "method": settings.method,
            "basis": settings.basis,
            "charge": settings.charge,
            "multiplicity": settings.multiplicity,
            "max_cycle": settings.max_scf_cycles,
        }
    assert settings.calculator is not None  # guaranteed by ReferenceSettings
    return settings.calculator.import_path, dict(settings.calculator.kwargs)


def atomate2_static_maker(settings: ReferenceSettings):
    """atomate2's ForceFieldStaticMaker running the reference these settings ask for.

    For users who want atomate2's task documents in their own flows: it takes a pymatgen
    Molecule or Structure and returns a ForceFieldMoleculeTaskDocument or
    ForceFieldTaskDocument. It raises on failure and has no time limit; route the job
    yourself (:func:`fff_jobs.routing.route`).
    """
    from atomate2.forcefields.jobs import ForceFieldStaticMaker

    path, kwargs = calculator_import(settings)
    module, _, name = path.rpartition(".")
    return ForceFieldStaticMaker(
        name=f"reference static ({settings.code})",
        force_field_name={"@module": module, "@callable": name},
        calculator_kwargs=kwargs,
    )


def make_calculator(settings: ReferenceSettings) -> Calculator:
    """The ASE calculator the settings ask for, with their charge and spin."""
    path, kwargs = calculator_import(settings)
    return import_object(path)(**kwargs)


def compute_reference(
    atoms: Atoms, settings: ReferenceSettings, calculator: Calculator | None = None
) -> ReferenceResult:
    """Energy and forces of one frame, in-process; every failure is returned, never raised."""
    start = time.perf_counter()
    energy = forces = None
    try:
        work = atoms.copy()
        work.calc = calculator or make_calculator(settings)
        energy = float(work.get_potential_energy())
        forces = np.asarray(work.get_forces(), dtype=float)
        reason = implausible(energy, forces, len(atoms), settings.max_force)
    except Exception as error:  # any failure of the reference code is a result, not a crash
        reason = f"{type(error).__name__}: {error}"
    return _result(atoms, settings, energy, forces, reason, time.perf_counter() - start)


def implausible(energy: float, forces: np.ndarray, n_atoms: int, max_force: float) -> str | None:
    """Why energy and forces cannot be trusted (non-finite, wrong shape, huge force), or None."""
    if not np.isfinite(energy):
        return f"non-finite energy {energy}"
    if forces.shape != (n_atoms, 3):
        return f"forces of shape {forces.shape}, expected ({n_atoms}, 3)"
    if not np.isfinite(forces).all():
        return "non-finite forces"
    largest = float(np.linalg.norm(forces, axis=1).max())
    if largest > max_force:
        return f"largest force {largest:.3g} eV/A is above max_force {max_force} eV/A"
    return None


def _result(
    atoms: Atoms,
    settings: ReferenceSettings,
    energy: float | None,
    forces: np.ndarray | None,
    reason: str | None,
    wall_time: float,
) -> ReferenceResult:
    success = reason is None
    return ReferenceResult(
        frame=Frame.from_atoms(atoms),
        success=success,
        energy=energy if success else None,
        forces=forces.tolist() if success and forces is not None else None,
        reason=reason,
        wall_time=wall_time,
        host=socket.gethostname(),
        code=settings.code,
        method=settings.method if settings.code != "ase" else _import_path(settings),
    )


def _import_path(settings: ReferenceSettings) -> str | None:
    return settings.calculator.import_path if settings.calculator else None


def compute_references(
    structures: Sequence[Atoms], settings: ReferenceSettings
) -> list[ReferenceResult]:
    """One result per structure, failures included; runs under the time limit when one is set."""
    if settings.time_limit is not None:
        return _compute_with_time_limit(structures, settings)
    results = []
    calculator = None
    for atoms in structures:
        calculator = calculator or _try_make_calculator(settings)
        result = compute_reference(atoms, settings, calculator)
        if not result.success:
            calculator = None  # a failed calculator may hold a broken state
        results.append(result)
    return results


def _try_make_calculator(settings: ReferenceSettings) -> Calculator | None:
    """The calculator, or None: compute_reference then tries again and records the error."""
    try:
        return make_calculator(settings)
    except Exception:
        return None


def _compute_with_time_limit(
    structures: Sequence[Atoms], settings: ReferenceSettings
) -> list[ReferenceResult]:
    assert settings.time_limit is not None
    results = []
    child: _Child | None = None
    for atoms in structures:
        child = child or _Child(settings)
        start = time.perf_counter()
        result = child.compute(atoms, settings.time_limit)
        if isinstance(result, str):
            child.close()
            child = None
            result = _result(atoms, settings, None, None, result, time.perf_counter() - start)
        results.append(result)
    if child is not None:
        child.close()
    return results


class _Child:
    """A spawned process that runs calculations one at a time until it is closed or killed."""

    def __init__(self, settings: ReferenceSettings) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child_end, settings.model_dump()), daemon=True
        )
        self._process.start()
        child_end.close()
        self._ready = self._connection.poll(CHILD_START_TIMEOUT) and self._connection.recv()

    def compute(self, atoms: Atoms, time_limit: float) -> ReferenceResult | str:
        """The result, or why there is none (time limit passed, child died)."""
        if not self._ready:
            return "the child process for the calculation did not start"
        self._connection.send(atoms.copy())
        if not self._connection.poll(time_limit):
            return f"time limit of {time_limit} s exceeded; calculation killed"
        try:
            return ReferenceResult.model_validate(self._connection.recv())
        except EOFError:
            return f"the calculation's process died (exit code {self._process.exitcode})"

    def close(self) -> None:
        """Kill the child process and reap it."""
        self._process.kill()
        self._process.join()
        self._connection.close()


def _serve(connection: Connection, settings: dict[str, Any]) -> None:
    """The child's loop; the reference code is imported before it says it is ready, so the
    time limit counts calculations, not imports."""
    reference = ReferenceSettings.model_validate(settings)
    calculator = _try_make_calculator(reference)
    connection.send(True)
    while True:
        try:
            atoms = connection.recv()
        except EOFError:
            return
        calculator = calculator or _try_make_calculator(reference)
        result = compute_reference(atoms, reference, calculator)
        if not result.success:
            calculator = None
        connection.send(result.model_dump())
