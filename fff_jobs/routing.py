"""Which worker runs which job: FireWorks categories and priorities, set explicitly on every job."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the category names are read by `fff init`, which needs no jobflow
    from jobflow import Flow, Job

GPU = "gpu"
CPU = "cpu"


def route(work: Job | Flow, category: str | None, priority: int = 0) -> Job | Flow:
    """Pin a job, or every job of a flow, to a worker category and priority.

    jobflow copies a job's manager_config onto every job it creates at run time
    (``pass_manager_config`` and dynamic config updates). A GPU job that adds a CPU
    detour would then send the detour to the GPU worker, so the config is set
    without the dynamic flag and is never passed on: each new job is routed here.
    A category of ``None`` lets any worker run the job (the single-worker quick start).
    FireWorks also tells the job its Firework id (``_add_launchpad_and_fw_id``; jobflow
    puts it in the job's metadata), so the job finds its workflow without a query.
    """
    manager_config: dict[str, object] = {"_priority": priority, "_add_launchpad_and_fw_id": True}
    if category:
        manager_config["_category"] = category
    work.update_config(
        {"manager_config": manager_config, "pass_manager_config": False}, dynamic=False
    )
    return work
