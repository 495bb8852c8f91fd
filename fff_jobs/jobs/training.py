"""jobflow jobs of the committee: train and register one member; score frames with a committee.

Thin wrappers over :mod:`fff_jobs.training`, :mod:`fff_jobs.committee` and the
registry in :mod:`fff_jobs.database`. Both jobs run on GPU workers. Frames travel
as :class:`fff_jobs.structures.LabelledFrame` documents; large outputs go to
the job store's ``data`` store. mace is imported inside the jobs: it costs seconds,
and the CLI and campaign steering import this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ase import Atoms
from jobflow import Job, Maker, job
from pymongo.database import Database

from fff_jobs import config
from fff_jobs import database as registry
from fff_jobs.routing import GPU, route
from fff_jobs.spec import ModelSettings, TrainingSettings
from fff_jobs.structures import LabelledFrame

INFERENCE_DATA = ["energies", "forces", "descriptors"]


def _summary(document: dict, created: bool) -> dict:
    """What a train job outputs: the registry entry's id and figures, never the weights."""
    keys = ("campaign_id", "generation", "member", "seed", "metrics", "weights_sha256")
    return {"model_id": document["_id"], "created": created} | {key: document[key] for key in keys}


@dataclass
class TrainMemberMaker(Maker):
    """Train member ``member`` of a generation on a training set and register it.

    ``model`` and ``training`` take :class:`~fff_jobs.spec.ModelSettings` and
    :class:`~fff_jobs.spec.TrainingSettings` (or their dicts); they are kept as dicts.
    """

    name: str = "train committee member"
    model: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Validate the settings; keep them as plain dicts, which FireWorks can store."""
        self.model = ModelSettings.model_validate(self.model).model_dump()
        self.training = TrainingSettings.model_validate(self.training).model_dump()

    @property
    def model_settings(self) -> ModelSettings:
        """The model section of the settings."""
        return ModelSettings(**self.model)

    @property
    def training_settings(self) -> TrainingSettings:
        """The training section of the settings."""
        return TrainingSettings(**self.training)

    def make(self, campaign_id: str, generation: int, member: int, frames: Sequence[Atoms]) -> Job:
        """A GPU job; ``frames`` are labelled Atoms (reference energy and forces)."""
        records = [LabelledFrame.from_atoms(atoms).model_dump() for atoms in frames]
        train_job = self.train(campaign_id, generation, member, records)
        train_job.name = f"{self.name} {registry.model_id(campaign_id, generation, member)}"
        return route(train_job, GPU)

    @job
    def train(self, campaign_id: str, generation: int, member: int, records: list[dict]) -> dict:
        """Train and register the member; a member registered before is returned unchanged."""
        from fff_jobs.training import member_seed

        database = config.project_database()
        existing = registry.find_member(database, campaign_id, generation, member)
        if existing is not None:
            return _summary(existing, created=False)
        frames = [LabelledFrame.model_validate(record).to_atoms() for record in records]
        parent = self._parent(database, campaign_id, generation, member)
        seed = member_seed(self.training_settings.seed, generation, member)
        record = self._train(frames, seed, parent) | {
            "campaign_id": campaign_id,
            "generation": generation,
            "member": member,
            "committee_size": self.training_settings.committee_size,
        }
        state_dict = record.pop("state_dict")
        document, created = registry.register_member(database, record, state_dict)
        return _summary(document, created)

    def _parent(
        self, database: Database, campaign_id: str, generation: int, member: int
    ) -> tuple | None:
        """The matching member of the previous generation and its weights, for a warm start."""
        if not self.training_settings.warm_start or generation == 0:
            return None
        document = registry.find_member(database, campaign_id, generation - 1, member)
        if document is None:
            return None
        return document, registry.load_weights(database, document)

    def _train(self, frames: list[Atoms], seed: int, parent: tuple | None) -> dict:
        """Train (warm-started from ``parent``); the registry record and the state dict."""
        from fff_jobs.training import package_versions, train_member, training_set_hash

        weights = (parent[0]["hyperparameters"], parent[1]) if parent else None
        settings = self.training_settings
        trained = train_member(frames, self.model_settings, settings, seed, parent=weights)
        return {
            "seed": seed,
            "training_set_hash": training_set_hash(frames),
            "training_set_size": len(frames),
            "warm_started": trained.warm_started,
            "parent_model": parent[0]["_id"] if trained.warm_started else None,
            "split": settings.split,
            "metrics": trained.metrics,
            "epochs": trained.epochs,
            "best_epoch": trained.best_epoch,
            "history": trained.history,
            "wall_time": trained.wall_time,
            "device": trained.device,
            "versions": package_versions(),
            "hyperparameters": trained.hyperparameters,
            "state_dict": trained.model.state_dict(),
        }


@dataclass
class CommitteeInferenceMaker(Maker):
    """Score frames with a committee from the registry (default: the current generation)."""

    name: str = "committee inference"
    compute_forces: bool = False
    descriptors: bool = True
    batch_size: int | None = None  # structures per batch; default: 8 on a CPU, 64 on a GPU

    def make(self, campaign_id: str, frames: Sequence[Atoms], generation: int | None = None) -> Job:
        """A GPU job; the committee is looked up when it starts, not when it is submitted."""
        records = [LabelledFrame.from_atoms(atoms).model_dump() for atoms in frames]
        inference_job = self.predict(campaign_id, records, generation)
        inference_job.name = f"{self.name} {campaign_id}"
        return route(inference_job, GPU)

    @job(data=INFERENCE_DATA)
    def predict(self, campaign_id: str, records: list[dict], generation: int | None) -> dict:
        """Every member's energies, the committee mean and spread of energy per atom."""
        from fff_jobs.committee import load_committee, predict_committee

        documents, models = load_committee(config.project_database(), campaign_id, generation)
        frames = [LabelledFrame.model_validate(record).to_atoms() for record in records]
        prediction = predict_committee(
            models, frames, self.compute_forces, self.descriptors, self.batch_size
        )
        forces = prediction.forces
        descriptors = prediction.descriptors
        return {
            "campaign_id": campaign_id,
            "generation": documents[0]["generation"],
            "models": [document["_id"] for document in documents],
            "energy_per_atom_mean": prediction.energy_per_atom_mean.tolist(),
            "energy_per_atom_std": prediction.energy_per_atom_std.tolist(),
            "energies": prediction.energies.tolist(),
            "forces": [array.tolist() for array in forces] if forces is not None else None,
            "descriptors": descriptors.tolist() if descriptors is not None else None,
        }
