"""Sampling: MD segments with guards attached to ASE dynamics, and the audit of a segment.

A segment runs velocity Verlet (or Langevin) from Maxwell-Boltzmann velocities, keeps
up to `num_frames` evenly spaced frames, and ends early when a guard (an observer on
the dynamics) sees overlapping atoms, huge forces, a cluster flying apart or
non-finite values, or when the committee's uncertainty passes a threshold: that
frame is where the model stops knowing, and the audit sends it to the reference. The
audit compares the committee's energy of the final frame with the reference and
decides whether the trajectory continues or restarts; passed audits lengthen the next
segment, failed ones shorten it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.md.langevin import Langevin
from ase.md.md import MolecularDynamics
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
from ase.md.verlet import VelocityVerlet
from ase.neighborlist import neighbor_list
from pydantic import BaseModel
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import pdist

from fff_jobs.schemas import AuditDecision, Flag, Frame
from fff_jobs.spec import AuditSettings, MDSettings

# a flag "uncertain" ends a segment where the committee disagrees: not a failure, a frame to learn
FAILURES = ("non_finite", "close_atoms", "large_forces", "flying_apart")


class Segment(BaseModel):
    """What one MD segment produced: kept frames, the final (or flagged) frame, the flag."""

    frames: list[Frame]  # evenly spaced, for committee inference
    energies: list[float]  # the sampling calculator's energy of each kept frame, eV
    final_frame: Frame  # with velocities, to continue from; the last finite one if flagged
    final_energy: float | None  # eV, the sampling calculator's; the audit compares it
    steps: int  # steps actually run
    flag: Flag | None = None  # the guard that ended the segment early
    detail: str | None = None
    uncertainty: float | None = None  # the last value the uncertainty guard computed
    wall_time: float  # s


class GuardLog:
    """Shared by a segment's guards: the first guard to fire records why and stops the dynamics."""

    def __init__(self, dynamics: MolecularDynamics) -> None:
        self.dynamics = dynamics
        self.flag: Flag | None = None
        self.detail: str | None = None
        self.last_good: tuple[np.ndarray, np.ndarray, float] | None = None

    def fire(self, flag: Flag, detail: str) -> None:
        """Record the first failure and end the run after this step."""
        if self.flag is None:
            self.flag, self.detail = flag, f"step {self.dynamics.nsteps}: {detail}"
        self.dynamics.max_steps = self.dynamics.nsteps


def _energy_and_forces(atoms: Atoms) -> tuple[float, np.ndarray]:
    """The calculator's results for the current step, read without re-checking the atoms.

    The dynamics computed them right before calling its observers; going through
    ``atoms.get_forces()`` would compare every array again at each step.
    """
    results = atoms.calc.results
    if "energy" not in results or "forces" not in results:
        return atoms.get_potential_energy(), atoms.get_forces()
    return results["energy"], results["forces"]


class NonFiniteGuard:
    """Fires on non-finite positions, momenta, forces or energy; remembers the last good state."""

    def __init__(self, atoms: Atoms, log: GuardLog) -> None:
        self.atoms, self.log = atoms, log

    def __call__(self) -> None:
        """Check the current step."""
        energy, forces = _energy_and_forces(self.atoms)
        positions, momenta = self.atoms.positions, self.atoms.arrays["momenta"]
        arrays = (positions, momenta, forces)
        if not (np.isfinite(energy) and all(np.isfinite(a).all() for a in arrays)):
            self.log.fire("non_finite", "non-finite positions, momenta, forces or energy")
        elif self.log.flag is None:
            self.log.last_good = (positions.copy(), momenta.copy(), float(energy))


class DistanceGuard:
    """Fires when two atoms come closer than `min_distance` or the structure breaks apart.

    Flying apart: the graph linking atoms closer than `fragment_distance` falls into
    more than one piece (an atom or a molecule left the cluster). Skipped for periodic
    structures, where pieces meet their images.
    """

    def __init__(self, atoms: Atoms, log: GuardLog, settings: MDSettings) -> None:
        self.atoms, self.log = atoms, log
        self.min_distance = settings.min_distance
        self.fragment_distance = settings.fragment_distance
        self.periodic = bool(atoms.pbc.any())
        self.pairs = np.triu_indices(len(atoms), 1)  # the order of pdist's distances

    def __call__(self) -> None:
        """Check the current step."""
        if len(self.atoms) < 2:
            return
        if self.periodic:
            first, second, distances = neighbor_list("ijd", self.atoms, self.min_distance)
        else:
            distances = pdist(self.atoms.positions)
            first, second = self.pairs
        if len(distances) and distances.min() < self.min_distance:
            k = int(np.argmin(distances))
            detail = f"atoms {first[k]} and {second[k]} are {distances[k]:.3f} A apart"
            self.log.fire("close_atoms", detail)
        elif not self.periodic:
            self._check_pieces(distances < self.fragment_distance)

    def _check_pieces(self, near: np.ndarray) -> None:
        if near.all():
            return
        size = len(self.atoms)
        first, second = self.pairs[0][near], self.pairs[1][near]
        graph = coo_matrix((np.ones(first.size), (first, second)), shape=(size, size))
        pieces, _ = connected_components(graph, directed=False)
        if pieces > 1:
            self.log.fire("flying_apart", f"{pieces} pieces over {self.fragment_distance} A")


class ForceGuard:
    """Fires when the force on any atom exceeds `max_force` (eV/A)."""

    def __init__(self, atoms: Atoms, log: GuardLog, max_force: float) -> None:
        self.atoms, self.log, self.max_force = atoms, log, max_force

    def __call__(self) -> None:
        """Check the current step."""
        _, forces = _energy_and_forces(self.atoms)
        largest = float(np.sqrt(np.einsum("ij,ij->i", forces, forces).max()))
        if largest > self.max_force:
            self.log.fire("large_forces", f"force {largest:.3g} eV/A above {self.max_force}")


class UncertaintyGuard:
    """Fires when the committee's uncertainty of the current frame passes `threshold`.

    ``estimate`` maps the atoms to the uncertainty (the committee's largest per-atom
    force deviation, eV/A, or its energy spread, eV/atom); it runs every
    `uncertainty_interval` steps, since it costs a whole committee evaluation. It skips
    the starting frame: that is the frame the last audit computed, or the trajectory's
    start, so stopping there would move nothing while the audit paid for that frame again.
    """

    def __init__(
        self, atoms: Atoms, log: GuardLog, estimate: Callable[[Atoms], float], threshold: float
    ) -> None:
        self.atoms, self.log, self.estimate, self.threshold = atoms, log, estimate, threshold
        self.last: float | None = None

    def __call__(self) -> None:
        """Estimate the current frame's uncertainty; stop the segment above the threshold."""
        if self.log.flag is not None or self.log.dynamics.nsteps == 0:
            return
        self.last = float(self.estimate(self.atoms))
        if self.last > self.threshold:
            self.log.fire("uncertain", f"uncertainty {self.last:.3g} above {self.threshold:.3g}")


class FrameRecorder:
    """Keeps the frames at the chosen steps (and their energies), unless they are non-finite."""

    def __init__(self, atoms: Atoms, log: GuardLog, steps: set[int]) -> None:
        self.atoms, self.log, self.steps = atoms, log, steps
        self.frames: list[Frame] = []
        self.energies: list[float] = []

    def __call__(self) -> None:
        """Keep this step's frame if it is one of the chosen steps."""
        if self.log.dynamics.nsteps in self.steps and self.log.flag != "non_finite":
            self.frames.append(Frame.from_atoms(self.atoms, velocities=True))
            self.energies.append(float(_energy_and_forces(self.atoms)[0]))


def kept_steps(num_steps: int, num_frames: int) -> set[int]:
    """Steps whose frames are kept: up to `num_frames`, evenly spaced, the last one included."""
    count = min(num_frames, num_steps)
    return {int(s) for s in np.round(np.linspace(num_steps / count, num_steps, count))}


def make_dynamics(
    atoms: Atoms, settings: MDSettings, seed: int, temperature: float | None = None
) -> MolecularDynamics:
    """Velocity Verlet, or Langevin at `temperature` (K; default: the lowest of the settings');
    draws velocities for atoms at rest."""
    temperature = temperature or settings.temperatures[0]
    rng = np.random.default_rng(seed)
    if not atoms.has("momenta") or not atoms.get_momenta().any():
        thermalize_momenta(atoms, temperature, rng=rng)
        Stationary(atoms)
        if not atoms.pbc.any():
            ZeroRotation(atoms)
    timestep = settings.timestep * units.fs
    if settings.thermostat == "langevin":
        friction = settings.friction / units.fs
        # fixcm=False: ASE's centre-of-mass fix skews the sampled ensemble of small systems
        # (deprecated since 3.28); an isolated cluster's drift changes no energy or force
        return Langevin(
            atoms, timestep, temperature_K=temperature, friction=friction, fixcm=False, rng=rng
        )
    return VelocityVerlet(atoms, timestep)


def attach_guards(dynamics: MolecularDynamics, settings: MDSettings) -> GuardLog:
    """Attach the guards as observers of the dynamics; the log says whether one fired."""
    log = GuardLog(dynamics)
    atoms = dynamics.atoms
    interval = settings.guard_interval
    dynamics.attach(NonFiniteGuard(atoms, log), interval=interval)
    dynamics.attach(DistanceGuard(atoms, log, settings), interval=interval)
    dynamics.attach(ForceGuard(atoms, log, settings.max_force), interval=interval)
    return log


def run_segment(
    atoms: Atoms,
    calculator: Calculator,
    settings: MDSettings,
    num_steps: int | None = None,
    num_frames: int | None = None,
    seed: int = 0,
    temperature: float | None = None,
    uncertainty: Callable[[Atoms], float] | None = None,
) -> Segment:
    """Run one MD segment from `atoms` (its velocities, or fresh ones) with guards attached.

    `temperature` defaults to the lowest of the settings' temperatures. With an
    `uncertainty` estimate, the segment also stops at the first checked frame whose
    uncertainty passes `settings.uncertainty_threshold`.
    """
    num_steps = num_steps or settings.run_length
    start = time.perf_counter()
    work = atoms.copy()
    work.calc = calculator
    dynamics = make_dynamics(work, settings, seed, temperature)
    log = attach_guards(dynamics, settings)
    guard = None
    if uncertainty is not None and settings.uncertainty_threshold is not None:
        guard = UncertaintyGuard(work, log, uncertainty, settings.uncertainty_threshold)
        dynamics.attach(guard, interval=settings.uncertainty_interval)
    recorder = FrameRecorder(work, log, kept_steps(num_steps, num_frames or settings.num_frames))
    dynamics.attach(recorder, interval=1)
    dynamics.run(num_steps)
    final_energy = _final_state(work, log)
    return Segment(
        frames=recorder.frames,
        energies=recorder.energies,
        final_frame=Frame.from_atoms(work, velocities=True),
        final_energy=final_energy,
        steps=dynamics.nsteps,
        flag=log.flag,
        detail=log.detail,
        uncertainty=guard.last if guard else None,
        wall_time=time.perf_counter() - start,
    )


def _final_state(atoms: Atoms, log: GuardLog) -> float | None:
    """Energy of the frame the audit computes; rewinds to the last good state after NaNs."""
    if log.flag != "non_finite":
        return float(atoms.get_potential_energy())
    if log.last_good is None:
        return None
    atoms.calc = None
    positions, momenta, energy = log.last_good
    atoms.set_positions(positions)
    atoms.set_momenta(momenta)
    return energy


def next_run_length(run_length: int, passed: bool, settings: AuditSettings) -> int:
    """A passed audit multiplies the run length by `growth`, a failed one divides it by it.

    Clipped to [min_run_length, max_run_length]: trajectories that keep passing reach
    picosecond segments; one that fails goes back to short, closely audited ones.
    """
    length = run_length * settings.growth if passed else run_length / settings.growth
    return int(np.clip(round(length), settings.min_run_length, settings.max_run_length))


def audit_tolerance(settings: AuditSettings, energy_error: float | None) -> float:
    """The energy tolerance of an audit (eV/atom), from what the committee can reach.

    `tolerance_factor` times the committee's out-of-sample energy error per atom
    (``energy_error``), within [energy_tolerance, max_energy_tolerance]: a frame the
    model gets about as right as the frames it was validated on passes, so trajectories
    advance where the model is good. Without a factor, or an error to scale, the
    tolerance is `energy_tolerance`.
    """
    if settings.tolerance_factor is None or energy_error is None or not np.isfinite(energy_error):
        return settings.energy_tolerance
    scaled = settings.tolerance_factor * energy_error
    return float(np.clip(scaled, settings.energy_tolerance, settings.max_energy_tolerance))


def audit_decision(
    ml_energy: float | None,
    reference_energy: float | None,
    n_atoms: int,
    flag: Flag | None,
    run_length: int,
    tolerance: float,
    settings: AuditSettings,
) -> AuditDecision:
    """Continue if |E_ML - E_ref| / n_atoms < tolerance and no guard failed, else restart.

    A segment that the uncertainty guard ended is audited like any other: its final
    frame is where the committee disagreed, and the reference decides.
    """
    error = None
    if reference_energy is not None and ml_energy is not None and np.isfinite(ml_energy):
        error = abs(ml_energy - reference_energy) / n_atoms
    if flag in FAILURES:
        action, reason = "restart", f"guard {flag} ended the segment"
    elif reference_energy is None:
        action, reason = "restart", "the reference calculation failed"
    elif error is None:
        action, reason = "restart", "the model's energy is not finite"
    elif error < tolerance:
        action, reason = "continue", f"error {error:.3g} eV/atom below tolerance {tolerance:.3g}"
    else:
        action, reason = "restart", f"error {error:.3g} eV/atom not below tolerance {tolerance:.3g}"
    return AuditDecision(
        action=action,
        reason=reason,
        error_per_atom=error,
        tolerance=tolerance,
        run_length=next_run_length(run_length, action == "continue", settings),
    )
