"""The project's own MongoDB collections: every collection, index and atomic update fff-jobs adds.

For now the model registry:

- ``models``: one document per trained committee member, ``_id`` ``<campaign>-g<gen>-m<member>``
  (unique on campaign, generation, member): hyperparameters, seed, training-set
  hash, metrics, provenance and the sha256 of its weights.
- ``model_weights`` (a GridFS bucket): the weights, a ``torch.save``\\ d state dict,
  loaded back with ``weights_only=True``; never a pickled module.
- ``model_registry``: one document per campaign holding the current generation,
  advanced by a single atomic update once every member of a generation is
  registered, so readers never see half a committee.

Workers cache downloaded weights on local disk by content hash.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import gridfs
import pymongo
from pymongo.database import Database

if TYPE_CHECKING:  # torch loads in seconds: only the code that handles weights imports it
    import torch

MODELS = "models"
MODEL_WEIGHTS_BUCKET = "model_weights"
MODEL_REGISTRY = "model_registry"

NO_GENERATION = -1
CACHE_ENVIRONMENT_VARIABLE = "FFF_MODEL_CACHE"


class RegistryError(RuntimeError):
    """The model registry cannot give what was asked: a model or its weights are missing or
    damaged."""


def model_id(campaign_id: str, generation: int, member: int) -> str:
    """The registry id of one committee member."""
    return f"{campaign_id}-g{generation:03d}-m{member:02d}"


def ensure_indexes(database: Database) -> None:
    """Create the registry's indexes (idempotent)."""
    database[MODELS].create_index(
        [("campaign_id", 1), ("generation", 1), ("member", 1)], unique=True, name="member_unique"
    )


def weights_to_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict as bytes (``torch.save``), moved to the CPU first."""
    import torch

    buffer = io.BytesIO()
    torch.save({name: tensor.detach().cpu() for name, tensor in state_dict.items()}, buffer)
    return buffer.getvalue()


def weights_from_bytes(content: bytes) -> dict[str, torch.Tensor]:
    """A state dict from bytes, loaded with ``weights_only=True`` (no code runs)."""
    import torch

    return torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)


def weights_bucket(database: Database) -> gridfs.GridFS:
    """The GridFS collection of model weights.

    The classic ``GridFS`` API rather than ``GridFSBucket``: FireWorks' embedded
    store (mongomock) supports only the former.
    """
    return gridfs.GridFS(database, collection=MODEL_WEIGHTS_BUCKET)


def find_member(database: Database, campaign_id: str, generation: int, member: int) -> dict | None:
    """The registry document of one member, or None."""
    return database[MODELS].find_one({"_id": model_id(campaign_id, generation, member)})


def register_member(
    database: Database,
    record: dict,
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict, bool]:
    """Store a member's weights in GridFS and its ``record`` in the registry.

    ``record`` holds at least campaign_id, generation, member, committee_size and
    hyperparameters. Returns (document, created): a member registered before is
    returned as it is (created False) and nothing new is stored, so re-runs are safe.
    Publishes the generation once its last member is registered.
    """
    ensure_indexes(database)
    key = model_id(record["campaign_id"], record["generation"], record["member"])
    existing = database[MODELS].find_one({"_id": key})
    if existing is not None:
        return existing, False
    content = weights_to_bytes(state_dict)
    sha256 = hashlib.sha256(content).hexdigest()
    bucket = weights_bucket(database)
    weights_id = bucket.put(content, filename=f"{key}.pt", metadata={"sha256": sha256})
    document = record | {
        "_id": key,
        "weights_id": weights_id,
        "weights_sha256": sha256,
        "weights_bytes": len(content),
        "registered_at": datetime.datetime.now(datetime.UTC),
    }
    try:
        database[MODELS].insert_one(document)
    except BaseException as error:
        bucket.delete(weights_id)
        if isinstance(error, pymongo.errors.DuplicateKeyError):
            return database[MODELS].find_one({"_id": key}), False
        raise
    publish_generation(database, record["campaign_id"], record["generation"])
    return document, True


def publish_generation(database: Database, campaign_id: str, generation: int) -> bool:
    """Make ``generation`` current if all its members are registered and it is newer.

    One conditional ``find_one_and_update``: of two workers finishing the last
    members at once, both may call this and the result is the same. Returns whether
    this call advanced the current generation.
    """
    members = list(
        database[MODELS].find(
            {"campaign_id": campaign_id, "generation": generation},
            {"_id": 1, "committee_size": 1},
        )
    )
    if not members or len(members) < members[0]["committee_size"]:
        return False
    registry = database[MODEL_REGISTRY]
    registry.update_one(
        {"_id": campaign_id}, {"$setOnInsert": {"current_generation": NO_GENERATION}}, upsert=True
    )
    previous = registry.find_one_and_update(
        {"_id": campaign_id, "current_generation": {"$lt": generation}},
        {
            "$set": {
                "current_generation": generation,
                "members": sorted(member["_id"] for member in members),
                "published_at": datetime.datetime.now(datetime.UTC),
            }
        },
    )
    return previous is not None


def current_generation(database: Database, campaign_id: str) -> int | None:
    """The campaign's newest complete generation, or None before the first one."""
    document = database[MODEL_REGISTRY].find_one({"_id": campaign_id})
    if document is None or document["current_generation"] == NO_GENERATION:
        return None
    return document["current_generation"]


def committee_documents(
    database: Database, campaign_id: str, generation: int | None = None, healthy: bool = False
) -> list[dict]:
    """Registry documents of a generation's members (default: the current one), by member.

    ``healthy``: only the members whose training did not diverge (those that sample,
    score frames and report errors); an error if none is left.
    """
    if generation is None:
        generation = current_generation(database, campaign_id)
        if generation is None:
            raise RegistryError(
                f"campaign {campaign_id!r} has no complete committee yet: train generation 0 first"
            )
    documents = list(
        database[MODELS]
        .find({"campaign_id": campaign_id, "generation": generation})
        .sort("member", 1)
    )
    if not documents:
        raise RegistryError(
            f"campaign {campaign_id!r} has no models of generation {generation} in the registry"
        )
    if healthy:
        documents = [document for document in documents if not document.get("diverged")]
        if not documents:
            raise RegistryError(
                f"campaign {campaign_id!r}: every member of generation {generation} diverged "
                "in training; lower training.learning_rate and submit the campaign again"
            )
    return documents


def model_cache_directory() -> Path:
    """Where a worker keeps downloaded weights: ``$FFF_MODEL_CACHE`` or ~/.cache/fff-jobs/models."""
    default = Path.home() / ".cache" / "fff-jobs" / "models"
    return Path(os.environ.get(CACHE_ENVIRONMENT_VARIABLE, default))


def _download(database: Database, document: dict) -> bytes:
    try:
        return weights_bucket(database).get(document["weights_id"]).read()
    except gridfs.errors.NoFile:
        raise RegistryError(
            f"model {document['_id']}: its weights ({document['weights_id']}) are missing from "
            f"the GridFS bucket {MODEL_WEIGHTS_BUCKET!r}; delete this registry document and "
            f"retrain the member"
        ) from None


def load_weights(
    database: Database, document: dict, cache_directory: Path | None = None
) -> dict[str, torch.Tensor]:
    """The state dict of a registered member, from the local cache or downloaded into it.

    The content is checked against the registered sha256; a mismatch is an error
    that names the model (a damaged cache file is downloaded again).
    """
    sha256 = document["weights_sha256"]
    cached = (cache_directory or model_cache_directory()) / f"{sha256}.pt"
    if cached.is_file():
        content = cached.read_bytes()
        if hashlib.sha256(content).hexdigest() == sha256:
            return weights_from_bytes(content)
    content = _download(database, document)
    if hashlib.sha256(content).hexdigest() != sha256:
        raise RegistryError(
            f"model {document['_id']}: the weights in GridFS do not match the registered sha256 "
            f"{sha256}; they were changed or damaged: delete this registry document and "
            f"retrain the member"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.partial")
    partial.write_bytes(content)
    partial.replace(cached)
    return weights_from_bytes(content)


# --- campaign state: campaigns, reference results, trajectories, the frame pool, selections ---

CAMPAIGNS = "campaigns"
REFERENCE_RESULTS = "reference_results"
STARTING_STRUCTURES = "starting_structures"
TRAJECTORIES = "trajectories"
SEGMENTS = "segments"
FRAME_POOL = "frame_pool"
SELECTIONS = "selections"
BUDGET_CLAIMS = "budget_claims"
TRAINING_SNAPSHOTS = "training_snapshots"
# FireWorks' own collections, read here only to find a campaign's jobs and workflows
FIREWORKS = "fireworks"
WORKFLOWS = "workflows"
ALIVE_STATES = ("WAITING", "READY", "RESERVED", "RUNNING")

RUNNING, COMPLETE = "running", "complete"
POOLED, CLAIMED, SELECTED, DISCARDED = "pooled", "claimed", "selected", "discarded"


class CampaignNotFoundError(LookupError):
    """No campaign with that id in the database."""


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def ensure_campaign_indexes(database: Database) -> None:
    """Indexes of the campaign collections (idempotent)."""
    database[REFERENCE_RESULTS].create_index([("campaign_id", 1), ("sequence", 1)])
    database[REFERENCE_RESULTS].create_index([("campaign_id", 1), ("source", 1)])
    database[REFERENCE_RESULTS].create_index([("trajectory_id", 1), ("segment", 1)])
    database[FRAME_POOL].create_index([("campaign_id", 1), ("status", 1)])
    database[FRAME_POOL].create_index([("selection_id", 1)])
    database[TRAJECTORIES].create_index([("campaign_id", 1), ("index", 1)], unique=True)
    database[STARTING_STRUCTURES].create_index([("campaign_id", 1), ("index", 1)], unique=True)
    database[BUDGET_CLAIMS].create_index([("campaign_id", 1), ("result_id", 1)], unique=True)


def create_campaign(database: Database, campaign_id: str, name: str, spec: dict) -> dict:
    """Insert a new campaign document; its id must be new."""
    ensure_indexes(database)
    ensure_campaign_indexes(database)
    document = {
        "_id": campaign_id,
        "name": name,
        "spec": spec,
        "status": RUNNING,
        "stop_reason": None,
        "created_at": now(),
        "budget": {
            "num_to_run": spec["num_to_run"],
            "spent": 0,
            "left": spec["num_to_run"],
        },
        "sequence": 0,
        "training": {
            "running": False,
            "generation": NO_GENERATION,
            "trained_results": 0,
        },
        "followed_up_generation": NO_GENERATION,
        "selection": {"pending": False, "count": 0},
        "generations": [],
    }
    database[CAMPAIGNS].insert_one(document)
    return document


def get_campaign(database: Database, campaign_id: str) -> dict:
    """The campaign document, or an error that says how to find the right id."""
    document = database[CAMPAIGNS].find_one({"_id": campaign_id})
    if document is None:
        raise CampaignNotFoundError(
            f"no campaign {campaign_id!r} in this database: `fff status` lists the campaigns"
        )
    return document


def list_campaigns(database: Database) -> list[dict]:
    """Every campaign, newest first."""
    return list(database[CAMPAIGNS].find({}).sort("created_at", -1))


def claim_budget(database: Database, campaign_id: str, result_id: str, owner: str) -> bool:
    """Spend one reference calculation on ``result_id``; False when the budget is gone.

    Each claim is one document of ``budget_claims`` in a numbered slot,
    ``_id`` ``<campaign>-budget<slot>`` with slot < num_to_run: inserting it is the
    claim, one atomic operation, and the unique ``_id`` lets two workers never take
    the same slot, so the budget is never overspent. A re-run of the same
    calculation finds its claim (unique on campaign and result) and may go on.

    The campaign's ``budget.spent``/``left`` are a counter updated after the insert
    (:func:`_count_spent`, monotone). A crash between the two operations leaves the
    counter one behind: the next claim's update, or `fff recover`
    (:func:`recount_budget`), brings it level.
    """
    claims = database[BUDGET_CLAIMS]
    if claims.count_documents({"campaign_id": campaign_id, "result_id": result_id}, limit=1):
        return True
    campaign = get_campaign(database, campaign_id)
    budget = campaign["budget"]
    if campaign["status"] != RUNNING:
        return False
    for slot in range(budget["spent"], budget["num_to_run"]):
        try:
            claims.insert_one(
                {
                    "_id": f"{campaign_id}-budget{slot:07d}",
                    "campaign_id": campaign_id,
                    "slot": slot,
                    "result_id": result_id,
                    "owner": owner,
                    "claimed_at": now(),
                }
            )
        except pymongo.errors.DuplicateKeyError:
            if claims.count_documents({"campaign_id": campaign_id, "result_id": result_id}):
                return True
            continue
        _count_spent(database, campaign_id, slot + 1, budget["num_to_run"])
        return True
    return False


def _count_spent(database: Database, campaign_id: str, spent: int, num_to_run: int) -> None:
    """Raise the campaign's budget counter to ``spent`` (never lowers it: claims only grow)."""
    database[CAMPAIGNS].update_one(
        {"_id": campaign_id, "budget.spent": {"$lt": spent}},
        {"$set": {"budget.spent": spent, "budget.left": num_to_run - spent}},
    )


def recount_budget(database: Database, campaign_id: str) -> int:
    """Bring the budget counter level with the claims (after a crash); returns the count."""
    spent = database[BUDGET_CLAIMS].count_documents({"campaign_id": campaign_id})
    num_to_run = get_campaign(database, campaign_id)["budget"]["num_to_run"]
    _count_spent(database, campaign_id, spent, num_to_run)
    return spent


def unclaimed_budget(database: Database, campaign_id: str, owners: set[str]) -> list[str]:
    """Result ids claimed by jobs not in ``owners`` whose result was never stored."""
    claims = database[BUDGET_CLAIMS].find(
        {"campaign_id": campaign_id, "owner": {"$nin": list(owners)}}
    )
    claimed = [claim["result_id"] for claim in claims]
    stored = {
        doc["_id"]
        for doc in database[REFERENCE_RESULTS].find({"_id": {"$in": claimed}}, {"_id": 1})
    }
    return [result_id for result_id in claimed if result_id not in stored]


def store_reference_result(database: Database, document: dict) -> bool:
    """Insert one reference result (``_id`` chosen by the caller); False if it was stored before.

    Each result gets the next ``sequence`` number of its campaign: a training
    round takes every successful result up to a sequence number.
    """
    if database[REFERENCE_RESULTS].count_documents({"_id": document["_id"]}, limit=1):
        return False
    campaign = database[CAMPAIGNS].find_one_and_update(
        {"_id": document["campaign_id"]},
        {"$inc": {"sequence": 1}},
        projection={"sequence": 1},
        return_document=pymongo.ReturnDocument.AFTER,
    )
    try:
        database[REFERENCE_RESULTS].insert_one(
            document | {"sequence": campaign["sequence"], "stored_at": now()}
        )
    except pymongo.errors.DuplicateKeyError:
        return False
    return True


def calibrated_results(database: Database, campaign_id: str) -> list[dict]:
    """Results that carry a calibration record (prediction beside error), oldest first."""
    query = {"campaign_id": campaign_id, "calibration": {"$exists": True}}
    found = database[REFERENCE_RESULTS].find(query, {"calibration": 1}).sort("sequence", 1)
    return list(found)


def find_reference_result(database: Database, result_id: str) -> dict | None:
    return database[REFERENCE_RESULTS].find_one({"_id": result_id})


def snapshot_training_set(database: Database, campaign_id: str, generation: int) -> None:
    """Record, once, the results a generation trains on: every successful one stored now.

    Every member of the generation reads this one list, so all train on the same
    frames, whatever arrives while they train. A re-run keeps the first snapshot.
    """
    query = {"campaign_id": campaign_id, "success": True}
    found = database[REFERENCE_RESULTS].find(query, {"_id": 1}).sort("sequence", 1)
    database[TRAINING_SNAPSHOTS].update_one(
        {"_id": f"{campaign_id}-g{generation:03d}"},
        {
            "$setOnInsert": {
                "campaign_id": campaign_id,
                "generation": generation,
                "result_ids": [document["_id"] for document in found],
                "taken_at": now(),
            }
        },
        upsert=True,
    )


def training_results(database: Database, campaign_id: str, generation: int) -> list[dict]:
    """The reference results of a generation's training snapshot, in the order stored."""
    snapshot = database[TRAINING_SNAPSHOTS].find_one({"_id": f"{campaign_id}-g{generation:03d}"})
    if snapshot is None:
        raise RegistryError(
            f"campaign {campaign_id!r} has no training snapshot of generation "
            f"{generation}: its training round was never claimed"
        )
    ids = snapshot["result_ids"]
    found = {doc["_id"]: doc for doc in database[REFERENCE_RESULTS].find({"_id": {"$in": ids}})}
    return [found[result_id] for result_id in ids]


def count_results(database: Database, campaign_id: str, **conditions) -> int:
    return database[REFERENCE_RESULTS].count_documents({"campaign_id": campaign_id, **conditions})


def claim_training_round(
    database: Database, campaign_id: str, required_new: int, owner: str
) -> int | None:
    """Start the next training generation if none is running and enough new data arrived.

    One conditional update (on the generation and the count of successful results
    read just before), so two workers never start the same round; the claimer then
    records the round's training set (:func:`snapshot_training_set`). Returns the
    generation to train, or None. The claim names its ``owner`` (a job uuid) and
    time: a re-run of the owner after a crash gets its running round back, and adds
    the jobs the dead run never handed over.
    """
    training = get_campaign(database, campaign_id)["training"]
    if training["running"] and training.get("owner") == owner:
        generation = training["generation"]
    else:
        results = count_results(database, campaign_id, success=True)
        generation = training["generation"] + 1
        before = database[CAMPAIGNS].find_one_and_update(
            {
                "_id": campaign_id,
                "status": RUNNING,
                "training.running": False,
                "training.generation": generation - 1,
                "training.trained_results": {"$lte": results - required_new},
            },
            {
                "$set": {
                    "training.running": True,
                    "training.generation": generation,
                    "training.trained_results": results,
                    "training.owner": owner,
                    "training.claimed_at": now(),
                }
            },
            projection={"_id": 1},
        )
        if before is None:
            return None
    snapshot_training_set(database, campaign_id, generation)
    return generation


def claim_generation_follow_up(
    database: Database, campaign_id: str, generation: int, owner: str
) -> bool:
    """True for exactly one job once ``generation`` is published (and its re-runs): it ends the
    round."""
    before = database[CAMPAIGNS].find_one_and_update(
        {"_id": campaign_id, "followed_up_generation": {"$lt": generation}},
        {
            "$set": {
                "followed_up_generation": generation,
                "training.running": False,
                "follow_up": {"generation": generation, "owner": owner, "claimed_at": now()},
            },
        },
        projection={"_id": 1},
    )
    if before is not None:
        return True
    query = {"_id": campaign_id, "follow_up.generation": generation, "follow_up.owner": owner}
    return database[CAMPAIGNS].count_documents(query, limit=1) > 0


def record_generation(database: Database, campaign_id: str, summary: dict) -> None:
    """Append one generation's figures (errors, data size, budget spent) to the campaign, once."""
    database[CAMPAIGNS].update_one(
        {"_id": campaign_id, "generations.generation": {"$ne": summary["generation"]}},
        {"$addToSet": {"generations": summary}},
    )


def finish_campaign(database: Database, campaign_id: str, reason: str) -> bool:
    """Mark a running campaign complete, and its sampling trajectories stopped; True for the one
    caller that completed it."""
    before = database[CAMPAIGNS].find_one_and_update(
        {"_id": campaign_id, "status": RUNNING},
        {"$set": {"status": COMPLETE, "stop_reason": reason, "finished_at": now()}},
        projection={"_id": 1},
    )
    stop_sampling(database, campaign_id)
    return before is not None


def stop_sampling(database: Database, campaign_id: str) -> int:
    """Mark the sampling trajectories of a finished campaign stopped; how many were."""
    result = database[TRAJECTORIES].update_many(
        {"campaign_id": campaign_id, "status": "sampling"}, {"$set": {"status": "stopped"}}
    )
    return result.modified_count


def store_starting_structures(database: Database, campaign_id: str, frames: list[dict]) -> None:
    """The campaign's search space: trajectories start (and restart) from these."""
    for index, frame in enumerate(frames):
        database[STARTING_STRUCTURES].update_one(
            {"_id": f"{campaign_id}-start{index:04d}"},
            {"$setOnInsert": {"campaign_id": campaign_id, "index": index, "frame": frame}},
            upsert=True,
        )


def starting_structures(database: Database, campaign_id: str) -> list[dict]:
    query = {"campaign_id": campaign_id}
    return list(database[STARTING_STRUCTURES].find(query).sort("index", 1))


def create_trajectory(database: Database, document: dict) -> bool:
    """Insert a trajectory (``_id`` chosen by the caller); False if it exists."""
    try:
        database[TRAJECTORIES].insert_one(document)
    except pymongo.errors.DuplicateKeyError:
        return False
    return True


def get_trajectory(database: Database, trajectory_id: str) -> dict:
    return database[TRAJECTORIES].find_one({"_id": trajectory_id})


def complete_segment(database: Database, trajectory_id: str, segment: int, summary: dict) -> bool:
    """Record a finished segment; True only for the first completion of that segment.

    The trajectory keeps the last segment (its audit reads it); ``segments`` keeps
    every segment's summary, for the campaign's history and time budget.
    """
    before = database[TRAJECTORIES].find_one_and_update(
        {"_id": trajectory_id, "segments_completed": segment},
        {"$set": {"segments_completed": segment + 1, "last_segment": summary}},
        projection={"campaign_id": 1},
    )
    if before is None:
        return False
    database[SEGMENTS].update_one(
        {"_id": f"{trajectory_id}-s{segment:04d}"},
        {
            "$setOnInsert": {
                "campaign_id": before["campaign_id"],
                "trajectory_id": trajectory_id,
                "segment": segment,
                **{key: value for key, value in summary.items() if key != "final_frame"},
            }
        },
        upsert=True,
    )
    return True


def complete_audit(database: Database, trajectory_id: str, segment: int, changes: dict) -> bool:
    """Apply an audit's decision to its trajectory; True only for the first time.

    One update, conditional on the audit count the caller read the trajectory
    under: only this segment's audit changes it, so ``changes`` (the new error
    history included) may be computed from that read and simply set. A stopped
    trajectory (its campaign finished) stays stopped.
    """
    before = database[TRAJECTORIES].find_one_and_update(
        {"_id": trajectory_id, "audits_completed": segment, "status": {"$ne": "stopped"}},
        {"$set": {"audits_completed": segment + 1, **changes}},
        projection={"_id": 1},
    )
    return before is not None


def annotate_audit(database: Database, result_id: str, decision: dict) -> None:
    """Attach an audit's decision to the reference result of the audited frame."""
    database[REFERENCE_RESULTS].update_one({"_id": result_id}, {"$set": {"audit": decision}})


def count_trajectories(database: Database, campaign_id: str, status: str) -> int:
    return database[TRAJECTORIES].count_documents({"campaign_id": campaign_id, "status": status})


def revive_trajectories(database: Database, campaign_id: str) -> list[dict]:
    """Put retired trajectories back to sampling (each by one conditional update); those revived."""
    revived = []
    for trajectory in database[TRAJECTORIES].find(
        {"campaign_id": campaign_id, "status": "retired"}
    ):
        before = database[TRAJECTORIES].find_one_and_update(
            {"_id": trajectory["_id"], "status": "retired"},
            {"$set": {"status": "sampling", "failures": 0}},
        )
        if before is not None:
            revived.append(before)
    return revived


def count_selected_uncalculated(database: Database, campaign_id: str) -> int:
    """Selected frames whose reference calculation has not been stored yet."""
    selected = database[FRAME_POOL].count_documents(
        {"campaign_id": campaign_id, "status": SELECTED}
    )
    return selected - count_results(database, campaign_id, source="active")


def set_trajectory_status(database: Database, trajectory_id: str, status: str) -> None:
    database[TRAJECTORIES].update_one({"_id": trajectory_id}, {"$set": {"status": status}})


def pool_frames(database: Database, frames: list[dict]) -> None:
    """Add sampled frames to the pool (``_id`` chosen by the caller, so re-runs add nothing)."""
    for frame in frames:
        database[FRAME_POOL].update_one(
            {"_id": frame["_id"]}, {"$setOnInsert": frame | {"status": POOLED}}, upsert=True
        )


def count_pooled(database: Database, campaign_id: str) -> int:
    return database[FRAME_POOL].count_documents({"campaign_id": campaign_id, "status": POOLED})


def request_selection(database: Database, campaign_id: str, owner: str) -> int | None:
    """Claim the right to queue the next inference-and-selection job; its number, or None.

    At most one such job waits at a time: a single conditional update. The claim
    names its ``owner`` (a job uuid) and time; a re-run of the owner gets the same
    number back, so a crash before the job was handed over loses nothing.
    """
    before = database[CAMPAIGNS].find_one_and_update(
        {"_id": campaign_id, "status": RUNNING, "selection.pending": False},
        {
            "$set": {
                "selection.pending": True,
                "selection.owner": owner,
                "selection.claimed_at": now(),
            },
            "$inc": {"selection.count": 1},
        },
        projection={"selection": 1},
    )
    if before is not None:
        return before["selection"]["count"]
    query = {"_id": campaign_id, "selection.pending": True, "selection.owner": owner}
    held = database[CAMPAIGNS].find_one(query, {"selection": 1})
    return None if held is None else held["selection"]["count"] - 1


def release_selection(database: Database, campaign_id: str, number: int) -> bool:
    """End the pending claim of selection ``number`` (no other); True if it was pending."""
    before = database[CAMPAIGNS].find_one_and_update(
        {"_id": campaign_id, "selection.pending": True, "selection.count": number + 1},
        {"$set": {"selection.pending": False}},
        projection={"_id": 1},
    )
    return before is not None


def claim_pooled_frames(database: Database, campaign_id: str, selection_id: str) -> list[dict]:
    """Claim every pooled frame for one selection (each frame is claimed by one selection only)."""
    database[FRAME_POOL].update_many(
        {"campaign_id": campaign_id, "status": POOLED},
        {"$set": {"status": CLAIMED, "selection_id": selection_id, "claimed_at": now()}},
    )
    return list(database[FRAME_POOL].find({"selection_id": selection_id}).sort("_id", 1))


def store_selection(
    database: Database,
    document: dict,
    uncertainties: dict[str, float],
    predictions: dict[str, dict],
) -> bool:
    """Record a selection and mark its frames selected or discarded; False if done before.

    Each frame's committee ``uncertainty`` goes onto its own frame document, and each
    selected frame's ``prediction`` (the committee's mean energy and forces, for its
    calibration record once computed), so the selection document holds only the
    frames picked (at most the budget): it stays small however many were scored.
    """
    try:
        database[SELECTIONS].insert_one(document | {"stored_at": now()})
    except pymongo.errors.DuplicateKeyError:
        return False
    # one update per frame: the embedded store (mongomock) cannot bulk_write with pymongo 4
    for frame_id, uncertainty in uncertainties.items():
        values = {"uncertainty": uncertainty}
        if frame_id in predictions:
            values["prediction"] = predictions[frame_id]
        database[FRAME_POOL].update_one({"_id": frame_id}, {"$set": values})
    selected = document["selected"]
    database[FRAME_POOL].update_many({"_id": {"$in": selected}}, {"$set": {"status": SELECTED}})
    database[FRAME_POOL].update_many(
        {"selection_id": document["_id"], "_id": {"$nin": selected}},
        {"$set": {"status": DISCARDED}},
    )
    return True


def get_selection(database: Database, selection_id: str) -> dict | None:
    return database[SELECTIONS].find_one({"_id": selection_id})


def get_frames(database: Database, frame_ids: list[str]) -> list[dict]:
    frames = {doc["_id"]: doc for doc in database[FRAME_POOL].find({"_id": {"$in": frame_ids}})}
    return [frames[frame_id] for frame_id in frame_ids]


def existing_job_names(database: Database, names: list[str]) -> set[str]:
    """Which of these job (Firework) names the LaunchPad holds already, in any state."""
    found = database[FIREWORKS].find({"name": {"$in": names}}, {"name": 1})
    return {firework["name"] for firework in found}


def workflow_size(database: Database, job_name: str, job_uuid: str) -> int:
    """How many jobs the FireWorks workflow holding this jobflow job has (0: none)."""
    query = {"name": job_name, "spec._tasks.0.job.uuid": job_uuid}  # the name is indexed
    firework = database[FIREWORKS].find_one(query, {"fw_id": 1})
    if firework is None:
        return 0
    workflow = database[WORKFLOWS].find_one({"nodes": firework["fw_id"]}, {"nodes": 1})
    return 0 if workflow is None else len(workflow["nodes"])


def campaign_jobs_filter(campaign_id: str) -> dict:
    """Query for the campaign's Fireworks: every fff job is named ``<campaign id> <stage> ...``."""
    return {"name": {"$regex": f"^{re.escape(campaign_id)} "}}


def campaign_jobs(database: Database, campaign_id: str, states: tuple[str, ...]) -> list[dict]:
    """The campaign's Fireworks in these states: name, state, and the uuid of their job."""
    query = campaign_jobs_filter(campaign_id) | {"state": {"$in": list(states)}}
    projection = {"name": 1, "state": 1, "fw_id": 1, "spec._tasks.job.uuid": 1}
    return [
        {
            "name": firework["name"],
            "state": firework["state"],
            "fw_id": firework["fw_id"],
            "uuid": firework["spec"]["_tasks"][0]["job"]["uuid"],
        }
        for firework in database[FIREWORKS].find(query, projection)
    ]


def job_counts(fireworks, query: dict) -> dict[str, dict[str, int]]:
    """Worker category -> Firework state -> how many Fireworks (a LaunchPad's ``fireworks``
    collection) match ``query``.

    Counted here rather than by a ``$group`` on a compound ``_id``, which the jongodb
    test server does not evaluate (it groups on the literal).
    """
    counts: dict[str, dict[str, int]] = {}
    for firework in fireworks.find(query, {"spec._category": 1, "state": 1}):
        category = (firework.get("spec") or {}).get("_category") or "(any worker)"
        states = counts.setdefault(category, {})
        states[firework["state"]] = states.get(firework["state"], 0) + 1
    return counts


def release_dead_selection(database: Database, campaign_id: str, alive: set[str]) -> int | None:
    """Release a pending selection whose owner and job are gone for good; its number, or None.

    Its frames go back to the pool. ``alive`` holds the uuids and names of the
    campaign's jobs that may still run.
    """
    selection = get_campaign(database, campaign_id)["selection"]
    number = selection["count"] - 1
    if not selection["pending"] or selection.get("owner") in alive:
        return None
    if f"{campaign_id} select {number}" in alive or get_selection(
        database, selection_id(campaign_id, number)
    ):
        return None
    if not release_selection(database, campaign_id, number):
        return None
    database[FRAME_POOL].update_many(
        {"selection_id": selection_id(campaign_id, number), "status": CLAIMED},
        {"$set": {"status": POOLED}, "$unset": {"selection_id": "", "claimed_at": ""}},
    )
    return number


def selection_id(campaign_id: str, number: int) -> str:
    return f"{campaign_id}-sel{number:04d}"
