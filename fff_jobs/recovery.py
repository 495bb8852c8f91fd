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
from fff_jobs.repair import Damage, Repair, inspect, repair_fireworks


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
        report += _repair_campaign(database, campaign["_id"], damage)
    return report


def _workflow_name_for(database):
    """Names the workflow a Firework in no workflow goes into: its campaign's, from its name."""

    def name_for(firework_name: str) -> str:
        from fff_jobs.campaign import workflow_name

        campaign_id = firework_name.split(" ", 1)[0]
        known = database[db.CAMPAIGNS].count_documents({"_id": campaign_id}, limit=1)
        return workflow_name(campaign_id) if known else ""

    return name_for


def _repair_campaign(database, campaign_id: str, damage: Damage) -> Repair:
    """Repair fff's records of one campaign; then name what still breaks an invariant."""
    report = _repair_claims(database, campaign_id)
    check = check_campaign(database, campaign_id, damage)
    if check.needed:
        report += _revive(database, campaign_id, check.needed)
        check = check_campaign(database, campaign_id, damage)
    report.unrepaired += [f"{campaign_id}: {line}" for line in check.violations]
    failed = sorted(job["fw_id"] for job in db.campaign_jobs(database, campaign_id, ("FIZZLED",)))
    if failed:
        report.unrepaired.append(
            f"{campaign_id}: {len(failed)} failed job(s): see `lpad get_fws -s FIZZLED -d more`, "
            f"fix the cause, then `lpad rerun_fws -i {','.join(map(str, failed))}`"
        )
    return report


def _repair_claims(database, campaign_id: str) -> Repair:
    """Level the budget counter and release a dead selection (running); stop sampling (finished)."""
    if db.get_campaign(database, campaign_id)["status"] != db.RUNNING:
        stopped = db.stop_sampling(database, campaign_id)
        lines = [f"{campaign_id}: finished; stopped {stopped} trajectory(ies)"] if stopped else []
        return Repair(lines=lines)
    spent = db.recount_budget(database, campaign_id)
    report = Repair(lines=[f"{campaign_id}: {spent} reference calculation(s) claimed"])
    number = db.release_dead_selection(database, campaign_id, alive_jobs(database, campaign_id))
    if number is not None:
        report.lines.append(
            f"{campaign_id}: released selection {number} (its job is gone); frames pooled"
        )
    return report


def _revive(database, campaign_id: str, needed: list[NeededJob]) -> Repair:
    """Add the jobs a campaign needs and has none of (in a new workflow), unless one failed."""
    from jobflow import Flow

    from fff_jobs import campaign as steering
    from fff_jobs.workers import submit

    spec = steering.campaign_spec(db.get_campaign(database, campaign_id))
    jobs = [_job(steering, campaign_id, spec, job) for job in needed]
    failed = {job["name"] for job in db.campaign_jobs(database, campaign_id, ("FIZZLED",))}
    revived = [job for job in jobs if job.name not in failed]
    if not revived:
        return Repair()
    submit(Flow(revived, name=steering.workflow_name(campaign_id)))
    return Repair(lines=[f"{campaign_id}: added {', '.join(job.name for job in revived)}"])


def _job(steering, campaign_id: str, spec, needed: NeededJob):
    """The campaign's job for a needed stage (steering is fff_jobs.campaign)."""
    if needed.stage == "train":
        generation, member = needed.arguments
        return steering.train_jobs(campaign_id, spec, generation)[member]
    make = steering.segment_job if needed.stage == "segment" else steering.audit_job
    return make(campaign_id, spec, *needed.arguments)
