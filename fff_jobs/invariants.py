"""What must hold for a campaign to finish, checked against the database: `fff doctor ID`.

- budget claims equal results: the counter equals the claims, every claim has its
  result (or a job alive to compute it), every budgeted result has its claim;
- no reference result is stored twice (one audit per segment, one result per frame);
- none of the campaign's Fireworks is in no workflow, and none of its workflows is
  locked without a live owner or has ``fw_states`` out of step (see repair.py);
- every live trajectory and every pending round has a job that moves it: a segment
  or audit of each sampling trajectory (while the budget lasts), a train job of a
  running training round, a select job of a pending selection, a calculate job of
  selected frames not yet computed, and at least one job of a running campaign.

Jobs are recognised by their names, ``<campaign id> <stage> ...`` (see jobs.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from fff_jobs import database as db
from fff_jobs import steering
from fff_jobs.repair import Damage
from fff_jobs.schemas import Campaign, trajectory_name


@dataclass(frozen=True)
class NeededJob:
    """A job a campaign needs alive and has none of: its stage and arguments."""

    stage: str  # segment, audit or train
    arguments: tuple


@dataclass
class Check:
    """The violations found (one line each) and the jobs that would end some of them."""

    violations: list[str] = field(default_factory=list)
    needed: list[NeededJob] = field(default_factory=list)


def alive_stages(jobs: list[dict]) -> dict[str, list[str]]:
    """Stage -> the rest of the names of these jobs (the campaign's that may still run)."""
    stages: dict[str, list[str]] = {}
    for job in jobs:
        _, stage, *rest = [*job["name"].split(" ", 2), ""]
        stages.setdefault(stage, []).append(rest[0])
    return stages


def alive_jobs(database, campaign_id: str) -> set[str]:
    """The uuids and names of the campaign's jobs that may still run (claims name their owner)."""
    return owners(db.campaign_jobs(database, campaign_id, db.ALIVE_STATES))


def owners(jobs: list[dict]) -> set[str]:
    """The uuids and names of these jobs: what a claim names as its owner."""
    return {job["uuid"] for job in jobs} | {job["name"] for job in jobs}


def check_campaign(database, campaign_id: str, damage: Damage) -> Check:
    """Every invariant of the campaign; what violates each.

    A live campaign changes while it is read. The reads come in an order that lets no
    job caught between two of its writes pass for damage (see :func:`budget_violations`).
    """
    campaign = db.get_campaign(database, campaign_id)
    results_before = db.budgeted_results(database, campaign_id)
    claims = db.budget_claims(database, campaign_id)
    jobs = db.campaign_jobs(database, campaign_id, db.ALIVE_STATES)
    results = db.budgeted_results(database, campaign_id)
    spent_now = db.budget_spent(database, campaign_id)
    alive, alive_owners = alive_stages(jobs), owners(jobs)
    check = Check(violations=duplicate_results(results))
    check.violations += budget_violations(
        BudgetReads(campaign.budget.spent, spent_now, claims, set(results_before), set(results)),
        alive_owners,
    )
    check.violations += damage.describe(f"{campaign_id} ")
    running = set(alive_stages([job for job in jobs if job["state"] == "RUNNING"]))
    stuck = _trajectories_without_jobs(database, campaign, alive, running)
    stuck += _rounds_without_jobs(database, campaign, alive, alive_owners)
    check.violations += [line for line, _ in stuck]
    check.needed += [job for _, jobs in stuck for job in jobs]
    return check


@dataclass(frozen=True)
class BudgetReads:
    """A campaign's budget as read, in this order: the counter (``spent_before``), the
    results that spent budget (``results_before``), the claims (result id -> owner),
    then (after the jobs alive) the results again and the counter again."""

    spent_before: int
    spent_after: int
    claims: dict[str, str]
    results_before: set[str]
    results_after: set[str]


def budget_violations(budget: BudgetReads, alive_owners: set[str]) -> list[str]:
    """The budget counter against the claims, and the claims against the results
    (``alive_owners``: the uuids and names of the campaign's jobs alive).

    A job claims, then raises the counter, then stores its result. So every claim the
    first count counted, and every result stored before the claims were read, is among
    the claims; a claim the second count lacks, or whose result the second read lacks,
    belongs to a job alive in between, unless that job died.
    """
    claims, violations = budget.claims, []
    in_flight = sum(owner in alive_owners for owner in claims.values())
    if budget.spent_before > len(claims) or len(claims) - budget.spent_after > in_flight:
        violations.append(f"budget counter says {budget.spent_after} spent, {len(claims)} claimed")
    unfinished = [
        result_id
        for result_id, owner in claims.items()
        if result_id not in budget.results_after and owner not in alive_owners
    ]
    if unfinished:
        violations.append(f"{len(unfinished)} claimed calculation(s) with no result and no job")
    unclaimed = budget.results_before - set(claims)
    if unclaimed:
        violations.append(f"{len(unclaimed)} budgeted result(s) without a claim")
    return violations


def duplicate_results(results: dict[str, object]) -> list[str]:
    """Reference results stored twice: two audits of one segment, two results of one frame
    (``results``: result id -> what it computed)."""
    keys = Counter(results.values())
    return [f"reference result of {key} stored {n} times" for key, n in keys.items() if n > 1]


def next_job(trajectory: db.TrajectoryProgress) -> NeededJob:
    """The job that moves a trajectory next: its next segment, or the audit of its last one."""
    if trajectory.segments_completed > trajectory.audits_completed:
        return NeededJob("audit", (trajectory.id, trajectory.audits_completed))
    return NeededJob("segment", (trajectory.id, trajectory.segments_completed))


def _trajectories_without_jobs(
    database, campaign: Campaign, alive: dict[str, list[str]], running: set[str]
) -> list:
    """(violation, the jobs that would end it) for each sampling trajectory nothing moves.

    While a train job runs (``running``: the stages of the jobs running), none is named:
    a new generation starts or revives trajectories in the database before FireWorks
    adds their segments, when that job completes.
    """
    sampling = db.sampling_trajectories(database, campaign.id)
    if not campaign.running:
        return [(f"trajectory {t.id} is sampling in a finished campaign", []) for t in sampling]
    if campaign.budget.left == 0 or "train" in running:
        return []
    moving = {rest.split(" ")[0] for stage in ("segment", "audit") for rest in alive.get(stage, [])}
    return [
        (f"trajectory {t.id} is sampling with no job to move it", [next_job(t)])
        for t in sampling
        if trajectory_name(t.id) not in moving
    ]


def _rounds_without_jobs(database, campaign: Campaign, alive: dict, alive_owners: set[str]) -> list:
    """(violation, the jobs that would end it) for each pending round nothing moves.

    A round is moved by a job of its stage, or by the job that claimed it (``alive_owners``:
    the uuids and names of the jobs alive), which adds that job when it runs again.
    """
    if not campaign.running:
        return []
    rounds = []
    training, selection = campaign.training, campaign.selection
    if training.running and "train" not in alive and training.owner not in alive_owners:
        members = _members_to_train(database, campaign, training.generation)
        jobs = [NeededJob("train", (training.generation, member)) for member in members]
        rounds.append((f"training round {training.generation} has no job", jobs))
    if selection.pending and "select" not in alive and selection.owner not in alive_owners:
        rounds.append((f"selection {selection.count - 1} has no job", []))
    waiting = db.CampaignCounts(database, campaign.id)[steering.UNCALCULATED] > 0
    if waiting and not {"select", "calculate"} & set(alive):
        rounds.append(("selected frames wait for a calculation with no job", []))
    if not alive:
        rounds.append(("the campaign is running with no job left", []))
    return rounds


def _members_to_train(database, campaign: Campaign, generation: int) -> list[int]:
    """Members of a generation not registered yet; the last one if all are (it follows up)."""
    size = campaign.spec.training.committee_size
    ids = [db.model_id(campaign.id, generation, member) for member in range(size)]
    registered = db.find_members(database, ids)
    members = [member for member, key in enumerate(ids) if key not in registered]
    return members or [size - 1]
