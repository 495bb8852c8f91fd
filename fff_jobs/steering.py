"""Steering: what a campaign does next, decided from a snapshot of it, with no I/O.

Every job of a campaign reads its snapshot (the campaign document, and its own
trajectory), does its science, stores its result once, and asks this module what
follows. The answer is a :class:`Decision`: jobs to add, and state changes to try,
claims among them (the next training round, the next selection), each of which
:mod:`fff_jobs.campaign` applies as one conditional update, so that a claim another
worker won adds nothing. The rules read only the snapshot and the counts they ask for
(``counts[SUCCESSFUL]`` ...): :mod:`fff_jobs.database` queries a count when it is first
read, so a job pays for the counts its decision needs and no more, and the tests pass
plain dictionaries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from fff_jobs.schemas import (
    RETIRED,
    SAMPLING,
    AuditDecision,
    Campaign,
    GenerationRecord,
    Trajectory,
)

# what `counts` answers, when asked
SUCCESSFUL = "successful_results"  # successful reference results, initial ones included
BUDGETED = "budgeted_results"  # stored results that spent budget (audits and selected frames)
POOLED_FRAMES = "pooled_frames"  # sampled frames waiting for a selection
SAMPLING_TRAJECTORIES = "sampling_trajectories"
REVIVABLE = "sampling_or_retired_trajectories"  # sampling once retired ones are revived
UNCALCULATED = "uncalculated_frames"  # selected frames whose result is not stored yet

BUDGET_SPENT = "reference budget spent"
ALL_RETIRED = "every trajectory retired, nothing new to learn"


@dataclass(frozen=True)
class SegmentJob:
    """The next MD segment of a trajectory."""

    trajectory_id: str
    segment: int


@dataclass(frozen=True)
class AuditJob:
    """The audit of a trajectory's segment (a detour of the segment job)."""

    trajectory_id: str
    segment: int


@dataclass(frozen=True)
class CalculationJobs:
    """Reference calculations of the frames a selection picked."""

    selection: int
    frame_ids: list[str]


@dataclass(frozen=True)
class TrainJobs:
    """One training job per committee member of a generation (its round is claimed)."""

    generation: int


@dataclass(frozen=True)
class SelectionJob:
    """An inference-and-selection job (its number is claimed)."""

    number: int


JobPlan = SegmentJob | AuditJob | CalculationJobs | TrainJobs | SelectionJob


@dataclass
class Decision:
    """What a job adds and changes once its own work is stored."""

    jobs: list[SegmentJob | CalculationJobs] = field(default_factory=list)
    detour: AuditJob | None = None
    claim_round: int | None = None  # try to start the next round, needing this many new results
    request_selection: bool = False  # try to queue the next inference-and-selection
    finish: str | None = None  # complete the campaign, for this reason
    start_trajectories: bool = False  # generation 0 is out: create the trajectories
    revive: bool = False  # a new generation brings retired trajectories back


# --- the rules ---


def round_required(campaign: Campaign) -> int:
    """New successful results that start a round: retrain_freq, or 1 once the budget is spent
    (the last generation trains on everything the campaign paid for)."""
    return 1 if campaign.budget.left == 0 else campaign.spec.retrain_freq


def round_possible(campaign: Campaign) -> bool:
    """Whether a round could be due, from the campaign document alone (no count needed).

    Every successful result is an initial one or spent budget, so there cannot be
    enough new ones while ``initial_results + spent - trained_results`` is too small.
    """
    training = campaign.training
    possible = campaign.initial_results + campaign.budget.spent - training.trained_results
    return campaign.running and not training.running and possible >= round_required(campaign)


def next_round(campaign: Campaign, counts: Mapping[str, int]) -> int | None:
    """The new results the next round needs, if enough arrived and none is training."""
    if not round_possible(campaign):
        return None
    required = round_required(campaign)
    new = counts[SUCCESSFUL] - campaign.training.trained_results
    return required if new >= required else None


def finish_reason(campaign: Campaign, counts: Mapping[str, int]) -> str | None:
    """Why the campaign is complete: its budget is spent, every result stored and trained on."""
    if not campaign.running or campaign.budget.left > 0 or campaign.training.running:
        return None
    if counts[BUDGETED] < campaign.budget.spent:
        return None
    return BUDGET_SPENT if counts[SUCCESSFUL] <= campaign.training.trained_results else None


def target_reached(campaign: Campaign, record: GenerationRecord) -> str | None:
    """Why a generation ends the campaign early: its force error reached the target."""
    target = campaign.spec.target_force_error
    if target is None or not record.validation_force_mae <= target:
        return None
    return (
        f"validation force error {record.validation_force_mae:.4f} eV/A reached the target {target}"
    )


def keep_going(
    campaign: Campaign, counts: Mapping[str, int], reviving: bool = False
) -> Literal["select", "train", "finish"] | None:
    """Work for a campaign whose trajectories have all retired: its pooled frames, a new
    round, or the end (:data:`ALL_RETIRED`).

    Without it, a campaign whose every trajectory failed its audits too often would wait
    for frames no segment will pool. A new generation revives the retired trajectories
    (when ``reviving``, in the job that decides this, they count as sampling).
    """
    training, selection = campaign.training, campaign.selection
    if not campaign.running or training.running or selection.pending:
        return None
    if not campaign.idle_trajectories:  # every trajectory samples: nothing to count
        return None
    if counts[REVIVABLE if reviving else SAMPLING_TRAJECTORIES] or counts[UNCALCULATED] > 0:
        return None
    if counts[POOLED_FRAMES]:
        return "select"
    return "train" if counts[SUCCESSFUL] > training.trained_results else "finish"


def segment_may_run(campaign: Campaign) -> bool:
    """A segment runs while the campaign runs and budget is left for its audit."""
    return campaign.running and campaign.budget.left > 0


def selection_due(campaign: Campaign, counts: Mapping[str, int]) -> bool:
    """Queue an inference-and-selection once ``inference_chunk`` frames are pooled."""
    if not campaign.running or campaign.selection.pending:
        return False
    return counts[POOLED_FRAMES] >= campaign.spec.inference_chunk


def selection_size(campaign: Campaign) -> int:
    """Frames a selection picks: the batch size, within the budget left."""
    return min(campaign.spec.selection.batch_size, campaign.budget.left)


def audited_trajectory(
    trajectory: Trajectory, decision: AuditDecision, max_failures: int
) -> dict[str, object]:
    """A trajectory's changes after an audit: continue from the audited frame or restart from
    its start; retired after ``max_failures`` failed audits in a row."""
    assert trajectory.last_segment is not None
    passed = decision.action == "continue"
    failures = 0 if passed else trajectory.failures + 1
    frame = trajectory.last_segment.final_frame if passed else trajectory.start_frame
    return {
        "current_frame": frame.model_dump(),
        "run_length": decision.run_length,
        "failures": failures,
        "restarts": trajectory.restarts + (not passed),
        "status": RETIRED if failures >= max_failures else SAMPLING,
        "last_audit": decision.model_dump(),
    }


def trajectory_starts(
    sizes: list[int], trajectories: int, temperatures: list[float]
) -> list[tuple[int, float]]:
    """Each trajectory's starting structure (an index into ``sizes``) and temperature.

    Trajectory i takes the next size in turn (smallest first), the next structure of
    that size, and a temperature of the ladder shifted every round of sizes, so every
    size runs at every temperature once there are enough trajectories.
    """
    by_size: dict[int, list[int]] = {}
    for index, size in enumerate(sizes):
        by_size.setdefault(size, []).append(index)
    groups = [by_size[size] for size in sorted(by_size)]
    starts = []
    for trajectory in range(trajectories):
        round_, group = divmod(trajectory, len(groups))
        structure = groups[group][round_ % len(groups[group])]
        temperature = temperatures[(trajectory + round_) % len(temperatures)]
        starts.append((structure, temperature))
    return starts


# --- what each job adds once its own work is stored ---


def _advance(
    decision: Decision, campaign: Campaign, counts: Mapping[str, int], known_sampling: bool = False
) -> Decision:
    """The common tail of every decision: the next round, else the end, else keep going
    (never while a trajectory is ``known_sampling``)."""
    required = next_round(campaign, counts)
    if required is not None:
        decision.claim_round = required
        return decision
    decision.finish = finish_reason(campaign, counts)
    if decision.finish is not None:
        return decision
    move = None if known_sampling else keep_going(campaign, counts, decision.revive)
    if move == "select":
        decision.request_selection = True
    elif move == "train":
        decision.claim_round = 1
    elif move == "finish":
        decision.finish = ALL_RETIRED
    return decision


def after_ingest(campaign: Campaign) -> Decision:
    """The initial data is labelled: train generation 0 on it."""
    return Decision(claim_round=1)


def after_segment(
    campaign: Campaign, trajectory_id: str, segment: int, counts: Mapping[str, int]
) -> Decision:
    """A segment ran (or had run): its audit, and a selection once enough frames are pooled."""
    decision = Decision(detour=AuditJob(trajectory_id, segment))
    decision.request_selection = selection_due(campaign, counts)
    return decision


def after_audit(
    campaign: Campaign, trajectory: Trajectory, segment: int, counts: Mapping[str, int]
) -> Decision:
    """An audit is applied: the trajectory's next segment while it samples, and the campaign's
    next round, end or way on."""
    decision = Decision()
    audited = trajectory.audits_completed > segment
    if audited and trajectory.status == SAMPLING and segment_may_run(campaign):
        decision.jobs.append(SegmentJob(trajectory.id, segment + 1))
    sampling = trajectory.status == SAMPLING
    return _advance(decision, campaign, counts, known_sampling=sampling)


def after_selection(
    campaign: Campaign, number: int, selected: list[str], counts: Mapping[str, int]
) -> Decision:
    """A selection is stored: calculations of its frames (it took every pooled frame: the
    segments to come queue the next one)."""
    decision = Decision(jobs=[CalculationJobs(number, selected)] if selected else [])
    return _advance(decision, campaign, counts)


def after_calculation(campaign: Campaign, counts: Mapping[str, int]) -> Decision:
    """Reference results are stored: the next round, the end, or the way on."""
    return _advance(Decision(), campaign, counts)


def after_generation(
    campaign: Campaign, record: GenerationRecord, counts: Mapping[str, int], repeated: bool = False
) -> Decision:
    """A generation is published and recorded: stop at the target, else sample with it
    (first segments after generation 0, retired trajectories back after later ones: if
    any retired, or if an earlier run of this follow-up may have revived them)."""
    reason = target_reached(campaign, record)
    if reason is not None:
        return Decision(finish=reason)
    if record.generation == 0:
        return Decision(start_trajectories=True)
    revive = segment_may_run(campaign) and (campaign.idle_trajectories or repeated)
    return _advance(Decision(revive=revive), campaign, counts)
