"""`fff recover`: bring campaigns back after workers died, FireWorks' own records first.

1. FireWorks' records (repair.py): workflows locked with no live owner are
   unlocked, ``fw_states`` rebuilt from the Fireworks' launches, completions the
   workflow never took are taken, and Fireworks in no workflow are brought back
   (or deleted when a workflow holds their job), so each job exists exactly once.
2. Lost runs (`lpad detect_lostruns --rerun`): each re-run finds what the dead run
   stored and gets its own claims back (see campaign.py).
3. fff's records: the budget counter is brought level with the claims, a pending
   selection whose job is gone releases its frames, a trajectory or training round
   that no job moves gets its next job again, a finished campaign's trajectories stop.

Then every campaign's invariants (invariants.py) are checked: what still breaks
one is named, and `fff recover` exits non-zero.
"""

from __future__ import annotations

from fff_jobs import database as db
from fff_jobs.invariants import NeededJob, alive_jobs, check_campaign
from fff_jobs.jobs import AuditMaker, SegmentMaker, TrainMemberMaker, workflow_name
from fff_jobs.repair import Damage, Repair, inspect, repair_fireworks
from fff_jobs.schemas import Campaign

# the Maker of each stage a campaign may need again (NeededJob.stage is the Maker's name)
MAKERS = {maker.name: maker for maker in (TrainMemberMaker, SegmentMaker, AuditMaker)}


def recover(launchpad, database, expiration_secs: int, lock_wait: float) -> Repair:
    """Repair everything dead workers left; what was done and what is left.

    ``lock_wait`` (at most ``expiration_secs``) is how long a workflow must stay
    locked, or a Firework in no workflow, unchanged to count as left by a dead
    worker rather than by one updating it right now.
    """
    wait = min(lock_wait, expiration_secs)
    report = repair_fireworks(launchpad, wait, _workflow_name_for(database))
    if report.orphans_left:
        report.unrepaired.append(f"Fireworks {report.orphans_left} are still in no workflow")
        return report
    _, lost, _ = launchpad.detect_lostruns(expiration_secs=expiration_secs, rerun=True)
    report.lines.append(
        f"re-ran {len(lost)} lost job(s)" + (f": Fireworks {sorted(lost)}" if lost else "")
    )
    damage = inspect(launchpad, wait)
    for campaign in db.list_campaigns(database):
        report += _repair_campaign(database, campaign, damage)
    return report


def _workflow_name_for(database):
    """Names the workflow a Firework in no workflow goes into: its campaign's, from its name."""

    def name_for(firework_name: str) -> str:
        campaign_id = firework_name.split(" ", 1)[0]
        return workflow_name(campaign_id) if db.campaign_exists(database, campaign_id) else ""

    return name_for


def _repair_campaign(database, campaign: Campaign, damage: Damage) -> Repair:
    """Repair fff's records of one campaign; then name what still breaks an invariant."""
    report = _repair_claims(database, campaign)
    failed = {
        job["fw_id"]: job["name"] for job in db.campaign_jobs(database, campaign.id, ("FIZZLED",))
    }
    check = check_campaign(database, campaign.id, damage)
    if check.needed:
        report += _revive(campaign, check.needed, set(failed.values()))
        check = check_campaign(database, campaign.id, damage)
    report.unrepaired += [f"{campaign.id}: {line}" for line in check.violations]
    if failed:
        report.unrepaired.append(
            f"{campaign.id}: {len(failed)} failed job(s): see `lpad get_fws -s FIZZLED -d more`, "
            f"fix the cause, then `lpad rerun_fws -i {','.join(map(str, sorted(failed)))}`"
        )
    return report


def _repair_claims(database, campaign: Campaign) -> Repair:
    """Level the budget counter and release a dead selection (running); stop sampling (finished)."""
    if not campaign.running:
        stopped = db.stop_sampling(database, campaign.id)
        lines = [f"{campaign.id}: finished; stopped {stopped} trajectory(ies)"] if stopped else []
        return Repair(lines=lines)
    spent = db.recount_budget(database, campaign.id)
    report = Repair(lines=[f"{campaign.id}: {spent} reference calculation(s) claimed"])
    number = db.release_dead_selection(database, campaign.id, alive_jobs(database, campaign.id))
    if number is not None:
        report.lines.append(
            f"{campaign.id}: released selection {number} (its job is gone); frames pooled"
        )
    return report


def _revive(campaign: Campaign, needed: list[NeededJob], failed: set[str]) -> Repair:
    """Add the jobs a campaign needs and has none of (in a new workflow), unless one of that
    name failed (``failed``: the names of its FIZZLED jobs).

    Each is made by its stage's Maker with the campaign's worker settings, so it is the
    campaign's own job: same name, category and priority as the one that was lost.
    """
    from jobflow import Flow

    from fff_jobs.workers import submit

    jobs = [
        MAKERS[job.stage].for_workers(campaign.spec.workers).make(campaign.id, *job.arguments)
        for job in needed
    ]
    revived = [job for job in jobs if job.name not in failed]
    if not revived:
        return Repair()
    submit(Flow(revived, name=workflow_name(campaign.id)))
    return Repair(lines=[f"{campaign.id}: added {', '.join(job.name for job in revived)}"])
