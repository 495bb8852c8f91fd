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

from fff_jobs import committee, steering
from fff_jobs import database as db
from fff_jobs.campaign import _divergence
from fff_jobs.invariants import check_campaign
from fff_jobs.repair import Damage
from fff_jobs.reports import campaign_status
from fff_jobs.schemas import Frame, ModelRecord, NewCampaign, PooledFrame, Selection
from fff_jobs.spec import CampaignSpec

from project import TESTS, run

CAMPAIGN = "safety"
ATOM = Frame(numbers=[1], positions=[[0.0, 0.0, 0.0]], cell=[[0.0] * 3] * 3, pbc=[False] * 3)


def new_campaign(database, num_to_run: int = 10) -> str:
    spec = CampaignSpec.from_yaml(TESTS / "specs/tiny_water.yaml")
    spec.num_to_run = num_to_run
    new = NewCampaign(campaign_id=CAMPAIGN, spec=spec, starting_structures=[ATOM])
    db.create_campaign(database, new)
    return CAMPAIGN


def claim(database, campaign_id: str, result_id: str, owner: str) -> bool:
    """Claim one reference calculation as a job would, from a fresh read of the campaign."""
    campaign = db.get_campaign(database, campaign_id)
    return result_id in db.claim_budget(database, campaign, [result_id], owner)


def pooled(campaign_id: str, frame_id: str) -> dict:
    frame = PooledFrame(
        id=frame_id, campaign_id=campaign_id, trajectory_id="t", segment=0, generation=0,
        frame=ATOM, sampling_energy=0.0,
    )  # fmt: skip
    return frame.document()


class Payload:
    """Unpickling this would create ``path``: the test that it never is."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_tampered_weights_are_refused_and_never_unpickled(mongo_database, tmp_path, monkeypatch):
    monkeypatch.setenv(db.CACHE_ENVIRONMENT_VARIABLE, str(tmp_path / "cache"))
    record = ModelRecord(campaign_id=CAMPAIGN, generation=0, member=0, committee_size=1)
    document, _ = committee.register_member(mongo_database, record, {"w": torch.zeros(3)})
    marker = tmp_path / "code-ran"
    buffer = io.BytesIO()
    torch.save({"w": Payload(str(marker))}, buffer)
    bucket = db.weights_bucket(mongo_database)
    bucket.delete(document.weights_id)
    bucket.put(buffer.getvalue(), _id=document.weights_id)
    (tmp_path / "cache" / f"{document.weights_sha256}.pt").unlink()
    with pytest.raises(db.RegistryError, match="do not match the registered sha256"):
        committee.load_weights(mongo_database, document)
    with pytest.raises(pickle.UnpicklingError):
        committee.weights_from_bytes(buffer.getvalue())
    assert not marker.exists()


def test_weights_larger_than_a_document_go_through_the_normal_path(
    mongo_database, tmp_path, monkeypatch
):
    monkeypatch.setenv(db.CACHE_ENVIRONMENT_VARIABLE, str(tmp_path / "cache"))
    weights = {"w": torch.arange(5_000_000, dtype=torch.float32)}  # 20 MB, over BSON's 16 MB
    record = ModelRecord(campaign_id=CAMPAIGN, generation=0, member=0, committee_size=1)
    document, created = committee.register_member(mongo_database, record, weights)
    assert created and document.weights_bytes > 16 * 1024**2
    assert len(bson.encode(mongo_database[db.MODELS].find_one({"_id": document.id}))) < 4096
    (tmp_path / "cache" / f"{document.weights_sha256}.pt").unlink()  # from GridFS, not the cache
    assert torch.equal(committee.load_weights(mongo_database, document)["w"], weights["w"])


def test_concurrent_claims_spend_the_budget_exactly(mongo_database):
    campaign_id = new_campaign(mongo_database, num_to_run=10)

    def worker(index: int) -> list[bool]:
        return [
            claim(mongo_database, campaign_id, f"r{index}-{k}", f"job{index}") for k in range(5)
        ]

    with ThreadPoolExecutor(4) as pool:
        granted = sum(sum(claims) for claims in pool.map(worker, range(4)))
    assert granted == 10
    budget = db.get_campaign(mongo_database, campaign_id).budget
    assert (budget.spent, budget.left) == (10, 0)
    claims = list(mongo_database[db.BUDGET_CLAIMS].find({"campaign_id": campaign_id}))
    assert sorted(claim["slot"] for claim in claims) == list(range(10))
    first = claims[0]
    assert claim(mongo_database, campaign_id, first["result_id"], first["owner"])
    assert mongo_database[db.BUDGET_CLAIMS].count_documents({}) == 10


def firework(campaign_id: str, stage: str, state: str, fw_id: int) -> dict:
    """A Firework of one of the campaign's jobs, as the invariants read it."""
    job = {"uuid": f"uuid-{fw_id}"}
    name = f"{campaign_id} {stage} {fw_id}"
    return {"fw_id": fw_id, "name": name, "state": state, "spec": {"_tasks": [{"job": job}]}}


def test_a_crash_between_claim_and_counter_is_repaired(mongo_database):
    campaign_id = new_campaign(mongo_database, num_to_run=3)
    mongo_database[db.FIREWORKS].insert_one(firework(campaign_id, "calculate", "RUNNING", 1))
    assert claim(mongo_database, campaign_id, "a", "uuid-1")
    mongo_database[db.BUDGET_CLAIMS].insert_one(
        {"_id": f"{campaign_id}-budget0000001", "campaign_id": campaign_id, "slot": 1,
         "result_id": "b", "owner": "dead job", "claimed_at": db.now()}
    )  # fmt: skip
    assert db.recount_budget(mongo_database, campaign_id) == 2
    assert db.get_campaign(mongo_database, campaign_id).budget.left == 1
    check = check_campaign(mongo_database, campaign_id, Damage())
    assert check.violations == ["1 claimed calculation(s) with no result and no job"]


def test_a_live_job_between_two_of_its_writes_is_no_violation(mongo_database):
    campaign_id = new_campaign(mongo_database, num_to_run=3)
    audit = firework(campaign_id, "audit", "RUNNING", 1)
    train = firework(campaign_id, "train", "RUNNING", 2)
    mongo_database[db.FIREWORKS].insert_many([audit, train])
    mongo_database[db.BUDGET_CLAIMS].insert_one(
        {"_id": f"{campaign_id}-budget0000000", "campaign_id": campaign_id, "slot": 0,
         "result_id": "a", "owner": "uuid-1", "claimed_at": db.now()}
    )  # claimed, the counter not raised yet, no result yet  # fmt: skip
    mongo_database[db.TRAJECTORIES].insert_one(
        {"_id": f"{campaign_id}-t000", "campaign_id": campaign_id, "index": 0,
         "status": "sampling", "segments_completed": 0, "audits_completed": 0}
    )  # started by the running train job, its segment not added yet  # fmt: skip
    assert check_campaign(mongo_database, campaign_id, Damage()).violations == []

    for fw_id in (1, 2):  # both jobs died
        mongo_database[db.FIREWORKS].update_one({"fw_id": fw_id}, {"$set": {"state": "FIZZLED"}})
    check = check_campaign(mongo_database, campaign_id, Damage())
    assert check.violations[:3] == [
        "budget counter says 0 spent, 1 claimed",
        "1 claimed calculation(s) with no result and no job",
        f"trajectory {campaign_id}-t000 is sampling with no job to move it",
    ]
    assert [job.stage for job in check.needed] == ["segment"]


def test_campaign_and_selection_documents_stay_small_however_many_claims_and_frames(
    mongo_database,
):
    campaign_id = new_campaign(mongo_database, num_to_run=10_000_000)
    stored = {"_id": campaign_id}
    claim(mongo_database, campaign_id, "first", "job")
    size = len(bson.encode(mongo_database[db.CAMPAIGNS].find_one(stored)))
    for index in range(300):
        claim(mongo_database, campaign_id, f"result-{index}", "job")
    assert len(bson.encode(mongo_database[db.CAMPAIGNS].find_one(stored))) <= size + 8
    frames = [pooled(campaign_id, f"f{index:05d}") for index in range(400)]
    mongo_database[db.FRAME_POOL].insert_many(frames)
    selection_id = db.selection_id(campaign_id, 0)
    claimed = db.claim_pooled_frames(mongo_database, campaign_id, selection_id)
    uncertainties = {frame.id: 0.001 * index for index, frame in enumerate(claimed)}
    prediction = {"generation": 0, "energy": -1.0, "forces": [[0.0, 0.0, 0.0]]}
    predictions = {"f00001": prediction | {"force_deviation": 0.1, "energy_deviation": 0.01}}
    selection = Selection(
        id=selection_id, campaign_id=campaign_id, generation=0, scored=len(claimed),
        selected=["f00001"],
    )  # fmt: skip
    assert db.store_selection(mongo_database, selection, uncertainties, predictions)
    assert not db.store_selection(mongo_database, selection, uncertainties, predictions)
    assert len(bson.encode(mongo_database[db.SELECTIONS].find_one({"_id": selection_id}))) < 1000
    last = mongo_database[db.FRAME_POOL].find_one({"_id": "f00399"})
    assert last["uncertainty"] == uncertainties["f00399"] and last["prediction"] is None
    assert last["status"] == db.DISCARDED
    picked = db.get_frames(mongo_database, ["f00001"])[0]
    assert picked.prediction.model_dump() == predictions["f00001"]
    assert picked.status == db.SELECTED


def test_a_selection_whose_job_is_gone_is_released_and_its_frames_pooled(mongo_database):
    campaign_id = new_campaign(mongo_database)

    def request(owner: str) -> int | None:
        return db.request_selection(
            mongo_database, db.get_campaign(mongo_database, campaign_id), owner
        )

    number = request("segment job")
    assert request("segment job") == number
    assert request("another job") is None
    mongo_database[db.FRAME_POOL].insert_one(pooled(campaign_id, "f0"))
    db.claim_pooled_frames(mongo_database, campaign_id, db.selection_id(campaign_id, number))
    assert db.release_dead_selection(mongo_database, campaign_id, {"segment job"}) is None
    assert db.release_dead_selection(mongo_database, campaign_id, set()) == number
    assert db.CampaignCounts(mongo_database, campaign_id)[steering.POOLED_FRAMES] == 1
    assert request("another job") == number + 1


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
    status = campaign_status(mongo_database, campaign_id)
    assert (status["failed_calculations"], status["retired_trajectories"]) == (1, 1)
    assert status["problems"] == [
        "calculation r1: energy is not finite (nan)",
        "trajectory t0 retired: guard min_distance ended the segment",
        "model m0: training diverged: validation loss inf in every epoch",
    ]
    assert _divergence([{"validation_loss": math.nan}, {"validation_loss": 0.2}]) is None
    # a member that holds no frame out is judged on its monitor frames
    assert _divergence([{"monitor_loss": math.nan}, {"monitor_loss": 0.2}]) is None
    diverged = _divergence([{"monitor_loss": math.nan}])
    assert diverged == "training diverged: monitor loss nan in every epoch"


@pytest.mark.slow
def test_init_reads_the_uri_from_an_environment_variable(workdir, mongo_uri):
    uri = f"{mongo_uri}/fff_from_environment"
    result = run(workdir, "fff", "init", "--uri-env", "FFF_MONGODB_URI", "--force",
                 FFF_MONGODB_URI=uri)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert uri in (workdir / "my_launchpad.yaml").read_text()
    assert uri in (workdir / "fw_config/jobflow.yaml").read_text()
