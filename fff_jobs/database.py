"""The project's own MongoDB collections: every collection, index, read and atomic update fff adds.

Documents are the models of :mod:`fff_jobs.schemas`: written with ``document()``,
read back validated. Nothing else in fff_jobs touches these collections.

- ``campaigns``: the spec validated at submit, the budget counter and the steering state
  (training round, selection, generations), changed only by conditional updates;
- ``reference_results``, ``budget_claims``, ``training_snapshots``: reference calculations,
  the budget slot each spent, and what each generation trained on;
- ``starting_structures``, ``initial_data``, ``trajectories``, ``frame_pool``, ``selections``;
- the model registry: ``models`` (one document per member), the GridFS bucket
  ``model_weights`` (weights as bytes, never a pickled module: the GPU side turns them
  into tensors, see :mod:`fff_jobs.committee`) and ``model_registry`` (each campaign's
  current generation, advanced once every member of a generation is registered).

Workers cache downloaded weights on local disk by content hash. A campaign's counts
(:class:`CampaignCounts`) are queried only when the steering asks for them.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import bson
import gridfs
import pymongo
from gridfs.grid_file_shared import DEFAULT_CHUNK_SIZE
from pymongo.database import Database

from fff_jobs import steering
from fff_jobs.calibration import CalibrationRecord
from fff_jobs.schemas import (
    CLAIMED,
    COMPLETE,
    DISCARDED,
    NO_GENERATION,
    POOLED,
    RETIRED,
    RUNNING,
    SAMPLING,
    SELECTED,
    STOPPED,
    BudgetClaim,
    Campaign,
    GenerationRecord,
    LastSegment,
    ModelRecord,
    NewCampaign,
    PooledFrame,
    RegistryRecord,
    SegmentRecord,
    Selection,
    StartingStructure,
    StoredResult,
    TrainingSnapshot,
    Trajectory,
    now,
)

MODELS = "models"
MODEL_WEIGHTS_BUCKET = "model_weights"
MODEL_REGISTRY = "model_registry"
CAMPAIGNS = "campaigns"
REFERENCE_RESULTS = "reference_results"
STARTING_STRUCTURES = "starting_structures"
INITIAL_DATA = "initial_data"
TRAJECTORIES = "trajectories"
FRAME_POOL = "frame_pool"
SELECTIONS = "selections"
BUDGET_CLAIMS = "budget_claims"
TRAINING_SNAPSHOTS = "training_snapshots"
# FireWorks' own collections, read here only to find a campaign's jobs and workflows
FIREWORKS = "fireworks"
WORKFLOWS = "workflows"
ALIVE_STATES = ("WAITING", "READY", "RESERVED", "RUNNING")
CACHE_ENVIRONMENT_VARIABLE = "FFF_MODEL_CACHE"


class RegistryError(RuntimeError):
    """The model registry cannot give what was asked: a model or its weights are missing or
    damaged."""


class CampaignNotFoundError(LookupError):
    """No campaign with that id in the database."""


def ensure_indexes(database: Database) -> None:
    """Create the indexes of fff's collections (idempotent; at submit)."""
    database[MODELS].create_index(
        [("campaign_id", 1), ("generation", 1), ("member", 1)], unique=True, name="member_unique"
    )
    database[REFERENCE_RESULTS].create_index([("campaign_id", 1), ("sequence", 1)])
    database[REFERENCE_RESULTS].create_index([("campaign_id", 1), ("source", 1)])
    database[REFERENCE_RESULTS].create_index([("trajectory_id", 1), ("segment", 1)])
    database[FRAME_POOL].create_index([("campaign_id", 1), ("status", 1)])
    database[FRAME_POOL].create_index([("selection_id", 1)])
    database[TRAJECTORIES].create_index([("campaign_id", 1), ("index", 1)], unique=True)
    database[STARTING_STRUCTURES].create_index([("campaign_id", 1), ("index", 1)], unique=True)
    database[INITIAL_DATA].create_index([("campaign_id", 1), ("index", 1)], unique=True)
    database[BUDGET_CLAIMS].create_index([("campaign_id", 1), ("result_id", 1)], unique=True)
    # GridFS's own indexes (_put_weights writes the bucket without pymongo's per-file checks)
    bucket = database[MODEL_WEIGHTS_BUCKET]
    bucket.chunks.create_index([("files_id", 1), ("n", 1)], unique=True)
    bucket.files.create_index([("filename", 1), ("uploadDate", 1)])


def _insert_new(collection, documents: list[dict]) -> int:
    """Insert documents whose ``_id`` may exist already (a re-run); how many were new."""
    if not documents:
        return 0
    try:
        return len(collection.insert_many(documents, ordered=False).inserted_ids)
    except pymongo.errors.BulkWriteError as error:
        duplicates = [e for e in error.details["writeErrors"] if e["code"] == 11000]
        if len(duplicates) < len(error.details["writeErrors"]):
            raise
        return error.details["nInserted"]


def _update_each(collection, updates: list[tuple[dict, dict]]) -> None:
    """Apply one update per document in one round trip (the embedded store: one by one)."""
    if not updates:
        return
    if type(collection).__module__.startswith("mongomock"):  # no bulk_write with pymongo 4
        for query, update in updates:
            collection.update_one(query, update)
        return
    collection.bulk_write([pymongo.UpdateOne(q, u) for q, u in updates], ordered=False)


# --- the model registry ---


def model_id(campaign_id: str, generation: int, member: int) -> str:
    """The registry id of one committee member."""
    return f"{campaign_id}-g{generation:03d}-m{member:02d}"


def weights_bucket(database: Database) -> gridfs.GridFS:
    """The GridFS collection of model weights.

    The classic ``GridFS`` API rather than ``GridFSBucket``: FireWorks' embedded
    store (mongomock) supports only the former.
    """
    return gridfs.GridFS(database, collection=MODEL_WEIGHTS_BUCKET)


def _put_weights(database: Database, content: bytes, filename: str, sha256: str):
    """Store weights as one GridFS file (readable by ``gridfs``): its chunks, then its file
    document, in two round trips; pymongo's own writer checks the bucket's indexes first,
    two more for every file. The indexes are made with the campaign's."""
    files_id = bson.ObjectId()
    bucket = database[MODEL_WEIGHTS_BUCKET]
    chunks = [
        {
            "files_id": files_id,
            "n": n,
            "data": bson.Binary(content[start : start + DEFAULT_CHUNK_SIZE]),
        }
        for n, start in enumerate(range(0, len(content), DEFAULT_CHUNK_SIZE))
    ]
    if chunks:
        bucket.chunks.insert_many(chunks)
    bucket.files.insert_one(
        {
            "_id": files_id,
            "filename": filename,
            "metadata": {"sha256": sha256},
            "chunkSize": DEFAULT_CHUNK_SIZE,
            "length": bson.Int64(len(content)),
            "uploadDate": now(),
        }
    )
    return files_id


def find_members(database: Database, ids: list[str]) -> dict[str, ModelRecord]:
    """Registry documents of these members (those registered), by id: one query."""
    found = database[MODELS].find({"_id": {"$in": ids}})
    return {document["_id"]: ModelRecord.model_validate(document) for document in found}


def find_member(database: Database, campaign_id: str, generation: int, member: int):
    """The registry document of one member, or None."""
    key = model_id(campaign_id, generation, member)
    return find_members(database, [key]).get(key)


def register_member(
    database: Database, record: ModelRecord, content: bytes
) -> tuple[ModelRecord, bool]:
    """Store a member's weights (``content``) in GridFS and its ``record`` in the registry.

    Returns (document, created): a member registered before is returned as it is
    (created False) and nothing new is stored, so re-runs are safe. The generation
    becomes current once :func:`publish_generation` finds all its members.
    """
    key = model_id(record.campaign_id, record.generation, record.member)
    sha256 = hashlib.sha256(content).hexdigest()
    bucket = weights_bucket(database)
    weights_id = _put_weights(database, content, f"{key}.pt", sha256)
    update = {"weights_id": weights_id, "weights_sha256": sha256, "weights_bytes": len(content)}
    document = record.model_copy(update={"id": key, **update, "registered_at": now()})
    try:
        database[MODELS].insert_one(document.document())
    except BaseException as error:
        bucket.delete(weights_id)
        if isinstance(error, pymongo.errors.DuplicateKeyError):
            return ModelRecord.model_validate(database[MODELS].find_one({"_id": key})), False
        raise
    _cache(content, sha256)
    return document, True


def publish_generation(database: Database, campaign_id: str, generation: int) -> list[ModelRecord]:
    """Make ``generation`` current if all its members are registered and it is newer.

    One conditional update: of two workers finishing the last members at once, both
    may call this and the result is the same. Returns the committee (by member) if this
    call advanced the current generation, else nothing.
    """
    found = database[MODELS].find({"campaign_id": campaign_id, "generation": generation})
    members = sorted((ModelRecord.model_validate(doc) for doc in found), key=lambda m: m.member)
    if not members or len(members) < members[0].committee_size:
        return []
    registry = database[MODEL_REGISTRY]
    update = {
        "current_generation": generation,
        "members": [member.id for member in members],
        "published_at": now(),
    }
    try:
        registry.update_one(
            {"_id": campaign_id, "current_generation": {"$lt": generation}},
            {"$set": update},
            upsert=True,
        )
    except pymongo.errors.DuplicateKeyError:  # this or a newer generation is current already
        return []
    return members


def current_generation(database: Database, campaign_id: str) -> int | None:
    """The campaign's newest complete generation, or None before the first one."""
    document = database[MODEL_REGISTRY].find_one({"_id": campaign_id})
    if document is None:
        return None
    generation = RegistryRecord.model_validate(document).current_generation
    return None if generation == NO_GENERATION else generation


def committee_documents(
    database: Database, campaign_id: str, generation: int | None = None, healthy: bool = False
) -> list[ModelRecord]:
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
    found = database[MODELS].find({"campaign_id": campaign_id, "generation": generation})
    documents = sorted(
        (ModelRecord.model_validate(document) for document in found), key=lambda d: d.member
    )
    if not documents:
        raise RegistryError(
            f"campaign {campaign_id!r} has no models of generation {generation} in the registry"
        )
    if healthy:
        documents = [document for document in documents if not document.diverged]
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


def _cache(content: bytes, sha256: str, cache_directory: Path | None = None) -> None:
    """Keep weights in the local cache (written whole, then renamed: readers never see a part)."""
    cached = (cache_directory or model_cache_directory()) / f"{sha256}.pt"
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.partial")
    partial.write_bytes(content)
    partial.replace(cached)


def _download(database: Database, document: ModelRecord) -> bytes:
    try:
        return weights_bucket(database).get(document.weights_id).read()
    except gridfs.errors.NoFile:
        raise RegistryError(
            f"model {document.id}: its weights ({document.weights_id}) are missing from "
            f"the GridFS bucket {MODEL_WEIGHTS_BUCKET!r}; delete this registry document and "
            f"retrain the member"
        ) from None


def load_weights(
    database: Database, document: ModelRecord, cache_directory: Path | None = None
) -> bytes:
    """The weights of a registered member as bytes, from the local cache or downloaded into it.

    The content is checked against the registered sha256; a mismatch is an error
    that names the model (a damaged cache file is downloaded again).
    """
    sha256 = document.weights_sha256
    cached = (cache_directory or model_cache_directory()) / f"{sha256}.pt"
    if cached.is_file():
        content = cached.read_bytes()
        if hashlib.sha256(content).hexdigest() == sha256:
            return content
    content = _download(database, document)
    if hashlib.sha256(content).hexdigest() != sha256:
        raise RegistryError(
            f"model {document.id}: the weights in GridFS do not match the registered sha256 "
            f"{sha256}; they were changed or damaged: delete this registry document and "
            f"retrain the member"
        )
    _cache(content, sha256, cache_directory)
    return content


# --- campaigns ---


def create_campaign(database: Database, new: NewCampaign) -> bool:
    """Store a new campaign: its document and the structures it starts from.

    Idempotent: a campaign stored before is left as it is (False). The first job of a
    workflow file calls this too, with the campaign it carries.
    """
    if campaign_exists(database, new.campaign_id):
        return False
    ensure_indexes(database)
    for collection, frames in (
        (STARTING_STRUCTURES, new.starting_structures),
        (INITIAL_DATA, new.initial_data),
    ):
        documents = [
            StartingStructure(
                id=f"{new.campaign_id}-{collection}-{index:05d}",
                campaign_id=new.campaign_id,
                index=index,
                frame=frame,
            ).document()
            for index, frame in enumerate(frames)
        ]
        _insert_new(database[collection], documents)
    campaign = Campaign(
        id=new.campaign_id,
        name=new.spec.name,
        spec=new.spec,
        budget={"num_to_run": new.spec.num_to_run},
    )
    result = database[CAMPAIGNS].update_one(
        {"_id": new.campaign_id}, {"$setOnInsert": campaign.document()}, upsert=True
    )
    return result.upserted_id is not None


def campaign_exists(database: Database, campaign_id: str) -> bool:
    return database[CAMPAIGNS].count_documents({"_id": campaign_id}, limit=1) > 0


def get_campaign(database: Database, campaign_id: str) -> Campaign:
    """The campaign, or an error that says how to find the right id."""
    document = database[CAMPAIGNS].find_one({"_id": campaign_id})
    if document is None:
        raise CampaignNotFoundError(
            f"no campaign {campaign_id!r} in this database: `fff status` lists the campaigns"
        )
    return Campaign.model_validate(document)


def list_campaigns(database: Database) -> list[Campaign]:
    """Every campaign, newest first."""
    found = database[CAMPAIGNS].find({}).sort("created_at", -1)
    return [Campaign.model_validate(document) for document in found]


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
        {"campaign_id": campaign_id, "status": SAMPLING}, {"$set": {"status": STOPPED}}
    )
    return result.modified_count


def starting_structures(database: Database, campaign_id: str) -> list[StartingStructure]:
    """The campaign's search space: trajectories start (and restart) from these."""
    return _structures(database[STARTING_STRUCTURES], campaign_id)


def initial_data(database: Database, campaign_id: str) -> list[StartingStructure]:
    """The frames the user gave for generation 0 (none for generated water clusters)."""
    return _structures(database[INITIAL_DATA], campaign_id)


def _structures(collection, campaign_id: str) -> list[StartingStructure]:
    found = collection.find({"campaign_id": campaign_id}).sort("index", 1)
    return [StartingStructure.model_validate(document) for document in found]


class CampaignCounts(Mapping[str, int]):
    """A campaign's counts (:mod:`fff_jobs.steering` names them), each queried on first use."""

    def __init__(self, database: Database, campaign_id: str) -> None:
        self.database, self.campaign_id = database, campaign_id
        self._values: dict[str, int] = {}
        self._successful: list[str] | None = None

    def successful_ids(self) -> list[str]:
        """Ids of the successful results, in the order stored (queried once): a round's
        snapshot, and their number is the count of successful results."""
        if self._successful is None:
            query = {"campaign_id": self.campaign_id, "success": True}
            found = self.database[REFERENCE_RESULTS].find(query, {"_id": 1}).sort("sequence", 1)
            self._successful = [document["_id"] for document in found]
        return self._successful

    def _count(self, collection: str, **conditions) -> int:
        query = {"campaign_id": self.campaign_id, **conditions}
        return self.database[collection].count_documents(query)

    def _query(self, name: str) -> int:
        if name == steering.SUCCESSFUL:
            return len(self.successful_ids())
        if name == steering.BUDGETED:
            return self._count(REFERENCE_RESULTS, source={"$ne": "initial"})
        if name == steering.POOLED_FRAMES:
            return self._count(FRAME_POOL, status=POOLED)
        if name == steering.SAMPLING_TRAJECTORIES:
            return self._count(TRAJECTORIES, status=SAMPLING)
        if name == steering.REVIVABLE:
            return self._count(TRAJECTORIES, status={"$in": [SAMPLING, RETIRED]})
        if name == steering.UNCALCULATED:
            selected = self._count(FRAME_POOL, status=SELECTED)
            return selected - self._count(REFERENCE_RESULTS, source="active")
        raise KeyError(name)

    def __getitem__(self, name: str) -> int:
        if name not in self._values:
            self._values[name] = self._query(name)
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


# --- the budget: one claim per reference calculation ---


def claim_budget(
    database: Database, campaign: Campaign, result_ids: list[str], owner: str
) -> dict[str, int | None]:
    """Spend one reference calculation on each result id; the ids granted, each with the
    ``sequence`` its result is stored under (None: an earlier run of the job claimed it).

    Each claim is one document of ``budget_claims`` in a numbered slot,
    ``_id`` ``<campaign>-budget<slot>`` with slot < num_to_run: inserting it is the
    claim, one atomic operation, and the unique ``_id`` lets two workers never take
    the same slot, so the budget is never overspent. A re-run of the same calculation
    finds its claim (unique on campaign and result) and may go on. Ids left out of the
    answer found no budget.

    Then one update raises the campaign's ``budget.spent`` counter (monotone) and
    numbers the new results (``sequence``); ``campaign.budget`` follows it here.
    A crash between the claim and the counter leaves the counter behind: the next
    claim, or `fff recover` (:func:`recount_budget`), brings it level.
    """
    if not campaign.running:
        return {}
    slots, held = _claim_slots(database, campaign, result_ids, owner)
    next_slot = max(slots.values(), default=-1) + 1
    granted: dict[str, int | None] = dict.fromkeys(held)
    if slots:
        first = _count_spent(database, campaign, next_slot, len(slots))
        granted |= {result_id: first + index for index, result_id in enumerate(slots)}
    return granted


def _count_spent(database: Database, campaign: Campaign, spent: int, results: int) -> int:
    """Raise the budget counter to ``spent`` (never lower it: claims only grow) and number
    ``results`` results to come; the first number. One update, two when another worker
    raised the counter further meanwhile (the test server has no ``$max``)."""
    increment = {"$inc": {"sequence": results}}
    options = {"projection": {"sequence": 1, "budget": 1}}
    after = database[CAMPAIGNS].find_one_and_update(
        {"_id": campaign.id, "budget.spent": {"$lt": spent}},
        increment | {"$set": {"budget.spent": spent}},
        return_document=pymongo.ReturnDocument.AFTER,
        **options,
    )
    if after is None:
        after = database[CAMPAIGNS].find_one_and_update(
            {"_id": campaign.id}, increment, return_document=pymongo.ReturnDocument.AFTER, **options
        )
    campaign.budget.spent = after["budget"]["spent"]
    return after["sequence"] - results + 1


def _claim_slots(
    database: Database, campaign: Campaign, result_ids: list[str], owner: str
) -> tuple[dict[str, int], list[str]]:
    """Claim the result ids one by one, each in the first free slot after the last:
    (slot of each new claim, ids an earlier run of the job claimed). Slots are never
    skipped: the budget's slots stay 0 .. num_to_run - 1, each held once."""
    taken: dict[str, int] = {}
    held: list[str] = []
    next_slot = campaign.budget.spent
    for result_id in result_ids:
        slot = _claim_slot(database, campaign, result_id, owner, next_slot)
        if slot is None:
            break
        if slot == HELD:
            held.append(result_id)
        else:
            taken[result_id], next_slot = slot, slot + 1
    return taken, held


def _claim(campaign: Campaign, result_id: str, owner: str, slot: int) -> BudgetClaim:
    return BudgetClaim(
        id=f"{campaign.id}-budget{slot:07d}",
        campaign_id=campaign.id,
        slot=slot,
        result_id=result_id,
        owner=owner,
    )


HELD = -1  # _claim_slot: the result was claimed before


def _claim_slot(
    database: Database, campaign: Campaign, result_id: str, owner: str, slot: int
) -> int | None:
    """Insert the claim of ``result_id`` in the first free slot from ``slot``: that slot,
    :data:`HELD` when the result was claimed before (a re-run), None when no slot is left."""
    claims = database[BUDGET_CLAIMS]
    held = {"campaign_id": campaign.id, "result_id": result_id}
    for candidate in range(slot, campaign.budget.num_to_run):
        try:
            claims.insert_one(_claim(campaign, result_id, owner, candidate).document())
            return candidate
        except pymongo.errors.DuplicateKeyError:
            if claims.count_documents(held, limit=1):
                return HELD
    return HELD if claims.count_documents(held, limit=1) else None


def recount_budget(database: Database, campaign_id: str) -> int:
    """Bring the budget counter level with the claims (after a crash); returns the count."""
    spent = database[BUDGET_CLAIMS].count_documents({"campaign_id": campaign_id})
    database[CAMPAIGNS].update_one(
        {"_id": campaign_id, "budget.spent": {"$lt": spent}}, {"$set": {"budget.spent": spent}}
    )
    return spent


def budget_claims(database: Database, campaign_id: str) -> dict[str, str]:
    """Result id -> owner (the claiming job's uuid or name) of each of the campaign's budget
    claims (one per calculation spent)."""
    found = database[BUDGET_CLAIMS].find({"campaign_id": campaign_id}, {"result_id": 1, "owner": 1})
    return {claim["result_id"]: claim["owner"] for claim in found}


def budget_spent(database: Database, campaign_id: str) -> int:
    """The campaign's budget counter, read alone."""
    document = database[CAMPAIGNS].find_one({"_id": campaign_id}, {"budget.spent": 1})
    return document["budget"]["spent"]


def reserve_sequence(database: Database, campaign_id: str, count: int) -> int:
    """Number ``count`` results to be stored (not budgeted ones: the initial data); the first."""
    after = database[CAMPAIGNS].find_one_and_update(
        {"_id": campaign_id},
        {"$inc": {"sequence": count}},
        projection={"sequence": 1},
        return_document=pymongo.ReturnDocument.AFTER,
    )
    return after["sequence"] - count + 1


# --- reference results and training rounds ---


def store_reference_results(database: Database, results: list[StoredResult]) -> int:
    """Insert reference results (``_id`` chosen by the caller); how many were new."""
    stamp = now()
    documents = [result.model_copy(update={"stored_at": stamp}).document() for result in results]
    return _insert_new(database[REFERENCE_RESULTS], documents)


def find_reference_results(database: Database, ids: list[str]) -> dict[str, StoredResult]:
    """The stored results among these ids, by id."""
    found = database[REFERENCE_RESULTS].find({"_id": {"$in": ids}})
    return {document["_id"]: StoredResult.model_validate(document) for document in found}


def count_results(database: Database, campaign_id: str, **conditions) -> int:
    return database[REFERENCE_RESULTS].count_documents({"campaign_id": campaign_id, **conditions})


def claim_training_round(
    database: Database,
    campaign: Campaign,
    required_new: int,
    owner: str,
    counts: CampaignCounts | None = None,
) -> int | None:
    """Start the next training generation if none is running and enough new data arrived.

    The round trains on every successful result stored now (its snapshot, recorded
    once). One conditional update (on the generation and the snapshot's size), so two
    workers never start the same round. Returns the generation to train, or None. The
    claim names its ``owner`` (a job uuid) and time: a re-run of the owner after a crash
    gets its round back, and adds the jobs the dead run never handed over.
    """
    training = campaign.training
    result_ids = (counts or CampaignCounts(database, campaign.id)).successful_ids()
    if training.running and training.owner == owner:
        generation = training.generation
    else:
        generation = training.generation + 1
        changes = {
            "training.running": True,
            "training.generation": generation,
            "training.trained_results": len(result_ids),
            "training.owner": owner,
            "training.claimed_at": now(),
        } | ({"initial_results": len(result_ids)} if generation == 0 else {})
        before = database[CAMPAIGNS].find_one_and_update(
            {
                "_id": campaign.id,
                "status": RUNNING,
                "training.running": False,
                "training.generation": generation - 1,
                "training.trained_results": {"$lte": len(result_ids) - required_new},
            },
            {"$set": changes},
            projection={"_id": 1},
        )
        if before is None:
            return None
        campaign.training = campaign.training.model_copy(
            update={"running": True, "generation": generation, "owner": owner}
        )
    _record_snapshot(database, campaign, generation, result_ids)
    return generation


def _record_snapshot(
    database: Database, campaign: Campaign, generation: int, result_ids: list[str]
) -> None:
    """Record, once, the results a generation trains on (a re-run keeps the first snapshot).

    Every member of the generation reads this one list, so all train on the same
    frames, whatever arrives while they train. A round claimed once the whole budget is
    spent is final: it trains on the last results, so no round after it has more to learn.
    """
    snapshot = TrainingSnapshot(
        id=f"{campaign.id}-g{generation:03d}",
        campaign_id=campaign.id,
        generation=generation,
        result_ids=result_ids,
        final=campaign.budget.left == 0,
    )
    database[TRAINING_SNAPSHOTS].update_one(
        {"_id": snapshot.id}, {"$setOnInsert": snapshot.document()}, upsert=True
    )


def training_snapshot(database: Database, campaign_id: str, generation: int) -> TrainingSnapshot:
    """The snapshot a generation trains on (which results, whether it is final)."""
    snapshot = database[TRAINING_SNAPSHOTS].find_one({"_id": f"{campaign_id}-g{generation:03d}"})
    if snapshot is None:
        raise RegistryError(
            f"campaign {campaign_id!r} has no training snapshot of generation "
            f"{generation}: its training round was never claimed"
        )
    return TrainingSnapshot.model_validate(snapshot)


def training_results(database: Database, snapshot: TrainingSnapshot) -> list[StoredResult]:
    """The reference results of a training snapshot, in the order stored."""
    found = find_reference_results(database, snapshot.result_ids)
    return [found[result_id] for result_id in snapshot.result_ids]


def claim_generation_follow_up(
    database: Database, campaign_id: str, committee: list[ModelRecord], owner: str
) -> Campaign | None:
    """The campaign, for exactly one job once a generation is published (and its re-runs):
    that job ends the round and follows it up; None for every other. From then on the
    campaign samples and selects with ``committee`` (the generation's members)."""
    generation = committee[0].generation
    after = database[CAMPAIGNS].find_one_and_update(
        {"_id": campaign_id, "followed_up_generation": {"$lt": generation}},
        {
            "$set": {
                "followed_up_generation": generation,
                "committee": [member.document() for member in committee],
                "training.running": False,
                "follow_up": {"generation": generation, "owner": owner, "claimed_at": now()},
            },
        },
        return_document=pymongo.ReturnDocument.AFTER,
    )
    if after is None:
        query = {"_id": campaign_id, "follow_up.generation": generation, "follow_up.owner": owner}
        after = database[CAMPAIGNS].find_one(query)
    return None if after is None else Campaign.model_validate(after)


def record_generation(database: Database, campaign_id: str, record: GenerationRecord) -> None:
    """Append one generation's figures (errors, data size, budget spent) to the campaign, once."""
    database[CAMPAIGNS].update_one(
        {"_id": campaign_id, "generations.generation": {"$ne": record.generation}},
        {"$addToSet": {"generations": record.model_dump()}},
    )


# --- trajectories and their segments ---

TRAJECTORY_STATE = {"segments": 0}  # a trajectory without its history of segments


def create_trajectories(database: Database, trajectories: list[Trajectory]) -> None:
    """Insert the campaign's trajectories (those that exist already are left as they are)."""
    _insert_new(database[TRAJECTORIES], [trajectory.document() for trajectory in trajectories])


def get_trajectory(database: Database, trajectory_id: str) -> Trajectory:
    document = database[TRAJECTORIES].find_one({"_id": trajectory_id}, TRAJECTORY_STATE)
    return Trajectory.model_validate(document)


def complete_segment(
    database: Database, trajectory_id: str, segment: int, last: LastSegment
) -> bool:
    """Record a finished segment; True only for the first completion of that segment.

    The trajectory keeps the whole last segment (its audit reads it) and appends its
    summary to ``segments``, the history reports and benchmarks read.
    """
    summary = SegmentRecord.model_validate(last.model_dump()).model_dump()
    result = database[TRAJECTORIES].update_one(
        {"_id": trajectory_id, "segments_completed": segment},
        {
            "$set": {"segments_completed": segment + 1, "last_segment": last.model_dump()},
            "$addToSet": {"segments": summary},
        },
    )
    return result.modified_count == 1


def complete_audit(database: Database, trajectory_id: str, segment: int, changes: dict) -> bool:
    """Apply an audit's decision to its trajectory; True only for the first time.

    One update, conditional on the audit count the caller read the trajectory
    under: only this segment's audit changes it, so ``changes`` may be computed
    from that read and simply set. A stopped trajectory (its campaign finished) stays
    stopped.
    """
    result = database[TRAJECTORIES].update_one(
        {"_id": trajectory_id, "audits_completed": segment, "status": {"$ne": STOPPED}},
        {"$set": {"audits_completed": segment + 1, **changes}},
    )
    return result.modified_count == 1


def set_trajectory_status(database: Database, trajectory_id: str, status: str) -> None:
    database[TRAJECTORIES].update_one({"_id": trajectory_id}, {"$set": {"status": status}})


def mark_idle_trajectories(database: Database, campaign: Campaign) -> None:
    """Note that a trajectory of the campaign retired or stopped (after its own update): until
    the next revival, keep-going counts the sampling ones."""
    if not campaign.idle_trajectories:
        database[CAMPAIGNS].update_one({"_id": campaign.id}, {"$set": {"idle_trajectories": True}})
        campaign.idle_trajectories = True


def revive_trajectories(database: Database, campaign_id: str, generation: int) -> list[Trajectory]:
    """Put retired trajectories back to sampling for ``generation``; those it revived (a re-run
    of the same generation's follow-up finds them again). The campaign's idle mark is
    cleared first: a trajectory that retires meanwhile either is revived here or marks it
    again."""
    database[CAMPAIGNS].update_one({"_id": campaign_id}, {"$set": {"idle_trajectories": False}})
    database[TRAJECTORIES].update_many(
        {"campaign_id": campaign_id, "status": RETIRED},
        {"$set": {"status": SAMPLING, "failures": 0, "revived_generation": generation}},
    )
    query = {"campaign_id": campaign_id, "revived_generation": generation, "status": SAMPLING}
    found = database[TRAJECTORIES].find(query, TRAJECTORY_STATE)
    return [Trajectory.model_validate(document) for document in found]


# --- the frame pool and selections ---


def pool_frames(database: Database, frames: list[PooledFrame]) -> int:
    """Add sampled frames to the pool (``_id`` chosen by the caller, so re-runs add nothing)."""
    stamp = now()
    documents = [frame.model_copy(update={"stored_at": stamp}).document() for frame in frames]
    return _insert_new(database[FRAME_POOL], documents)


def request_selection(database: Database, campaign: Campaign, owner: str) -> int | None:
    """Claim the right to queue the next inference-and-selection job; its number, or None.

    At most one such job waits at a time: a single conditional update. The claim
    names its ``owner`` (a job uuid) and time; a re-run of the owner gets the same
    number back, so a crash before the job was handed over loses nothing.
    """
    before = database[CAMPAIGNS].find_one_and_update(
        {"_id": campaign.id, "status": RUNNING, "selection.pending": False},
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
        number = before["selection"]["count"]
    else:
        query = {"_id": campaign.id, "selection.pending": True, "selection.owner": owner}
        held = database[CAMPAIGNS].find_one(query, {"selection": 1})
        if held is None:
            return None
        number = held["selection"]["count"] - 1
    campaign.selection = campaign.selection.model_copy(update={"pending": True})
    return number


def release_selection(database: Database, campaign_id: str, number: int) -> bool:
    """End the pending claim of selection ``number`` (no other); True if it was pending."""
    before = database[CAMPAIGNS].find_one_and_update(
        {"_id": campaign_id, "selection.pending": True, "selection.count": number + 1},
        {"$set": {"selection.pending": False}},
        projection={"_id": 1},
    )
    return before is not None


def claim_pooled_frames(
    database: Database, campaign_id: str, selection_id: str
) -> list[PooledFrame]:
    """Claim every pooled frame for one selection (each frame is claimed by one selection only)."""
    database[FRAME_POOL].update_many(
        {"campaign_id": campaign_id, "status": POOLED},
        {"$set": {"status": CLAIMED, "selection_id": selection_id, "claimed_at": now()}},
    )
    found = database[FRAME_POOL].find({"selection_id": selection_id}).sort("_id", 1)
    return [PooledFrame.model_validate(document) for document in found]


def store_selection(
    database: Database,
    selection: Selection,
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
        database[SELECTIONS].insert_one(selection.document())
    except pymongo.errors.DuplicateKeyError:
        return False
    picked = set(selection.selected)
    updates = []
    for frame_id, uncertainty in uncertainties.items():
        values = {
            "uncertainty": uncertainty,
            "status": SELECTED if frame_id in picked else DISCARDED,
        }
        if frame_id in predictions:
            values["prediction"] = predictions[frame_id]
        updates.append(({"_id": frame_id}, {"$set": values}))
    _update_each(database[FRAME_POOL], updates)
    return True


def get_selection(database: Database, selection_id: str) -> Selection | None:
    document = database[SELECTIONS].find_one({"_id": selection_id})
    return None if document is None else Selection.model_validate(document)


def get_frames(database: Database, frame_ids: list[str]) -> list[PooledFrame]:
    found = database[FRAME_POOL].find({"_id": {"$in": frame_ids}})
    frames = {document["_id"]: PooledFrame.model_validate(document) for document in found}
    return [frames[frame_id] for frame_id in frame_ids]


def selection_id(campaign_id: str, number: int) -> str:
    return f"{campaign_id}-sel{number:04d}"


def release_dead_selection(database: Database, campaign_id: str, alive: set[str]) -> int | None:
    """Release a pending selection whose owner and job are gone for good; its number, or None.

    Its frames go back to the pool. ``alive`` holds the uuids and names of the
    campaign's jobs that may still run.
    """
    selection = get_campaign(database, campaign_id).selection
    number = selection.count - 1
    if not selection.pending or selection.owner in alive:
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


# --- what reports read ---


def campaign_results(
    database: Database, campaign_id: str, source: str | None = None, successful: bool = False
) -> list[StoredResult]:
    """The campaign's reference results in the order stored, of one source or only the
    successful ones if asked."""
    query = {"campaign_id": campaign_id}
    query |= ({"source": source} if source else {}) | ({"success": True} if successful else {})
    found = database[REFERENCE_RESULTS].find(query).sort("sequence", 1)
    return [StoredResult.model_validate(document) for document in found]


def budgeted_audits(database: Database, campaign_id: str) -> list[tuple[int, StoredResult]]:
    """(reference calculations spent when it was stored, result) of every audit, in order."""
    query = {"campaign_id": campaign_id, "source": {"$ne": "initial"}}
    found = database[REFERENCE_RESULTS].find(query).sort("sequence", 1)
    results = enumerate((StoredResult.model_validate(doc) for doc in found), start=1)
    return [(spent, result) for spent, result in results if result.audit is not None]


def calibration_records(database: Database, campaign_id: str) -> list[CalibrationRecord]:
    """Predicted uncertainty beside actual error of every computed frame that had a prediction."""
    query = {"campaign_id": campaign_id, "calibration": {"$exists": True, "$ne": None}}
    found = database[REFERENCE_RESULTS].find(query, {"calibration": 1}).sort("sequence", 1)
    return [CalibrationRecord.model_validate(document["calibration"]) for document in found]


def failed_calculations(database: Database, campaign_id: str, last: int) -> list[tuple[str, str]]:
    """(result id, reason) of the newest failed reference calculations."""
    query = {"campaign_id": campaign_id, "success": False}
    found = database[REFERENCE_RESULTS].find(query, {"reason": 1}).sort("sequence", -1)
    return [(document["_id"], document["reason"]) for document in found.limit(last)]


def trajectory_states(database: Database, campaign_id: str) -> list[tuple[str, str, str | None]]:
    """(trajectory id, status, reason of its last audit) of every trajectory."""
    found = database[TRAJECTORIES].find(
        {"campaign_id": campaign_id}, {"status": 1, "last_audit.reason": 1}
    )
    return [
        (doc["_id"], doc["status"], (doc.get("last_audit") or {}).get("reason")) for doc in found
    ]


class TrajectoryProgress(NamedTuple):
    """How far a trajectory got: the segments it ran and the audits applied to it."""

    id: str
    segments_completed: int
    audits_completed: int


def sampling_trajectories(database: Database, campaign_id: str) -> list[TrajectoryProgress]:
    """How far each of the campaign's sampling trajectories got."""
    query = {"campaign_id": campaign_id, "status": SAMPLING}
    fields = {"segments_completed": 1, "audits_completed": 1}
    return [
        TrajectoryProgress(doc["_id"], doc["segments_completed"], doc["audits_completed"])
        for doc in database[TRAJECTORIES].find(query, fields)
    ]


def budgeted_results(database: Database, campaign_id: str) -> dict[str, object]:
    """Result id -> what it computed, for every result that spent budget: (trajectory id,
    segment) of an audit, the frame id of a selected frame."""
    query = {"campaign_id": campaign_id, "source": {"$ne": "initial"}}
    fields = {"source": 1, "trajectory_id": 1, "segment": 1, "frame_id": 1}
    return {
        doc["_id"]: (
            (doc["trajectory_id"], doc["segment"])
            if doc["source"] == "audit"
            else doc.get("frame_id")
        )
        for doc in database[REFERENCE_RESULTS].find(query, fields)
    }


def diverged_members(database: Database, campaign_id: str, last: int) -> list[tuple[str, str]]:
    """(model id, why) of members whose training diverged."""
    query = {"campaign_id": campaign_id, "diverged": {"$nin": [None, False]}}
    found = database[MODELS].find(query, {"diverged": 1}).limit(last)
    return [(document["_id"], document["diverged"]) for document in found]


def segment_records(database: Database, campaign_id: str) -> list[SegmentRecord]:
    """Every finished segment of the campaign's trajectories."""
    found = database[TRAJECTORIES].find({"campaign_id": campaign_id}, {"segments": 1})
    return [SegmentRecord.model_validate(s) for doc in found for s in doc.get("segments", [])]


# --- FireWorks: the campaign's jobs and workflows ---


def campaign_jobs_filter(campaign_id: str) -> dict:
    """Query for the campaign's Fireworks: every fff job is named ``<campaign id> <stage> ...``."""
    return {"name": {"$regex": f"^{re.escape(campaign_id)} "}}


def existing_job_names(database: Database, names: list[str]) -> set[str]:
    """Which of these job (Firework) names the LaunchPad holds already, in any state."""
    found = database[FIREWORKS].find({"name": {"$in": names}}, {"name": 1})
    return {firework["name"] for firework in found}


def workflow_size(database: Database, fw_id: int) -> int:
    """How many jobs the FireWorks workflow holding Firework ``fw_id`` has (0: none)."""
    workflow = database[WORKFLOWS].find_one({"nodes": fw_id}, {"nodes": 1})
    return 0 if workflow is None else len(workflow["nodes"])


def firework_id(database: Database, job_name: str, job_uuid: str) -> int | None:
    """The Firework of a jobflow job (by its name, which is indexed, and uuid), or None."""
    query = {"name": job_name, "spec._tasks.0.job.uuid": job_uuid}
    firework = database[FIREWORKS].find_one(query, {"fw_id": 1})
    return None if firework is None else firework["fw_id"]


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


def job_states(database: Database, campaign_id: str) -> dict[str, dict[str, int]]:
    """Worker category -> Firework state -> count, for this campaign's jobs."""
    return job_counts(database[FIREWORKS], campaign_jobs_filter(campaign_id))


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
