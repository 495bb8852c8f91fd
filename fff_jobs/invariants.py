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

Jobs are recognised by their names, ``<campaign id> <stage> ...`` (see campaign.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from fff_jobs import database as db
from fff_jobs.repair import Damage


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


def alive_stages(database, campaign_id: str) -> dict[str, list[str]]:
    """Stage -> the rest of the names of the campaign's jobs that may still run."""
    stages: dict[str, list[str]] = {}
    for job in db.campaign_jobs(database, campaign_id, db.ALIVE_STATES):
        _, stage, *rest = [*job["name"].split(" ", 2), ""]
        stages.setdefault(stage, []).append(rest[0])
    return stages


def alive_jobs(database, campaign_id: str) -> set[str]:
    """The uuids and names of the campaign's jobs that may still run (claims name their owner)."""
    jobs = db.campaign_jobs(database, campaign_id, db.ALIVE_STATES)
    return {job["uuid"] for job in jobs} | {job["name"] for job in jobs}


def check_campaign(database, campaign_id: str, damage: Damage) -> Check:
    """Every invariant of the campaign; what violates each."""
    campaign = db.get_campaign(database, campaign_id)
    alive = alive_stages(database, campaign_id)
    check = Check(violations=budget_violations(database, campaign))
    check.violations += duplicate_results(database, campaign_id)
    check.violations += damage.describe(f"{campaign_id} ")
    stuck = _trajectories_without_jobs(database, campaign, alive)
    stuck += _rounds_without_jobs(database, campaign, alive, alive_jobs(database, campaign_id))
    check.violations += [line for line, _ in stuck]
    check.needed += [job for _, jobs in stuck for job in jobs]
    return check


def budget_violations(database, campaign: dict) -> list[str]:
    """The budget counter against the claims, and the claims against the results."""
    campaign_id = campaign["_id"]
    query = {"campaign_id": campaign_id, "source": {"$ne": "initial"}}
    results = {doc["_id"] for doc in database[db.REFERENCE_RESULTS].find(query, {"_id": 1})}
    claims = [c["result_id"] for c in database[db.BUDGET_CLAIMS].find({"campaign_id": campaign_id})]
    claimed, spent = set(claims), campaign["budget"]["spent"]
    violations = []
    if spent != len(claims):
        violations.append(f"budget counter says {spent} spent, {len(claims)} claimed")
    unfinished = db.unclaimed_budget(database, campaign_id, alive_jobs(database, campaign_id))
    if unfinished:
        violations.append(f"{len(unfinished)} claimed calculation(s) with no result and no job")
    if results - claimed:
        violations.append(f"{len(results - claimed)} budgeted result(s) without a claim")
    return violations


def duplicate_results(database, campaign_id: str) -> list[str]:
    """Reference results stored twice: two audits of one segment, two results of one frame."""
    query = {"campaign_id": campaign_id, "source": {"$ne": "initial"}}
    fields = {"source": 1, "trajectory_id": 1, "segment": 1, "frame_id": 1}
    keys = Counter(
        (doc["trajectory_id"], doc["segment"]) if doc["source"] == "audit" else doc.get("frame_id")
        for doc in database[db.REFERENCE_RESULTS].find(query, fields)
    )
    return [f"reference result of {key} stored {n} times" for key, n in keys.items() if n > 1]


def next_job(trajectory: dict) -> NeededJob:
    """The job that moves a trajectory next: its next segment, or the audit of its last one."""
    if trajectory["segments_completed"] > trajectory["audits_completed"]:
        return NeededJob("audit", (trajectory["_id"], trajectory["audits_completed"]))
    return NeededJob("segment", (trajectory["_id"], trajectory["segments_completed"]))


def _trajectories_without_jobs(database, campaign: dict, alive: dict[str, list[str]]) -> list:
    """(violation, the jobs that would end it) for each sampling trajectory nothing moves."""
    query = {"campaign_id": campaign["_id"], "status": "sampling"}
    sampling = list(database[db.TRAJECTORIES].find(query))
    if campaign["status"] != db.RUNNING:
        return [(f"trajectory {t['_id']} is sampling in a finished campaign", []) for t in sampling]
    if campaign["budget"]["left"] == 0:
        return []
    moving = {rest.split(" ")[0] for stage in ("segment", "audit") for rest in alive.get(stage, [])}
    return [
        (f"trajectory {t['_id']} is sampling with no job to move it", [next_job(t)])
        for t in sampling
        if t["_id"].rsplit("-", 1)[1] not in moving
    ]


def _rounds_without_jobs(database, campaign: dict, alive: dict, owners: set[str]) -> list:
    """(violation, the jobs that would end it) for each pending round nothing moves.

    A round is moved by a job of its stage, or by the job that claimed it (``owners``:
    the uuids of the jobs alive), which adds that job when it runs again.
    """
    if campaign["status"] != db.RUNNING:
        return []
    campaign_id, rounds = campaign["_id"], []
    training, selection = campaign["training"], campaign["selection"]
    if training["running"] and "train" not in alive and training.get("owner") not in owners:
        members = _members_to_train(database, campaign, training["generation"])
        jobs = [NeededJob("train", (training["generation"], member)) for member in members]
        rounds.append((f"training round {training['generation']} has no job", jobs))
    if selection["pending"] and "select" not in alive and selection.get("owner") not in owners:
        rounds.append((f"selection {selection['count'] - 1} has no job", []))
    waiting = db.count_selected_uncalculated(database, campaign_id) > 0
    if waiting and not {"select", "calculate"} & set(alive):
        rounds.append(("selected frames wait for a calculation with no job", []))
    if not alive:
        rounds.append(("the campaign is running with no job left", []))
    return rounds


def _members_to_train(database, campaign: dict, generation: int) -> list[int]:
    """Members of a generation not registered yet; the last one if all are (it follows up)."""
    size = campaign["spec"]["training"]["committee_size"]
    members = [
        member
        for member in range(size)
        if db.find_member(database, campaign["_id"], generation, member) is None
    ]
    return members or [size - 1]
