"""Every document fff-jobs stores in MongoDB, as a pydantic model: what is written is what is read.

:mod:`fff_jobs.database` writes these models (:meth:`Stored.document`) and reads them
back (``model_validate``); nothing else touches the collections. Field names are the
vocabulary of the README's queries: a campaign and its generations, trajectories and
their segments, pooled frames, selections, reference results, registered models,
budget claims, training snapshots and starting structures. Science modules share the
few documents that travel through them (a frame, a reference result, an audit decision).
"""

from __future__ import annotations

import datetime
from typing import Any, Literal

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from pydantic import BaseModel, ConfigDict, Field, field_serializer

from fff_jobs.calibration import CalibrationRecord, Prediction
from fff_jobs.spec import CampaignSpec

NO_GENERATION = -1
RUNNING, COMPLETE = "running", "complete"
SAMPLING, RETIRED, STOPPED = "sampling", "retired", "stopped"
POOLED, CLAIMED, SELECTED, DISCARDED = "pooled", "claimed", "selected", "discarded"
CampaignStatus = Literal["running", "complete"]
TrajectoryStatus = Literal["sampling", "retired", "stopped"]
FrameStatus = Literal["pooled", "claimed", "selected", "discarded"]
Source = Literal["initial", "audit", "active"]
Flag = Literal["non_finite", "close_atoms", "large_forces", "flying_apart", "uncertain"]


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# --- what travels through the science: structures, reference results, audit decisions ---


class Frame(BaseModel):
    """One structure as it travels through jobs and the database (A; velocities in ASE units)."""

    numbers: list[int]
    positions: list[list[float]]
    cell: list[list[float]]
    pbc: list[bool]
    velocities: list[list[float]] | None = None  # ASE velocity units; kept to continue MD
    info: dict[str, Any] = {}

    @classmethod
    def from_atoms(cls, atoms: Atoms, velocities: bool = False) -> Frame:
        """Document of an Atoms object; velocities only when asked for."""
        info = {k: v for k, v in atoms.info.items() if isinstance(v, str | int | float | bool)}
        return cls(
            numbers=atoms.numbers.tolist(),
            positions=atoms.positions.tolist(),
            cell=atoms.cell.array.tolist(),
            pbc=atoms.pbc.tolist(),
            velocities=atoms.get_velocities().tolist() if velocities else None,
            info=info,
        )

    def to_atoms(self) -> Atoms:
        """The Atoms object, with velocities when the frame has them."""
        atoms = Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
        if self.velocities is not None:
            atoms.set_velocities(self.velocities)
        atoms.info.update(self.info)
        return atoms


class ReferenceResult(BaseModel):
    """Energy and forces of one frame from the reference, or why there are none."""

    frame: Frame
    success: bool
    energy: float | None = None  # eV
    forces: list[list[float]] | None = None  # eV/A
    reason: str | None = None  # why the calculation failed
    wall_time: float  # s
    host: str
    code: str
    method: str | None = None

    def to_atoms(self) -> Atoms:
        """The frame, with energy and forces attached when the calculation succeeded."""
        atoms = self.frame.to_atoms()
        if self.success:
            atoms.calc = SinglePointCalculator(
                atoms, energy=self.energy, forces=np.asarray(self.forces)
            )
        return atoms


class AuditDecision(BaseModel):
    """Whether a trajectory continues from its final frame, and its next segment's length."""

    action: Literal["continue", "restart"]
    reason: str
    error_per_atom: float | None  # |E_ML - E_ref| / n_atoms, eV/atom
    tolerance: float  # eV/atom, the tolerance this audit applied
    run_length: int  # steps of the next segment


# --- stored documents ---


class Stored(BaseModel):
    """A document of one of fff's collections; ``id`` is its ``_id``."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    id: str = Field(alias="_id")

    def document(self) -> dict[str, Any]:
        """The document as it is stored (``_id``, nested models as mappings)."""
        return self.model_dump(by_alias=True)


class Budget(BaseModel):
    """Reference calculations the campaign may spend (audits and selected frames) and has."""

    num_to_run: int
    spent: int = 0

    @property
    def left(self) -> int:
        return max(self.num_to_run - self.spent, 0)


class TrainingState(BaseModel):
    """The newest training round: claimed by one job, running until its follow-up ends it."""

    running: bool = False
    generation: int = NO_GENERATION
    trained_results: int = 0  # successful results in the newest round's snapshot
    owner: str | None = None  # the uuid of the job that claimed the round
    claimed_at: datetime.datetime | None = None


class FollowUpClaim(BaseModel):
    """Which job follows up a published generation (records it, adds what comes next)."""

    generation: int
    owner: str
    claimed_at: datetime.datetime


class SelectionState(BaseModel):
    """At most one inference-and-selection job waits at a time; ``count`` numbers them."""

    pending: bool = False
    count: int = 0
    owner: str | None = None
    claimed_at: datetime.datetime | None = None


class GenerationRecord(BaseModel):
    """One published generation's figures: data, budget spent and out-of-sample errors."""

    generation: int
    training_set_size: int
    reference_spent: int
    healthy_members: int
    validation_energy_mae_per_atom: float
    validation_force_mae: float
    validation_force_rmse: float
    validation_frames: int
    published_at: datetime.datetime


class Campaign(Stored):
    """``campaigns``: the spec as validated at submit, the budget, and the steering state."""

    name: str
    spec: CampaignSpec
    status: CampaignStatus = RUNNING
    stop_reason: str | None = None
    created_at: datetime.datetime = Field(default_factory=now)
    finished_at: datetime.datetime | None = None
    budget: Budget
    sequence: int = 0  # reference results numbered so far (their storing order)
    initial_results: int = 0  # successful initial results (generation 0 trains on them)
    training: TrainingState = Field(default_factory=TrainingState)
    followed_up_generation: int = NO_GENERATION
    follow_up: FollowUpClaim | None = None
    committee: list[ModelRecord] = []  # the members of that generation: they sample and select
    # a trajectory retired or stopped since the last revival (only then may none be sampling)
    idle_trajectories: bool = False
    selection: SelectionState = Field(default_factory=SelectionState)
    generations: list[GenerationRecord] = []

    @field_serializer("spec")
    def _plain_spec(self, spec: CampaignSpec) -> dict[str, Any]:
        return spec.model_dump(mode="json")

    @property
    def running(self) -> bool:
        return self.status == RUNNING


class StartingStructure(Stored):
    """``starting_structures`` (trajectories start and restart here) and ``initial_data``
    (frames the reference labels for generation 0), in the order given."""

    campaign_id: str
    index: int
    frame: Frame


class NewCampaign(BaseModel):
    """What submitting a campaign stores: the checked spec and the structures it starts from.

    Built at submit, where files are read; written to the database by `fff submit`, or
    carried by the first job of a workflow file (`fff submit --to-file`, `lpad add`).
    """

    campaign_id: str
    spec: CampaignSpec
    starting_structures: list[Frame]
    initial_data: list[Frame] = []  # empty for water clusters: generated by the ingest job


class SegmentRecord(BaseModel):
    """One finished MD segment, as its trajectory's history keeps it."""

    segment: int
    steps: int
    flag: Flag | None = None
    detail: str | None = None
    generation: int
    temperature: float | None = None
    final_energy: float | None = None  # eV, the sampling model's
    wall_time: float


class LastSegment(SegmentRecord):
    """The newest segment, with what its audit needs: the final frame and its prediction."""

    final_frame: Frame
    prediction: Prediction | None = None  # the committee's, for the calibration record


def trajectory_id_for(campaign_id: str, index: int) -> str:
    """A trajectory's id: its campaign's, then its name within the campaign (``t000``)."""
    return f"{campaign_id}-t{index:03d}"


def trajectory_name(trajectory_id: str) -> str:
    """A trajectory's name within its campaign (``t000``), from its id."""
    return trajectory_id.rsplit("-", 1)[1]


class Trajectory(Stored):
    """``trajectories``: where a trajectory is, how long its next segment runs, its history."""

    campaign_id: str
    index: int
    temperature: float | None = None
    start_frame: Frame
    current_frame: Frame
    run_length: int
    segments_completed: int = 0
    audits_completed: int = 0
    failures: int = 0  # failed audits in a row
    restarts: int = 0
    status: TrajectoryStatus = SAMPLING
    revived_generation: int | None = None  # the generation that last brought it back
    last_segment: LastSegment | None = None
    last_audit: AuditDecision | None = None
    segments: list[SegmentRecord] = []  # every finished segment (read only for reports)


class PooledFrame(Stored):
    """``frame_pool``: a frame an MD segment kept, until a selection picks or discards it."""

    campaign_id: str
    trajectory_id: str
    segment: int
    generation: int
    frame: Frame
    sampling_energy: float
    stored_at: datetime.datetime = Field(default_factory=now)
    status: FrameStatus = POOLED
    selection_id: str | None = None
    claimed_at: datetime.datetime | None = None
    uncertainty: float | None = None  # the committee's, once scored
    prediction: Prediction | None = None  # kept for the frames selected


class Selection(Stored):
    """``selections``: one inference-and-selection: how many frames it scored, which it picked."""

    campaign_id: str
    generation: int | None
    scored: int
    selected: list[str]
    wall_time: float = 0.0
    stored_at: datetime.datetime = Field(default_factory=now)


class StoredResult(ReferenceResult, Stored):
    """``reference_results``: a reference calculation with its source and provenance."""

    campaign_id: str
    source: Source
    sequence: int = 0
    stored_at: datetime.datetime = Field(default_factory=now)
    trajectory_id: str | None = None
    segment: int | None = None
    generation: int | None = None  # the committee that sampled (or selected) the frame
    selection_id: str | None = None
    frame_id: str | None = None
    audit: AuditDecision | None = None  # audits: the decision taken on this result
    calibration: CalibrationRecord | None = None  # the committee's prediction beside its error


class BudgetClaim(Stored):
    """``budget_claims``: one reference calculation spent, in slot ``slot`` of the budget."""

    campaign_id: str
    slot: int
    result_id: str
    owner: str  # the uuid of the job that claimed it
    claimed_at: datetime.datetime = Field(default_factory=now)


class TrainingSnapshot(Stored):
    """``training_snapshots``: the results one generation trains on, recorded once."""

    campaign_id: str
    generation: int
    result_ids: list[str]
    final: bool = False  # taken once the whole budget was spent: the delivered committee
    taken_at: datetime.datetime = Field(default_factory=now)


class ModelRecord(Stored):
    """``models``: one registered committee member; its weights lie in GridFS."""

    id: str = Field("", alias="_id")  # set when registered: <campaign>-g<gen>-m<member>
    campaign_id: str
    generation: int
    member: int
    committee_size: int
    hyperparameters: dict[str, Any] = {}
    seed: int | None = None
    attempts: int = 1
    training_set_hash: str | None = None
    training_set_size: int | None = None
    validation_set_size: int | None = None
    parent_model: str | None = None
    metrics: dict[str, float] = {}
    loss: str | None = None  # the loss it trained with (the delivered generation's may differ)
    epochs: int | None = None
    best_epoch: int | None = None
    wall_time: float | None = None
    device: str | None = None
    versions: dict[str, str] = {}
    diverged: str | None = None  # why training diverged; such members never predict
    weights_id: Any = None  # GridFS file id
    weights_sha256: str = ""
    weights_bytes: int = 0
    registered_at: datetime.datetime = Field(default_factory=now)


class RegistryRecord(Stored):
    """``model_registry``: a campaign's current (newest complete) generation."""

    current_generation: int = NO_GENERATION
    members: list[str] = []
    published_at: datetime.datetime | None = None


Campaign.model_rebuild()
