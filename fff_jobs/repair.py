"""Repairs what a worker killed inside one of FireWorks' own updates leaves behind.

FireWorks completes a job that adds jobs in several writes, none atomic with the
next (``LaunchPad.complete_launch``): the launch (COMPLETED, with the action), the
workflow lock, each new Firework (``_upsert_fws``), the finished Firework, the
workflow document, the unlock. A worker killed between two of them leaves:

- the workflow ``locked`` with no live owner: every later update of it waits
  ``WFLOCK_EXPIRATION_SECS``, then fails or forces the lock;
- ``fw_states`` stale: the finished job still RUNNING there, its action not taken;
- new Fireworks in no workflow's ``nodes`` (orphans): a worker that picks one up
  fails with "Could not find workflow", and `lpad rerun_fws` on it too.

`lpad detect_lostruns` sees none of this. :func:`inspect` finds it, telling a live
update (gone within ``wait`` seconds) from damage (unchanged after them);
:func:`repair_fireworks` repairs it. The workflow document is taken as the record
of which completions FireWorks applied: a job whose launch completed but whose
workflow never took the completion has its action applied again, under the lock,
and each Firework that action adds is one an orphan already is (same job), so
exactly one copy of every job exists. Orphans no action claims (a new workflow
killed between its Fireworks and its document) go into a new workflow; an orphan
whose job a workflow already holds is deleted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from fireworks.core.firework import Workflow
from fireworks.core.launchpad import LazyFirework

SETTLED = ("COMPLETED", "FIZZLED", "DEFUSED", "PAUSED", "ARCHIVED")
FINISHED = ("COMPLETED", "FIZZLED")
POLL_SECS = 0.5
RECOVERED_WORKFLOW = "recovered Fireworks"


@dataclass
class Damage:
    """What FireWorks left inconsistent, seen unchanged for the whole observation."""

    stale_locks: dict = field(default_factory=dict)  # workflow _id -> its updated_on
    stale_nodes: dict = field(default_factory=dict)  # workflow _id -> [fw_id] out of step
    orphans: dict[int, str] = field(default_factory=dict)  # fw_id -> name
    workflow_names: dict = field(default_factory=dict)  # workflow _id -> (name, first node)
    workflow_jobs: dict = field(default_factory=dict)  # workflow _id -> its first node's name

    def __bool__(self) -> bool:
        return bool(self.stale_locks or self.stale_nodes or self.orphans)

    def workflows(self) -> list:
        return list(dict.fromkeys([*self.stale_locks, *self.stale_nodes]))

    def describe(self, job_prefix: str = "") -> list[str]:
        """One line per damaged workflow and per orphan whose (first) job's name starts so."""
        lines = []
        for workflow in self.workflows():
            if not self.workflow_jobs.get(workflow, "").startswith(job_prefix):
                continue
            name, first = self.workflow_names[workflow]
            problems = []
            if workflow in self.stale_locks:
                problems.append("locked with no live owner")
            if self.stale_nodes.get(workflow):
                problems.append(f"fw_states out of step for Fireworks {self.stale_nodes[workflow]}")
            lines.append(f"workflow {first} ({name}): {', '.join(problems)}")
        lines += [
            f"Firework {fw_id} ({name}) is in no workflow"
            for fw_id, name in sorted(self.orphans.items())
            if name.startswith(job_prefix)
        ]
        return lines


def _out_of_step(workflow: dict, fireworks: dict, finished_launches: set) -> list[int]:
    """Nodes whose fw_states entry disagrees with their Firework or with a finished launch."""
    nodes = []
    for fw_id in workflow["nodes"]:
        seen = workflow.get("fw_states", {}).get(str(fw_id))
        firework = fireworks.get(fw_id)
        if firework is None:
            continue
        finished = any(launch in finished_launches for launch in firework.get("launches", []))
        if seen != firework["state"] or (seen not in SETTLED and finished):
            nodes.append(fw_id)
    return nodes


def _observe(launchpad) -> tuple[set, dict]:
    """What looks damaged now (as comparable keys), and the documents read."""
    workflows = list(
        launchpad.workflows.find(
            {}, {"nodes": 1, "fw_states": 1, "locked": 1, "updated_on": 1, "name": 1}
        )
    )
    projection = {"fw_id": 1, "state": 1, "launches": 1, "name": 1}
    fireworks = {doc["fw_id"]: doc for doc in launchpad.fireworks.find({}, projection)}
    unsettled = [
        launch
        for workflow in workflows
        for fw_id in workflow["nodes"]
        if workflow.get("fw_states", {}).get(str(fw_id)) not in SETTLED and fw_id in fireworks
        for launch in fireworks[fw_id].get("launches", [])
    ]
    query = {"launch_id": {"$in": unsettled}, "state": {"$in": list(FINISHED)}}
    finished = {doc["launch_id"] for doc in launchpad.launches.find(query, {"launch_id": 1})}
    seen = set()
    for workflow in workflows:
        if workflow.get("locked"):
            seen.add(("lock", workflow["_id"], str(workflow.get("updated_on"))))
        for fw_id in _out_of_step(workflow, fireworks, finished):
            seen.add(("node", workflow["_id"], fw_id))
    in_workflows = {fw_id for workflow in workflows for fw_id in workflow["nodes"]}
    seen |= {("orphan", fw_id) for fw_id in set(fireworks) - in_workflows}
    return seen, {"workflows": workflows, "fireworks": fireworks}


def inspect(launchpad, wait: float) -> Damage:
    """The damage in the LaunchPad: what looks damaged now and still does ``wait`` seconds later.

    A live update (a worker completing a job) passes through the same states for a
    moment; nothing is waited for when nothing looks damaged.
    """
    first, documents = _observe(launchpad)
    persisting = first
    deadline = time.monotonic() + wait
    while persisting and time.monotonic() < deadline:
        time.sleep(min(POLL_SECS, max(0.0, deadline - time.monotonic())))
        now, documents = _observe(launchpad)
        persisting &= now
    return _damage(persisting, documents)


def _damage(keys: set, documents: dict) -> Damage:
    damage = Damage()
    fireworks = documents["fireworks"]
    for workflow in documents["workflows"]:
        first = min(workflow["nodes"])
        damage.workflow_names[workflow["_id"]] = (workflow["name"], first)
        damage.workflow_jobs[workflow["_id"]] = fireworks.get(first, {}).get("name", "")
    for key in sorted(keys, key=str):
        if key[0] == "lock":
            damage.stale_locks[key[1]] = key[2]
        elif key[0] == "node":
            damage.stale_nodes.setdefault(key[1], []).append(key[2])
        else:
            damage.orphans[key[1]] = fireworks[key[1]]["name"]
    return damage


def job_key(name: str, spec: dict) -> str:
    """What makes two Fireworks the same job: the jobflow job's uuid, else name and spec."""
    tasks = spec.get("_tasks") or [{}]
    job = tasks[0].get("job") if isinstance(tasks[0], dict) else None
    uuid = job.get("uuid") if isinstance(job, dict) else getattr(job, "uuid", None)
    return f"{name}\n{uuid or json.dumps(spec, sort_keys=True, default=str)}"


@dataclass
class Repair:
    """What a repair did (``lines``), what it could not do (``unrepaired``), and the Fireworks
    it left in no workflow."""

    lines: list[str] = field(default_factory=list)
    unrepaired: list[str] = field(default_factory=list)
    orphans_left: list[int] = field(default_factory=list)

    def __iadd__(self, other: Repair) -> Repair:
        self.lines += other.lines
        self.unrepaired += other.unrepaired
        self.orphans_left += other.orphans_left
        return self


def repair_fireworks(
    launchpad, wait: float, workflow_name_for: Callable[[str], str] | None = None
) -> Repair:
    """Find the damage and repair it: unlock, rebuild fw_states, bring orphans back.

    ``workflow_name_for`` names the new workflow an orphan that no action claims
    goes into, from the orphan's name. While a damaged workflow is busy, orphans
    stay as they are (its completion may still claim them): run again.
    """
    damage = inspect(launchpad, wait)
    orphans = _orphan_keys(launchpad, damage.orphans)
    report = Repair(lines=[f"found: {line}" for line in damage.describe()])
    for workflow in damage.workflows():
        report += _repair_workflow(launchpad, damage, workflow, orphans)
    if report.unrepaired:
        report.orphans_left = sorted(orphans.values())
        return report
    report += _adopt_unclaimed(launchpad, orphans, workflow_name_for or (lambda name: ""))
    return report


def _orphan_keys(launchpad, orphans: dict[int, str]) -> dict[str, int]:
    documents = launchpad.fireworks.find({"fw_id": {"$in": list(orphans)}}, {"spec": 1, "fw_id": 1})
    return {job_key(orphans[doc["fw_id"]], doc["spec"]): doc["fw_id"] for doc in documents}


def _take_lock(launchpad, damage: Damage, workflow) -> bool:
    """Lock the workflow for the repair: a stale lock is taken over as long as it is unchanged,
    in one update that restamps it, so that of two repairs at once only one takes it."""
    if workflow in damage.stale_locks:
        query = {"_id": workflow, "locked": True}
        for document in launchpad.workflows.find(query, {"updated_on": 1}):
            if str(document.get("updated_on")) == damage.stale_locks[workflow]:
                unchanged = query | {"updated_on": document.get("updated_on")}
                stamp = {"$set": {"updated_on": datetime.now(UTC)}}
                return launchpad.workflows.find_one_and_update(unchanged, stamp) is not None
    query = {"_id": workflow, "locked": {"$exists": False}}
    return launchpad.workflows.find_one_and_update(query, {"$set": {"locked": True}}) is not None


def _repair_workflow(launchpad, damage: Damage, workflow, orphans: dict[str, int]) -> Repair:
    name, first = damage.workflow_names[workflow]
    label = f"workflow {first} ({name})"
    if not _take_lock(launchpad, damage, workflow):
        return Repair(unrepaired=[f"{label} is being updated by a live worker: run again"])
    try:
        refreshed, adopted = _rebuild(launchpad, workflow, orphans)
    finally:
        launchpad.workflows.update_one({"_id": workflow}, {"$unset": {"locked": True}})
    lines = [f"{label}: unlocked"] if workflow in damage.stale_locks else []
    if refreshed:
        lines.append(f"{label}: rebuilt fw_states of Fireworks {refreshed} from their launches")
    if adopted:
        lines.append(f"{label}: brought Fireworks {adopted} back into it")
    return Repair(lines=lines)


def _rebuild(launchpad, workflow, orphans: dict[str, int]) -> tuple[list[int], list[int]]:
    """Refresh the out-of-step nodes of a workflow (locked by the caller); refreshed, adopted ids.

    Each node is refreshed from the state the workflow document last recorded, so
    a completion the workflow never took is taken now (its action applied), and
    one it took is not taken twice.
    """
    document = launchpad.workflows.find_one({"_id": workflow})
    projection = {"fw_id": 1, "state": 1, "launches": 1}
    fireworks = {
        doc["fw_id"]: doc
        for doc in launchpad.fireworks.find({"fw_id": {"$in": document["nodes"]}}, projection)
    }
    query = {"fw_id": {"$in": document["nodes"]}, "state": {"$in": list(FINISHED)}}
    finished = {doc["launch_id"] for doc in launchpad.launches.find(query, {"launch_id": 1})}
    nodes = _out_of_step(document, fireworks, finished)
    wf = launchpad.get_wf_by_fw_id_lzyfw(document["nodes"][0])
    updated: set[int] = set()
    for fw_id in nodes:
        wf.id_fw[fw_id].state = wf.fw_states[fw_id]
        updated |= wf.refresh(fw_id) | {fw_id}
    adopted = _adopt_added(launchpad, wf, updated, orphans)
    if updated:
        launchpad._update_wf(wf, updated)
    return nodes, adopted


def _lazy(launchpad, fw_id: int) -> LazyFirework:
    return LazyFirework(fw_id, launchpad.fireworks, launchpad.launches, launchpad.gridfs_fallback)


def _adopt_added(launchpad, wf: Workflow, updated: set[int], orphans: dict[str, int]) -> list[int]:
    """Swap each Firework an action just added for the orphan that already is that job."""
    adopted = []
    for new_id in [fw_id for fw_id in wf.id_fw if fw_id < 0]:
        added = wf.id_fw[new_id]
        orphan = orphans.pop(job_key(added.name, added.to_db_dict()["spec"]), None)
        if orphan is None:
            continue
        wf._reassign_ids({new_id: orphan})
        wf.id_fw[orphan] = _lazy(launchpad, orphan)
        updated.discard(new_id)
        updated |= _settle(launchpad, wf, orphan)
        adopted.append(orphan)
    return adopted


def _settle(launchpad, wf: Workflow, fw_id: int) -> set[int]:
    """Set the state of a Firework brought into ``wf`` from its launches; the ids updated.

    One that a worker tried to pick up while it was in no workflow is FIZZLED with its
    launch still RUNNING: that worker failed before the job started ("Could not find
    workflow"), so the launch is marked FIZZLED and the Firework made ready to run.
    """
    firework = launchpad.fireworks.find_one({"fw_id": fw_id}, {"state": 1, "launches": 1})
    query = {"launch_id": {"$in": firework["launches"]}, "state": "RUNNING"}
    never_started = [doc["launch_id"] for doc in launchpad.launches.find(query, {"launch_id": 1})]
    if firework["state"] != "FIZZLED" or not never_started:
        return wf.refresh(fw_id) | {fw_id}
    launchpad.launches.update_many(
        {"launch_id": {"$in": never_started}}, {"$set": {"state": "FIZZLED"}}
    )
    return set(wf.rerun_fw(fw_id)) | {fw_id}


def _adopt_unclaimed(launchpad, orphans: dict[str, int], workflow_name_for) -> Repair:
    """Orphans no action added: a duplicate of a job a workflow holds goes, the rest get a
    new workflow each name."""
    report = Repair()
    groups: dict[str, list[int]] = {}
    for key, fw_id in orphans.items():
        name = key.split("\n", 1)[0]
        if _held_elsewhere(launchpad, key, fw_id):
            launchpad.delete_fws([fw_id])
            report.lines.append(f"deleted Firework {fw_id} ({name}): a workflow holds its job")
            continue
        groups.setdefault(workflow_name_for(name) or RECOVERED_WORKFLOW, []).append(fw_id)
    for name, fw_ids in groups.items():
        _new_workflow(launchpad, name, sorted(fw_ids))
        report.lines.append(f"put Fireworks {sorted(fw_ids)} into a new workflow {name!r}")
    return report


def _held_elsewhere(launchpad, key: str, orphan: int) -> bool:
    """Whether another Firework, in a workflow, is the same job as this orphan."""
    name = key.split("\n", 1)[0]
    query = {"name": name, "fw_id": {"$ne": orphan}}
    for twin in launchpad.fireworks.find(query, {"fw_id": 1, "spec": 1}):
        if job_key(name, twin["spec"]) == key and launchpad.workflows.find_one(
            {"nodes": twin["fw_id"]}, {"_id": 1}
        ):
            return True
    return False


def _new_workflow(launchpad, name: str, fw_ids: list[int]) -> None:
    """A workflow of independent Fireworks, inserted locked, their states then refreshed."""
    wf = Workflow([_lazy(launchpad, fw_id) for fw_id in fw_ids], {i: [] for i in fw_ids}, name)
    inserted = launchpad.workflows.insert_one(wf.to_db_dict() | {"locked": True})
    try:
        updated: set[int] = set()
        for fw_id in fw_ids:
            updated |= _settle(launchpad, wf, fw_id)
        launchpad._update_wf(wf, updated)
    finally:
        launchpad.workflows.update_one({"_id": inserted.inserted_id}, {"$unset": {"locked": True}})
