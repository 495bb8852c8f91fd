"""Safe storage: claims that never overspend or stick, documents that stay small, weights that
are never unpickled, and scientific failures that `fff status` names."""

from __future__ import annotations

import io
import math
import pickle
from concurrent.futures import ThreadPoolExecutor

import bson
import pytest
import torch

from fff_jobs import database as db
from fff_jobs.campaign import _divergence
from fff_jobs.reports import campaign_status

from project import run

CAMPAIGN = "safety"


def new_campaign(database, num_to_run: int = 10) -> str:
    db.create_campaign(database, CAMPAIGN, CAMPAIGN, {"num_to_run": num_to_run})
    return CAMPAIGN


class Payload:
    """Unpickling this would create ``path``: the test that it never is."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_tampered_weights_are_refused_and_never_unpickled(mongo_database, tmp_path, monkeypatch):
    monkeypatch.setenv(db.CACHE_ENVIRONMENT_VARIABLE, str(tmp_path / "cache"))
    record = {"campaign_id": CAMPAIGN, "generation": 0, "member": 0, "committee_size": 1}
    document, _ = db.register_member(mongo_database, record, {"w": torch.zeros(3)})
    marker = tmp_path / "code-ran"
    buffer = io.BytesIO()
    torch.save({"w": Payload(str(marker))}, buffer)
    bucket = db.weights_bucket(mongo_database)
    bucket.delete(document["weights_id"])
    bucket.put(buffer.getvalue(), _id=document["weights_id"])
    with pytest.raises(db.RegistryError, match="do not match the registered sha256"):
        db.load_weights(mongo_database, document)
    with pytest.raises(pickle.UnpicklingError):
        db.weights_from_bytes(buffer.getvalue())
    assert not marker.exists()


def test_weights_larger_than_a_document_go_through_the_normal_path(
    mongo_database, tmp_path, monkeypatch
):
    monkeypatch.setenv(db.CACHE_ENVIRONMENT_VARIABLE, str(tmp_path / "cache"))
    weights = {"w": torch.arange(5_000_000, dtype=torch.float32)}  # 20 MB, over BSON's 16 MB
    record = {"campaign_id": CAMPAIGN, "generation": 0, "member": 0, "committee_size": 1}
    document, created = db.register_member(mongo_database, record, weights)
    assert created and document["weights_bytes"] > 16 * 1024**2
    assert len(bson.encode(mongo_database[db.MODELS].find_one({"_id": document["_id"]}))) < 4096
    assert torch.equal(db.load_weights(mongo_database, document)["w"], weights["w"])


def test_concurrent_claims_spend_the_budget_exactly(mongo_database):
    campaign_id = new_campaign(mongo_database, num_to_run=10)

    def claim(worker: int) -> list[bool]:
        return [
            db.claim_budget(mongo_database, campaign_id, f"r{worker}-{index}", f"job{worker}")
            for index in range(5)
        ]

    with ThreadPoolExecutor(4) as pool:
        granted = sum(sum(claims) for claims in pool.map(claim, range(4)))
    assert granted == 10
    budget = db.get_campaign(mongo_database, campaign_id)["budget"]
    assert (budget["spent"], budget["left"]) == (10, 0)
    claims = list(mongo_database[db.BUDGET_CLAIMS].find({"campaign_id": campaign_id}))
    assert sorted(claim["slot"] for claim in claims) == list(range(10))
    first = claims[0]
    assert db.claim_budget(mongo_database, campaign_id, first["result_id"], first["owner"])
    assert mongo_database[db.BUDGET_CLAIMS].count_documents({}) == 10


def test_a_crash_between_claim_and_counter_is_repaired(mongo_database):
    campaign_id = new_campaign(mongo_database, num_to_run=3)
    assert db.claim_budget(mongo_database, campaign_id, "a", "job")
    mongo_database[db.BUDGET_CLAIMS].insert_one(
        {"_id": f"{campaign_id}-budget0000001", "campaign_id": campaign_id, "slot": 1,
         "result_id": "b", "owner": "dead job", "claimed_at": db.now()}
    )  # fmt: skip
    assert db.recount_budget(mongo_database, campaign_id) == 2
    assert db.get_campaign(mongo_database, campaign_id)["budget"]["left"] == 1
    assert db.unclaimed_budget(mongo_database, campaign_id, {"job"}) == ["b"]


def test_campaign_and_selection_documents_stay_small_however_many_claims_and_frames(
    mongo_database,
):
    campaign_id = new_campaign(mongo_database, num_to_run=10_000_000)
    db.claim_budget(mongo_database, campaign_id, "first", "job")
    size = len(bson.encode(db.get_campaign(mongo_database, campaign_id)))
    for index in range(300):
        db.claim_budget(mongo_database, campaign_id, f"result-{index}", "job")
    assert len(bson.encode(db.get_campaign(mongo_database, campaign_id))) <= size + 8
    frames = [
        {"_id": f"f{index:05d}", "campaign_id": campaign_id, "status": db.POOLED}
        for index in range(400)
    ]
    mongo_database[db.FRAME_POOL].insert_many(frames)
    selection_id = db.selection_id(campaign_id, 0)
    claimed = db.claim_pooled_frames(mongo_database, campaign_id, selection_id)
    uncertainties = {frame["_id"]: 0.001 * index for index, frame in enumerate(claimed)}
    predictions = {"f00001": {"generation": 0, "energy": -1.0, "forces": [[0.0, 0.0, 0.0]]}}
    document = {"_id": selection_id, "campaign_id": campaign_id, "selected": ["f00001"]}
    document |= {"scored": len(claimed)}
    assert db.store_selection(mongo_database, document, uncertainties, predictions)
    assert len(bson.encode(db.get_selection(mongo_database, selection_id))) < 1000
    last = mongo_database[db.FRAME_POOL].find_one({"_id": "f00399"})
    assert last["uncertainty"] == uncertainties["f00399"] and "prediction" not in last
    picked = mongo_database[db.FRAME_POOL].find_one({"_id": "f00001"})
    assert picked["prediction"] == predictions["f00001"]


def test_a_selection_whose_job_is_gone_is_released_and_its_frames_pooled(mongo_database):
    campaign_id = new_campaign(mongo_database)
    number = db.request_selection(mongo_database, campaign_id, "segment job")
    assert db.request_selection(mongo_database, campaign_id, "segment job") == number
    assert db.request_selection(mongo_database, campaign_id, "another job") is None
    mongo_database[db.FRAME_POOL].insert_one(
        {"_id": "f0", "campaign_id": campaign_id, "status": db.POOLED}
    )
    db.claim_pooled_frames(mongo_database, campaign_id, db.selection_id(campaign_id, number))
    assert db.release_dead_selection(mongo_database, campaign_id, {"segment job"}) is None
    assert db.release_dead_selection(mongo_database, campaign_id, set()) == number
    assert db.count_pooled(mongo_database, campaign_id) == 1
    assert db.request_selection(mongo_database, campaign_id, "another job") == number + 1


class NoJobs:
    """A LaunchPad with no Fireworks (campaign_status counts the campaign's jobs)."""

    class fireworks:  # noqa: N801
        @staticmethod
        def find(query, projection=None):
            return []


def test_status_names_failed_calculations_retired_trajectories_and_diverged_members(
    mongo_database,
):
    campaign_id = new_campaign(mongo_database)
    mongo_database[db.REFERENCE_RESULTS].insert_one(
        {"_id": "r1", "campaign_id": campaign_id, "success": False, "sequence": 1,
         "reason": "energy is not finite (nan)"}
    )  # fmt: skip
    mongo_database[db.TRAJECTORIES].insert_one(
        {"_id": "t0", "campaign_id": campaign_id, "index": 0, "status": "retired",
         "last_audit": {"reason": "guard min_distance ended the segment"}}
    )  # fmt: skip
    reason = _divergence([{"validation_loss": math.nan}, {"validation_loss": math.inf}])
    mongo_database[db.MODELS].insert_many(
        [
            {
                "_id": "m0",
                "campaign_id": campaign_id,
                "generation": 0,
                "member": 0,
                "diverged": reason,
            },
            {
                "_id": "m1",
                "campaign_id": campaign_id,
                "generation": 0,
                "member": 1,
                "diverged": None,
            },
        ]
    )
    status = campaign_status(mongo_database, NoJobs, campaign_id)
    assert (status["failed_calculations"], status["retired_trajectories"]) == (1, 1)
    assert status["problems"] == [
        "calculation r1: energy is not finite (nan)",
        "trajectory t0 retired: guard min_distance ended the segment",
        "model m0: training diverged: validation loss inf in every epoch",
    ]
    assert _divergence([{"validation_loss": math.nan}, {"validation_loss": 0.2}]) is None


@pytest.mark.slow
def test_init_reads_the_uri_from_an_environment_variable(workdir, mongo_uri):
    uri = f"{mongo_uri}/fff_from_environment"
    result = run(workdir, "fff", "init", "--uri-env", "FFF_MONGODB_URI", "--force",
                 FFF_MONGODB_URI=uri)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert uri in (workdir / "my_launchpad.yaml").read_text()
    assert uri in (workdir / "fw_config/jobflow.yaml").read_text()
