"""The campaign's jobs: one jobflow Maker per stage, and the workflow that starts a campaign.

These Makers are the only implementation of the stages: `fff submit` adds an
:class:`IngestMaker` job, and from then on every job adds the next ones at run time
(what follows what is decided in :mod:`fff_jobs.steering`; what each job does is in
:mod:`fff_jobs.campaign`). Compose them into your own flows the same way, e.g. start a
campaign after a job of yours, or train one member again. Each Maker makes one job of
one campaign, named ``<campaign id> <stage> ...`` (so `lpad get_fws -q` finds it) and
routed to its worker category at its priority: by default those of
:class:`~fff_jobs.spec.WorkerSettings`, in a campaign those of its spec
(:meth:`StageMaker.for_workers`). Jobs pass ids, never data: each reads what it needs
from the database when it runs, so a workflow stays small however much it computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from jobflow import Flow, Job, Maker, Response, job

from fff_jobs import campaign, steering
from fff_jobs.config import project_database
from fff_jobs.routing import route
from fff_jobs.schemas import Campaign, NewCampaign, trajectory_name
from fff_jobs.spec import CampaignSpec, WorkerSettings
from fff_jobs.workers import grow

DEFAULT_WORKERS = WorkerSettings()


def workflow_name(campaign_id: str) -> str:
    """The name of every FireWorks workflow of a campaign."""
    return f"fff campaign {campaign_id}"


@dataclass
class StageMaker(Maker):
    """Makes the jobs of one stage: its name, worker category and FireWorks priority.

    ``category`` and ``priority`` default to the stage's settings in
    :class:`~fff_jobs.spec.WorkerSettings` (``worker_settings`` names them).
    """

    name: str = ""
    category: str | None = None
    priority: int | None = None
    worker_settings: ClassVar[tuple[str, str]]  # the WorkerSettings fields of the stage

    def __post_init__(self) -> None:
        category, priority = self.routing(DEFAULT_WORKERS)
        self.category = category if self.category is None else self.category
        self.priority = priority if self.priority is None else self.priority

    @classmethod
    def routing(cls, workers: WorkerSettings) -> tuple[str, int]:
        """The worker category and priority these worker settings give the stage."""
        category, priority = cls.worker_settings
        return getattr(workers, category), getattr(workers, priority)

    @classmethod
    def for_workers(cls, workers: WorkerSettings) -> StageMaker:
        """The Maker with the category and priority a campaign's worker settings give."""
        category, priority = cls.routing(workers)
        return cls(category=category, priority=priority)

    def _named(self, work: Job, campaign_id: str, *parts: object) -> Job:
        work.name = " ".join([campaign_id, self.name, *map(str, parts)])
        return route(work, self.category, self.priority or 0)


@dataclass
class IngestMaker(StageMaker):
    """Start a campaign: store it (if the job carries it), label the initial data, and train
    generation 0. The first job of every campaign."""

    name: str = "ingest"
    worker_settings: ClassVar[tuple[str, str]] = ("cpu_category", "ingest_priority")

    def make(self, campaign_id: str, new: NewCampaign | None = None) -> Job:
        """A CPU job; ``new`` (a campaign prepared at submit) is stored by the job itself."""
        carried = None if new is None else new.model_dump(mode="json")
        return self._named(self.run(campaign_id, carried), campaign_id)

    @job
    def run(self, campaign_id: str, new: dict | None) -> Response:
        carried = None if new is None else NewCampaign.model_validate(new)
        return respond(campaign.ingest(project_database(), campaign_id, carried))


@dataclass
class TrainMemberMaker(StageMaker):
    """Train one committee member on its generation's snapshot and register it; the member
    that completes the generation follows it up (errors, what comes next)."""

    name: str = "train"
    worker_settings: ClassVar[tuple[str, str]] = ("gpu_category", "training_priority")

    def make(self, campaign_id: str, generation: int, member: int) -> Job:
        """A GPU job."""
        work = self.run(campaign_id, generation, member)
        return self._named(work, campaign_id, f"g{generation}", f"m{member}")

    @job
    def run(self, campaign_id: str, generation: int, member: int) -> Response:
        return respond(campaign.train(project_database(), campaign_id, generation, member))


@dataclass
class SegmentMaker(StageMaker):
    """Run one MD segment of a trajectory with the newest committee and pool its frames."""

    name: str = "segment"
    worker_settings: ClassVar[tuple[str, str]] = ("gpu_category", "sampling_priority")

    def make(self, campaign_id: str, trajectory_id: str, segment: int) -> Job:
        """A GPU job; its audit follows as a detour."""
        work = self.run(campaign_id, trajectory_id, segment)
        return self._named(work, campaign_id, trajectory_name(trajectory_id), f"s{segment}")

    @job
    def run(self, campaign_id: str, trajectory_id: str, segment: int) -> Response:
        return respond(campaign.sample(project_database(), campaign_id, trajectory_id, segment))


@dataclass
class AuditMaker(StageMaker):
    """Compute a segment's final frame with the reference; continue or restart its trajectory."""

    name: str = "audit"
    worker_settings: ClassVar[tuple[str, str]] = ("cpu_category", "audit_priority")

    def make(self, campaign_id: str, trajectory_id: str, segment: int) -> Job:
        """A CPU job, above ordinary calculations in priority."""
        work = self.run(campaign_id, trajectory_id, segment)
        return self._named(work, campaign_id, trajectory_name(trajectory_id), f"s{segment}")

    @job
    def run(self, campaign_id: str, trajectory_id: str, segment: int) -> Response:
        return respond(campaign.audit(project_database(), campaign_id, trajectory_id, segment))


@dataclass
class SelectionMaker(StageMaker):
    """Score the pooled frames with the committee and pick the next frames to calculate."""

    name: str = "select"
    worker_settings: ClassVar[tuple[str, str]] = ("gpu_category", "inference_priority")

    def make(self, campaign_id: str, number: int) -> Job:
        """A GPU job; ``number`` is claimed (at most one selection waits at a time)."""
        return self._named(self.run(campaign_id, number), campaign_id, number)

    @job
    def run(self, campaign_id: str, number: int) -> Response:
        return respond(campaign.select(project_database(), campaign_id, number))


@dataclass
class CalculationMaker(StageMaker):
    """Compute selected frames with the reference (each claims one reference calculation)."""

    name: str = "calculate"
    worker_settings: ClassVar[tuple[str, str]] = ("cpu_category", "calculation_priority")

    def make(self, campaign_id: str, selection: int, batch: int, frame_ids: list[str]) -> Job:
        """A CPU job over pooled frames of selection ``selection`` (its batch ``batch``)."""
        work = self.run(campaign_id, frame_ids)
        return self._named(work, campaign_id, f"{selection}.{batch}")

    @job
    def run(self, campaign_id: str, frame_ids: list[str]) -> Response:
        return respond(campaign.calculate(project_database(), campaign_id, frame_ids))


def jobs_for(campaign_document: Campaign, plan: steering.JobPlan) -> list[Job]:
    """The jobs of one plan of the steering, made with the campaign's worker settings."""
    spec, campaign_id = campaign_document.spec, campaign_document.id
    workers = spec.workers
    if isinstance(plan, steering.TrainJobs):
        maker = TrainMemberMaker.for_workers(workers)
        members = range(spec.training.committee_size)
        return [maker.make(campaign_id, plan.generation, member) for member in members]
    if isinstance(plan, steering.SegmentJob):
        maker = SegmentMaker.for_workers(workers)
        return [maker.make(campaign_id, plan.trajectory_id, plan.segment)]
    if isinstance(plan, steering.AuditJob):
        maker = AuditMaker.for_workers(workers)
        return [maker.make(campaign_id, plan.trajectory_id, plan.segment)]
    if isinstance(plan, steering.SelectionJob):
        return [SelectionMaker.for_workers(workers).make(campaign_id, plan.number)]
    maker = CalculationMaker.for_workers(workers)
    size = spec.calculations_per_job
    batches = [
        plan.frame_ids[start : start + size] for start in range(0, len(plan.frame_ids), size)
    ]
    return [maker.make(campaign_id, plan.selection, k, batch) for k, batch in enumerate(batches)]


def respond(stage: campaign.Stage) -> Response:
    """A stage's output and the jobs it adds, less those the LaunchPad holds already.

    A job re-run after a crash proposes again what it would have added; only what the
    dead run never handed over is new. A run that did its stage's work itself (fresh)
    cannot have added anything before, and skips the look-up.
    """
    from fff_jobs import database as db

    additions, detours = [], []
    for plan in stage.plans:
        jobs = jobs_for(stage.campaign, plan)
        (detours if isinstance(plan, steering.AuditJob) else additions).extend(jobs)
    if not stage.fresh and additions + detours:
        names = [work.name for work in additions + detours]
        existing = db.existing_job_names(project_database(), names)
        additions = [work for work in additions if work.name not in existing]
        detours = [work for work in detours if work.name not in existing]
    return grow(
        stage.output,
        additions,
        detours[0] if detours else None,
        max_workflow_jobs=stage.campaign.spec.workers.max_workflow_jobs,
        workflow_name=workflow_name(stage.campaign.id),
    )


# --- starting a campaign ---


def start_flow(new: NewCampaign, carry: bool = False) -> Flow:
    """The workflow as submitted: the ingest job, everything else grows from it. With
    ``carry`` the job carries the campaign and stores it when it runs (a workflow file)."""
    ingest = IngestMaker.for_workers(new.spec.workers)
    work = ingest.make(new.campaign_id, new if carry else None)
    return Flow([work], name=workflow_name(new.campaign_id))


def submit_campaign(spec: CampaignSpec) -> str:
    """Store a campaign checked at submit (its structures read) and add its workflow; its id."""
    from fff_jobs import database as db
    from fff_jobs.workers import submit

    new = campaign.new_campaign(spec)
    db.create_campaign(project_database(), new)
    submit(start_flow(new))
    return new.campaign_id


def write_workflow_file(spec: CampaignSpec, path: Path) -> str:
    """Write a campaign's first workflow as a FireWorks file (`lpad add` starts it); its id.

    The ingest job carries the spec and the structures read here; no database is needed
    until it runs.
    """
    from jobflow.managers.fireworks import flow_to_workflow

    new = campaign.new_campaign(spec)
    flow_to_workflow(start_flow(new, carry=True)).to_file(str(path))
    return new.campaign_id
