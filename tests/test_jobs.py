"""The Makers users compose into their own flows make the campaign's own jobs: one name, one
worker category and one priority per stage, whoever makes the job."""

from __future__ import annotations

from fff_jobs import steering
from fff_jobs.jobs import (
    AuditMaker,
    CalculationMaker,
    SegmentMaker,
    SelectionMaker,
    TrainMemberMaker,
    jobs_for,
)
from fff_jobs.schemas import Campaign
from fff_jobs.spec import CampaignSpec, WorkerSettings

WORKERS = WorkerSettings()
CAMPAIGN = Campaign.model_validate(
    {
        "_id": "water-1a2b3c",
        "name": "water",
        "spec": CampaignSpec(name="water", system={"water_clusters": {}}),
        "budget": {"num_to_run": 10},
    }
)


def routing(work) -> tuple[str, str | None, int]:
    config = work.config.manager_config
    return work.name, config.get("_category"), config["_priority"]


def test_a_users_maker_makes_the_job_the_campaign_adds():
    made = [
        TrainMemberMaker().make(CAMPAIGN.id, 2, 1),
        SegmentMaker().make(CAMPAIGN.id, f"{CAMPAIGN.id}-t004", 3),
        AuditMaker().make(CAMPAIGN.id, f"{CAMPAIGN.id}-t004", 3),
        SelectionMaker().make(CAMPAIGN.id, 5),
        CalculationMaker().make(CAMPAIGN.id, 5, 0, ["f1", "f2"]),
    ]
    plans = [
        steering.TrainJobs(2),
        steering.SegmentJob(f"{CAMPAIGN.id}-t004", 3),
        steering.AuditJob(f"{CAMPAIGN.id}-t004", 3),
        steering.SelectionJob(5),
        steering.CalculationJobs(5, ["f1", "f2"]),
    ]
    campaign_jobs = [jobs_for(CAMPAIGN, plan) for plan in plans]
    campaign_jobs[0] = campaign_jobs[0][1:]  # member 1 of the round's jobs
    assert [routing(work) for work in made] == [routing(jobs[0]) for jobs in campaign_jobs]


def test_each_stage_has_its_name_worker_category_and_priority():
    jobs = [
        TrainMemberMaker().make("c-1", 0, 2),
        SegmentMaker().make("c-1", "c-1-t000", 0),
        AuditMaker().make("c-1", "c-1-t000", 0),
        SelectionMaker().make("c-1", 0),
        CalculationMaker().make("c-1", 0, 1, ["f"]),
    ]
    assert [routing(work) for work in jobs] == [
        ("c-1 train g0 m2", WORKERS.gpu_category, WORKERS.training_priority),
        ("c-1 segment t000 s0", WORKERS.gpu_category, WORKERS.sampling_priority),
        ("c-1 audit t000 s0", WORKERS.cpu_category, WORKERS.audit_priority),
        ("c-1 select 0", WORKERS.gpu_category, WORKERS.inference_priority),
        ("c-1 calculate 0.1", WORKERS.cpu_category, WORKERS.calculation_priority),
    ]
    assert WORKERS.audit_priority > WORKERS.calculation_priority
