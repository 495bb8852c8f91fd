"""The model registry in MongoDB: members in GridFS, whole committees published atomically."""

from __future__ import annotations

import hashlib

import numpy as np
import pymongo
import pytest
from mace.calculators import MACECalculator
from test_training import TINY_MODEL, TINY_TRAINING, labelled_frames
from typer.testing import CliRunner

from fff_jobs import config
from fff_jobs import database as registry
from fff_jobs.committee import (
    export_model_files,
    load_committee,
    load_weights,
    predict_committee,
    register_member,
)
from fff_jobs.schemas import ModelRecord
from fff_jobs.training import train_member

CAMPAIGN = "water"
SETTINGS = TINY_TRAINING.model_copy(update={"max_epochs": 2})


@pytest.fixture(scope="module")
def members():
    """Two tiny trained members (one committee of size 2)."""
    frames = labelled_frames(12)
    return [train_member(frames, TINY_MODEL, SETTINGS, seed=seed) for seed in range(2)]


@pytest.fixture(autouse=True)
def cache_directory(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv(registry.CACHE_ENVIRONMENT_VARIABLE, str(directory))
    return directory


def register(database, trained, member: int, generation: int = 0, size: int = 2):
    record = ModelRecord(
        campaign_id=CAMPAIGN,
        generation=generation,
        member=member,
        committee_size=size,
        seed=trained.seed,
        hyperparameters=trained.hyperparameters,
    )
    return register_member(database, record, trained.model.state_dict())


def test_round_trip_gives_bit_identical_predictions(mongo_database, members, cache_directory):
    for index, trained in enumerate(members):
        register(mongo_database, trained, index)
    documents, models = load_committee(mongo_database, CAMPAIGN, device="cpu")

    frames = labelled_frames(6, seed=3)
    original = predict_committee([m.model for m in members], frames, compute_forces=True)
    reloaded = predict_committee(models, frames, compute_forces=True)
    assert np.array_equal(original.energies, reloaded.energies)
    assert all(np.array_equal(a, b) for a, b in zip(original.forces, reloaded.forces, strict=True))
    assert [document.id for document in documents] == ["water-g000-m00", "water-g000-m01"]
    cached = sorted(path.stem for path in cache_directory.glob("*.pt"))
    assert cached == sorted(document.weights_sha256 for document in documents)


def test_cached_weights_are_used_without_the_database(mongo_database, members):
    document, _ = register(mongo_database, members[0], 0, size=1)
    first = load_weights(mongo_database, document)
    registry.weights_bucket(mongo_database).delete(document.weights_id)
    second = load_weights(mongo_database, document)
    assert all(np.array_equal(first[name], second[name]) for name in first)


def test_generation_is_current_only_once_complete(mongo_database, members):
    assert registry.current_generation(mongo_database, CAMPAIGN) is None
    register(mongo_database, members[0], 0)
    assert registry.current_generation(mongo_database, CAMPAIGN) is None
    with pytest.raises(registry.RegistryError, match="no complete committee"):
        load_committee(mongo_database, CAMPAIGN)

    register(mongo_database, members[1], 1)
    assert registry.current_generation(mongo_database, CAMPAIGN) == 0

    register(mongo_database, members[0], 0, generation=2, size=1)
    register(mongo_database, members[0], 0, generation=1, size=1)
    assert registry.current_generation(mongo_database, CAMPAIGN) == 2


def test_registering_twice_stores_nothing_new(mongo_database, members):
    first, created = register(mongo_database, members[0], 0)
    again, created_again = register(mongo_database, members[1], 0)

    assert created and not created_again
    assert again.id == first.id and again.seed == members[0].seed
    assert mongo_database[registry.MODELS].count_documents({"campaign_id": CAMPAIGN}) == 1
    files = mongo_database[f"{registry.MODEL_WEIGHTS_BUCKET}.files"]
    assert files.count_documents({}) == 1


def test_failed_registration_leaves_nothing_behind(mongo_database, members, monkeypatch):
    insert_one = pymongo.collection.Collection.insert_one

    def refuse(collection, document, *args, **kwargs):
        if collection.name == registry.MODELS:
            raise pymongo.errors.OperationFailure("disk full")
        return insert_one(collection, document, *args, **kwargs)

    monkeypatch.setattr(pymongo.collection.Collection, "insert_one", refuse)
    with pytest.raises(pymongo.errors.OperationFailure):
        register(mongo_database, members[0], 0, size=1)
    monkeypatch.undo()

    assert registry.find_member(mongo_database, CAMPAIGN, 0, 0) is None
    assert mongo_database[f"{registry.MODEL_WEIGHTS_BUCKET}.files"].count_documents({}) == 0
    assert mongo_database[f"{registry.MODEL_WEIGHTS_BUCKET}.chunks"].count_documents({}) == 0
    assert registry.current_generation(mongo_database, CAMPAIGN) is None


def test_missing_weights_are_a_clear_error(mongo_database, members, tmp_path):
    document, _ = register(mongo_database, members[0], 0, size=1)
    registry.weights_bucket(mongo_database).delete(document.weights_id)
    with pytest.raises(registry.RegistryError, match=r"water-g000-m00: its weights .* are missing"):
        registry.load_weights(mongo_database, document, tmp_path / "empty cache")


def test_hash_mismatch_is_a_clear_error(mongo_database, members, tmp_path, cache_directory):
    document, _ = register(mongo_database, members[0], 0, size=1)
    tampered = document.model_copy(
        update={"weights_sha256": hashlib.sha256(b"other weights").hexdigest()}
    )
    with pytest.raises(registry.RegistryError, match=r"water-g000-m00: .* do not match"):
        registry.load_weights(mongo_database, tampered)

    registry.load_weights(mongo_database, document)
    cached = cache_directory / f"{document.weights_sha256}.pt"
    cached.write_bytes(b"damaged")
    registry.load_weights(mongo_database, document)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == document.weights_sha256


def test_exported_committee_loads_in_mace_calculator(mongo_database, members, tmp_path):
    for index, trained in enumerate(members):
        register(mongo_database, trained, index)
    paths = export_model_files(mongo_database, CAMPAIGN, None, None, tmp_path)
    single = export_model_files(mongo_database, CAMPAIGN, 0, 1, tmp_path / "one")

    assert [path.name for path in paths] == ["water-g000-m00.model", "water-g000-m01.model"]
    assert [path.name for path in single] == ["water-g000-m01.model"]
    atoms = labelled_frames(1, seed=4)[0]
    calculator = MACECalculator(model_paths=[str(path) for path in paths], device="cpu")
    calculator.calculate(atoms)
    expected = predict_committee([m.model for m in members], [atoms]).energies[:, 0]
    np.testing.assert_allclose(calculator.results["energy_comm"], expected, atol=1e-10)


def test_cli_exports_the_current_committee(mongo_database, members, tmp_path, monkeypatch):
    from fff_jobs.cli import app

    for index, trained in enumerate(members):
        register(mongo_database, trained, index)
    mongo_database[registry.CAMPAIGNS].insert_one({"_id": CAMPAIGN})
    monkeypatch.setattr(config, "project_database", lambda: mongo_database)
    monkeypatch.setattr(config, "activate", lambda *args: None)
    result = CliRunner().invoke(app, ["export-model", CAMPAIGN, str(tmp_path), "--member", "1"])

    assert result.exit_code == 0, result.output
    assert (tmp_path / "water-g000-m01.model").is_file()
    assert not (tmp_path / "water-g000-m00.model").exists()


def test_diverged_members_take_no_part_in_the_committee(mongo_database, members):
    register(mongo_database, members[0], 0)
    record = ModelRecord(
        campaign_id=CAMPAIGN,
        generation=0,
        member=1,
        committee_size=2,
        hyperparameters=members[1].hyperparameters,
        diverged="training diverged: validation loss nan in every epoch",
    )
    register_member(mongo_database, record, members[1].model.state_dict())
    documents, models = load_committee(mongo_database, CAMPAIGN, device="cpu")
    assert [document.member for document in documents] == [0] and len(models) == 1
    everyone = registry.committee_documents(mongo_database, CAMPAIGN)
    assert [document.member for document in everyone] == [0, 1]  # still registered
    mongo_database[registry.MODELS].update_one(
        {"_id": "water-g000-m00"}, {"$set": {"diverged": "training diverged"}}
    )
    with pytest.raises(registry.RegistryError, match="every member of generation 0 diverged"):
        load_committee(mongo_database, CAMPAIGN, device="cpu")


def stored_results(database, campaign_id: str, frames, name: str, first: int = 1) -> None:
    """Labelled frames stored as a campaign's successful reference results."""
    from fff_jobs.schemas import Frame, StoredResult

    results = [
        StoredResult(
            id=f"{campaign_id}-{name}-{index:05d}",
            campaign_id=campaign_id,
            source="initial",
            sequence=first + index,
            frame=Frame.from_atoms(atoms),
            success=True,
            energy=atoms.get_potential_energy(),
            forces=atoms.get_forces().tolist(),
            wall_time=0.1,
            host="here",
            code="morse",
        )
        for index, atoms in enumerate(frames)
    ]
    registry.store_reference_results(database, results)


def test_a_generation_trains_on_one_snapshot_retrains_a_diverged_member_and_warm_starts(
    mongo_database, monkeypatch
):
    """Members of one generation read the results recorded when the round was claimed, even
    if more arrive meanwhile; a member whose training diverges is trained again; the next
    generation starts from the same member of the last."""
    import fff_jobs.training
    from fff_jobs import campaign
    from fff_jobs.schemas import Frame, NewCampaign
    from fff_jobs.spec import CampaignSpec
    from fff_jobs.structures import water_molecule

    spec = CampaignSpec.from_yaml("tests/specs/tiny_water.yaml")
    spec.model, spec.training = TINY_MODEL, SETTINGS
    start = [Frame.from_atoms(water_molecule())]
    new = NewCampaign(campaign_id="snap", spec=spec, starting_structures=start)
    assert registry.create_campaign(mongo_database, new)
    assert not registry.create_campaign(mongo_database, new)  # stored once
    stored_results(mongo_database, "snap", labelled_frames(10), "first")
    snapshot = registry.get_campaign(mongo_database, "snap")
    assert registry.claim_training_round(mongo_database, snapshot, 1, "owner") == 0
    real_training, seeds = fff_jobs.training.train_member, []

    def diverging_first(frames, model, training, seed, parent=None, split=None):
        seeds.append(seed)
        trained = real_training(frames, model, training, seed, parent, split)
        if len(seeds) == 1:
            trained.history = [row | {"validation_loss": float("nan")} for row in trained.history]
        return trained

    monkeypatch.setattr(fff_jobs.training, "train_member", diverging_first)
    first, published, _ = campaign._train_and_register(mongo_database, snapshot, 0, 0, None)
    stored_results(mongo_database, "snap", labelled_frames(3, seed=5), "late", first=11)
    second, published, _ = campaign._train_and_register(mongo_database, snapshot, 0, 1, None)
    assert first.attempts == 2 and first.diverged is None
    assert seeds[0] != seeds[1]  # the retry drew a new seed
    assert second.attempts == 1
    assert first.training_set_size == second.training_set_size == 10
    assert first.training_set_hash == second.training_set_hash
    assert [member.id for member in published] == ["snap-g000-m00", "snap-g000-m01"]
    fresh = registry.get_campaign(mongo_database, "snap")
    assert registry.claim_training_round(mongo_database, fresh, 1, "other") is None  # running

    following = registry.claim_generation_follow_up(mongo_database, "snap", published, "owner")
    assert following is not None and not following.training.running
    assert [member.id for member in following.committee] == ["snap-g000-m00", "snap-g000-m01"]
    assert registry.claim_generation_follow_up(mongo_database, "snap", published, "other") is None
    assert registry.claim_training_round(mongo_database, following, 1, "owner") == 1
    warm, _, _ = campaign._train_and_register(mongo_database, following, 1, 0, first)
    assert warm.parent_model == "snap-g000-m00" and warm.training_set_size == 13
    assert set(warm.metrics) >= {"train_force_mae", "validation_energy_mae_per_atom"}
    assert warm.versions["mace-torch"] and warm.device == "cpu"


def test_a_round_claimed_once_the_budget_is_spent_trains_from_scratch_for_longer(
    mongo_database,
):
    """The last generation is the committee a campaign delivers: a cold start, more epochs."""
    from fff_jobs import campaign
    from fff_jobs.schemas import Frame, NewCampaign
    from fff_jobs.spec import CampaignSpec
    from fff_jobs.structures import water_molecule

    spec = CampaignSpec.from_yaml("tests/specs/tiny_water.yaml")
    updates = {"max_epochs": 1, "patience": 10, "final_max_epochs": 3}
    spec.model, spec.training = TINY_MODEL, SETTINGS.model_copy(update=updates)
    members = {}
    for campaign_id, spent, parent in (("early", 0, None), ("last", 20, "early")):
        start = [Frame.from_atoms(water_molecule())]
        new = NewCampaign(campaign_id=campaign_id, spec=spec, starting_structures=start)
        assert registry.create_campaign(mongo_database, new)
        stored_results(mongo_database, campaign_id, labelled_frames(10), "first")
        mongo_database[registry.CAMPAIGNS].update_one(
            {"_id": campaign_id}, {"$set": {"budget.spent": spent}}
        )
        claimed = registry.get_campaign(mongo_database, campaign_id)
        assert registry.claim_training_round(mongo_database, claimed, 1, "owner") == 0
        members[campaign_id], _, _ = campaign._train_and_register(
            mongo_database, claimed, 0, 0, members.get(parent)
        )

    assert not registry.training_snapshot(mongo_database, "early", 0).final
    assert registry.training_snapshot(mongo_database, "last", 0).final
    assert members["early"].epochs == 1
    assert members["last"].epochs == 3 and members["last"].parent_model is None
