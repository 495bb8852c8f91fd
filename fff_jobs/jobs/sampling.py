"""jobflow jobs of sampling: an MD segment on a GPU worker and the audit of its final frame.

The segment's kept frames go to the job store's `data` store; its final frame, energy
and flag stay in the output document, where the audit job reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ase import Atoms
from ase.calculators.calculator import Calculator
from jobflow import Job, Maker, OutputReference, job
from pydantic import BaseModel

from fff_jobs.jobs.reference import AUDIT_PRIORITY
from fff_jobs.reference import ReferenceResult, compute_references
from fff_jobs.routing import CPU, GPU, route
from fff_jobs.sampling import AuditDecision, Flag, Segment, audit_decision, run_segment
from fff_jobs.spec import (
    AuditSettings,
    CalculatorSpec,
    MDSettings,
    ReferenceSettings,
    StructureSettings,
    import_object,
)
from fff_jobs.structures import Frame, check_structure

SEGMENT_DATA = ["frames"]


def sampling_calculator(model: str | CalculatorSpec, settings: MDSettings) -> Calculator:
    """The calculator MD runs with: a MACE `.model` file, or any ASE calculator spec."""
    if isinstance(model, CalculatorSpec):
        return import_object(model.import_path)(**model.kwargs)
    import torch
    from mace.calculators import MACECalculator

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return MACECalculator(model_paths=[model], device=device, default_dtype=settings.dtype)


@dataclass
class SegmentMaker(Maker):
    """Run one MD segment of a trajectory with the sampling model."""

    name: str = "md segment"
    settings: MDSettings = field(default_factory=MDSettings)
    priority: int = 0

    def make(
        self,
        start: Atoms | Frame | OutputReference,
        model: str | CalculatorSpec,
        num_steps: int | None = None,
        seed: int = 0,
    ) -> Job:
        """A GPU job; `start` keeps its velocities, if it has any, to continue a trajectory."""
        if isinstance(start, Atoms):
            start = Frame.from_atoms(start, velocities=start.has("momenta"))
        if isinstance(start, Frame):
            checks = StructureSettings(min_distance=self.settings.min_distance)
            check_structure(start.to_atoms(), checks, "starting structure of the segment")
        return route(self.run(start, model, num_steps, seed), GPU, self.priority)

    @job(data=SEGMENT_DATA)
    def run(
        self, start: Frame, model: str | CalculatorSpec, num_steps: int | None, seed: int
    ) -> Segment:
        """The segment: kept frames (data store), final frame, its energy, the flag."""
        calculator = sampling_calculator(model, self.settings)
        atoms = Frame.model_validate(start).to_atoms()
        return run_segment(atoms, calculator, self.settings, num_steps, seed=seed)


class AuditOutput(BaseModel):
    """The reference result of a segment's final frame and what the trajectory does next."""

    result: ReferenceResult
    ml_energy: float | None
    decision: AuditDecision


@dataclass
class AuditMaker(Maker):
    """Compute a segment's final frame with the reference and decide: continue or restart."""

    name: str = "audit"
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    priority: int = AUDIT_PRIORITY

    def make(self, segment: Segment | OutputReference, run_length: int) -> Job:
        """A CPU job, above ordinary calculations in priority; reads only the segment's summary."""
        audit = self.run(segment.final_frame, segment.final_energy, segment.flag, run_length)
        return route(audit, CPU, self.priority)

    @job
    def run(
        self,
        final_frame: Frame,
        ml_energy: float | None,
        flag: Flag | None,
        run_length: int,
    ) -> AuditOutput:
        """The reference result, the audit decision (at the fixed tolerance) and the next length."""
        atoms = Frame.model_validate(final_frame).to_atoms()
        (result,) = compute_references([atoms], self.reference)
        tolerance = self.audit.energy_tolerance
        decision = audit_decision(
            ml_energy, result.energy, len(atoms), flag, run_length, tolerance, self.audit
        )
        return AuditOutput(result=result, ml_energy=ml_energy, decision=decision)
