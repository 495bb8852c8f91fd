"""jobflow job of reference calculations: energies and forces of frames on a CPU worker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ase import Atoms
from jobflow import Job, Maker, OutputReference, job

from fff_jobs.reference import ReferenceResult, calculator_import, compute_references
from fff_jobs.routing import CPU, route
from fff_jobs.spec import ReferenceSettings
from fff_jobs.structures import Frame

CALCULATION_PRIORITY = 1  # selected (active-learning) and initial frames
AUDIT_PRIORITY = 10  # audits keep trajectories moving, so they go first


def as_frames(
    structures: Sequence[Atoms | Frame | dict] | OutputReference,
) -> list[Frame] | OutputReference:
    """Frames from Atoms, Frames or their dicts; an OutputReference is passed on unresolved."""
    if isinstance(structures, OutputReference):
        return structures
    return [
        Frame.from_atoms(s) if isinstance(s, Atoms) else Frame.model_validate(s) for s in structures
    ]


@dataclass
class ReferenceMaker(Maker):
    """Compute reference energies and forces of frames; one result per frame, failures included."""

    name: str = "reference calculation"
    settings: ReferenceSettings = field(default_factory=ReferenceSettings)
    priority: int = CALCULATION_PRIORITY

    def make(self, frames: Sequence[Atoms | Frame | dict] | OutputReference) -> Job:
        """A CPU job over `frames`."""
        return route(self.calculate(as_frames(frames)), CPU, self.priority)

    @job
    def calculate(self, frames: list[Frame]) -> list[ReferenceResult]:
        """Run the reference on each frame (under the time limit, if one is set)."""
        structures = [Frame.model_validate(frame).to_atoms() for frame in frames]
        return compute_references(structures, self.settings)


def atomate2_static_maker(settings: ReferenceSettings) -> Maker:
    """The same reference calculation as atomate2's ForceFieldStaticMaker.

    For users who want atomate2's task documents: it takes a pymatgen Molecule or
    Structure and returns a ForceFieldMoleculeTaskDocument or ForceFieldTaskDocument.
    It raises on failure and has no time limit; route the job yourself (``route``).
    """
    from atomate2.forcefields.jobs import ForceFieldStaticMaker

    path, kwargs = calculator_import(settings)
    module, _, name = path.rpartition(".")
    return ForceFieldStaticMaker(
        name=f"reference static ({settings.code})",
        force_field_name={"@module": module, "@callable": name},
        calculator_kwargs=kwargs,
    )
