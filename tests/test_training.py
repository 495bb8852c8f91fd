"""Building MACE models and training committee members on tiny Morse-labelled H/O clusters."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.morse import MorsePotential
from ase.calculators.singlepoint import SinglePointCalculator

from fff_jobs.spec import CampaignSpec, ModelSettings, TrainingSettings
from fff_jobs.structures import LabelledFrame
from fff_jobs.training import (
    TrainingDataError,
    build_model,
    check_training_frames,
    fixed_split,
    member_seed,
    model_hyperparameters,
    split_key,
    train_member,
    training_set_hash,
)

from project import REPO

TINY_MODEL = ModelSettings(
    num_channels=8,
    r_max=4.0,
    num_interactions=2,
    correlation=2,
    max_ell=2,
    radial_mlp=[16, 16],
    mlp_irreps="8x0e",
)
TINY_TRAINING = TrainingSettings(committee_size=2, max_epochs=6, patience=6, batch_size=5)


def labelled_frames(count: int, seed: int = 0, symbols: str = "HO") -> list[Atoms]:
    """Small random clusters of 3-6 atoms labelled by a Morse potential (cheap, smooth)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        size = int(rng.integers(3, 7))
        while True:
            positions = rng.uniform(0.0, 2.5, (size, 3))
            distances = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
            if (distances + 9 * np.eye(size)).min() > 0.9:
                break
        atoms = Atoms(list(rng.choice(list(symbols), size)), positions=positions)
        atoms.calc = MorsePotential(epsilon=1.0, r0=1.1, rho0=4.0)
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def frames() -> list[Atoms]:
    return labelled_frames(24)


@pytest.fixture(scope="module")
def trained(frames):
    """One tiny member trained from scratch (bootstrap split)."""
    return train_member(frames, TINY_MODEL, TINY_TRAINING, seed=7)


def test_default_model_is_small_and_fits_e0s_by_least_squares(frames):
    labels = check_training_frames(frames)
    hyperparameters = model_hyperparameters(ModelSettings(), frames, labels)
    model = build_model(hyperparameters)

    assert 10_000 < sum(p.numel() for p in model.parameters()) < 100_000
    assert hyperparameters["atomic_numbers"] == [1, 8]
    counts = np.array([[np.sum(a.numbers == z) for z in (1, 8)] for a in frames])
    energies = np.array([energy for energy, _ in labels])
    expected = np.linalg.lstsq(counts, energies, rcond=None)[0]
    np.testing.assert_allclose(hyperparameters["atomic_energies"], expected)
    assert next(model.parameters()).dtype == torch.float64
    assert torch.get_default_dtype() == torch.float32


def test_given_atomic_energies_are_used_as_they_are(frames):
    settings = TINY_MODEL.model_copy(update={"atomic_energies": {"H": -13.6, "O": -2041.0}})
    hyperparameters = model_hyperparameters(settings, frames, check_training_frames(frames))
    assert hyperparameters["atomic_energies"] == [-13.6, -2041.0]

    with pytest.raises(TrainingDataError, match="lacks E0s for O"):
        model_hyperparameters(
            TINY_MODEL.model_copy(update={"atomic_energies": {"H": -13.6}}),
            frames,
            check_training_frames(frames),
        )


def test_member_keeps_its_best_validation_model(frames, trained):
    losses = [entry["validation_loss"] for entry in trained.history]

    assert trained.best_epoch == int(np.argmin(losses))
    assert trained.best_epoch > 0
    assert trained.metrics["validation_force_mae"] < trained.history[0]["validation_force_mae"]
    assert trained.metrics["validation_force_mae"] == pytest.approx(
        trained.history[trained.best_epoch]["validation_force_mae"]
    )
    assert trained.seed == 7 and trained.device == "cpu" and not trained.warm_started


def test_the_moving_average_of_the_weights_is_what_is_validated_and_kept(frames, trained):
    settings = TINY_TRAINING.model_copy(update={"ema_decay": None})
    raw = train_member(frames, TINY_MODEL, settings, seed=7)

    assert TrainingSettings().ema_decay == 0.99
    assert raw.history[0]["validation_loss"] == pytest.approx(trained.history[0]["validation_loss"])
    assert raw.history[1]["validation_loss"] != pytest.approx(trained.history[1]["validation_loss"])
    averaged = dict(trained.model.named_parameters())
    assert any(
        not torch.allclose(parameter, averaged[name])
        for name, parameter in raw.model.named_parameters()
    )


def test_the_squared_error_loss_trains_and_weighs_large_errors_more(frames, trained):
    mse = train_member(frames, TINY_MODEL, TINY_TRAINING.model_copy(update={"loss": "mse"}), seed=7)

    # same start, same frames: Huber (delta 0.01) is below half the squared error
    assert mse.history[0]["validation_force_mae"] == pytest.approx(
        trained.history[0]["validation_force_mae"]
    )
    assert mse.history[0]["validation_loss"] > 2 * trained.history[0]["validation_loss"]
    assert mse.best_epoch > 0
    assert mse.metrics["validation_force_mae"] < mse.history[0]["validation_force_mae"]


def test_the_delivered_generation_trains_from_scratch_with_its_own_loss():
    settings = TrainingSettings(max_epochs=40, patience=20, final_max_epochs=100, final_loss="mse")
    steering, delivered = settings.for_generation(False), settings.for_generation(True)

    assert (steering.loss, steering.max_epochs, steering.warm_start) == ("huber", 40, True)
    assert (delivered.loss, delivered.max_epochs, delivered.warm_start) == ("mse", 100, False)
    assert (steering.patience, delivered.patience) == (20, 100)  # the delivered never stops early
    assert TrainingSettings(final_max_epochs=100).for_generation(True).loss == "huber"


def test_a_member_that_holds_out_no_frame_keeps_its_best_epoch_on_monitor_frames(frames):
    every = list(range(len(frames)))
    member = train_member(frames, TINY_MODEL, TINY_TRAINING, seed=7, split=(every, []))
    losses = [entry["monitor_loss"] for entry in member.history]

    assert member.training_indices == every and member.validation_indices == []
    assert all("validation_loss" not in entry for entry in member.history)
    assert member.best_epoch == int(np.argmin(losses)) > 0
    assert member.history[-1]["monitor_force_mae"] < member.history[0]["monitor_force_mae"]
    assert set(member.metrics) == {"train_energy_mae_per_atom", "train_force_mae"}


def test_a_delivered_generation_without_hold_out_needs_its_own_epoch_count():
    with pytest.raises(ValueError, match="final_holdout: false needs final_max_epochs"):
        TrainingSettings(final_holdout=False)
    settings = TrainingSettings(final_holdout=False, final_max_epochs=100)
    assert settings.holds_out(final=False) and not settings.holds_out(final=True)
    assert TrainingSettings().holds_out(final=True)


@pytest.mark.parametrize("workflow", ["water_xtb.yaml", "water_xtb_gpu.yaml"])
def test_the_shipped_xtb_workflows_deliver_a_committee_trained_on_the_squared_error(workflow):
    training = CampaignSpec.from_yaml(REPO / "workflows" / workflow).training
    assert training.for_generation(False).loss == "huber"
    assert training.for_generation(True).loss == "mse"
    # the laptop's delivered committee trains on every result; the GPU's holds a tenth out
    assert training.holds_out(final=False)
    assert training.holds_out(final=True) == (workflow == "water_xtb_gpu.yaml")


def test_training_leaves_dtype_and_logging_as_they_were(frames):
    handlers = list(logging.getLogger().handlers)
    settings = TINY_TRAINING.model_copy(update={"max_epochs": 1})
    train_member(frames, TINY_MODEL.model_copy(update={"dtype": "float64"}), settings, seed=0)

    assert torch.get_default_dtype() == torch.float32
    assert logging.getLogger().handlers == handlers


def test_bootstrap_validates_on_the_frames_left_out(trained, frames):
    training, validation = trained.training_indices, trained.validation_indices

    assert len(set(training)) < len(training)  # a Poisson bootstrap: some frames repeat
    assert set(training).isdisjoint(validation)
    assert set(training) | set(validation) == set(range(len(frames)))


def test_random_split_holds_out_about_a_tenth():
    names = [f"frame-{index}" for index in range(2000)]
    training, validation = fixed_split(names, split_key(0, 1), "random", 0.1)
    assert 150 < len(validation) < 250
    assert sorted(training + validation) == list(range(2000))
    assert fixed_split(names[:2], split_key(0, 1), "random", 0.1)[1] != []


@pytest.mark.parametrize("split", ["random", "bootstrap"])
def test_a_frame_keeps_its_place_as_the_training_set_grows(split):
    """A warm-started member never trains on frames that were its validation frames, and
    members of one committee split differently."""
    names = [f"result-{index:04d}" for index in range(300)]
    key = split_key(0, 2)
    small_training, small_validation = fixed_split(names[:100], key, split, 0.1)
    training, validation = fixed_split(names, key, split, 0.1)
    assert {names[i] for i in small_validation} <= {names[i] for i in validation}
    assert {names[i] for i in small_training} <= {names[i] for i in training}
    assert set(training).isdisjoint(validation)
    other = fixed_split(names, split_key(0, 3), split, 0.1)[1]
    assert other != validation
    if split == "bootstrap":  # Poisson(1) counts: about e^-1 held out, some frames twice
        assert 0.28 < len(validation) / 300 < 0.46
        assert len(training) != len(set(training))


def test_member_seeds_differ_and_repeat():
    seeds = {member_seed(0, generation, member) for generation in range(3) for member in range(8)}
    assert len(seeds) == 24
    assert member_seed(0, 1, 2) == member_seed(0, 1, 2)
    assert member_seed(0, 1, 2, attempt=1) not in seeds  # a diverged member retrains anew


def test_warm_start_begins_near_the_parent_and_reaches_the_cold_error_sooner(frames, trained):
    more = frames + labelled_frames(8, seed=1)
    parent = (trained.hyperparameters, trained.model.state_dict())
    settings = TINY_TRAINING.model_copy(update={"max_epochs": 4})
    warm = train_member(more, TINY_MODEL, settings, seed=11, parent=parent)
    cold = train_member(more, TINY_MODEL, settings, seed=11)

    assert warm.warm_started and warm.validation_indices == cold.validation_indices
    assert warm.history[0]["validation_force_mae"] < 0.7 * cold.history[0]["validation_force_mae"]
    assert warm.metrics["validation_force_mae"] < cold.metrics["validation_force_mae"]


def test_warm_start_falls_back_to_a_cold_start_for_new_elements(trained):
    with_nitrogen = labelled_frames(6, seed=2, symbols="HON")
    settings = TINY_TRAINING.model_copy(update={"max_epochs": 1})
    parent = (trained.hyperparameters, trained.model.state_dict())
    member = train_member(with_nitrogen, TINY_MODEL, settings, seed=1, parent=parent)
    assert not member.warm_started
    assert 7 in member.hyperparameters["atomic_numbers"]


@pytest.mark.parametrize("count", [0, 1])
def test_too_few_frames_is_a_clear_error(count):
    with pytest.raises(TrainingDataError, match=f"at least 2 labelled frames.*got {count}"):
        train_member(labelled_frames(count), TINY_MODEL, TINY_TRAINING, seed=0)


def test_non_finite_labels_name_the_frame():
    bad_energy = labelled_frames(5)
    bad_energy[3].calc.results["energy"] = float("nan")
    with pytest.raises(TrainingDataError, match=r"frame 3 .*NaN"):
        train_member(bad_energy, TINY_MODEL, TINY_TRAINING, seed=0)

    bad_forces = labelled_frames(5)
    bad_forces[1].calc.results["forces"][0, 2] = np.nan
    with pytest.raises(TrainingDataError, match="frame 1 "):
        train_member(bad_forces, TINY_MODEL, TINY_TRAINING, seed=0)


def test_unlabelled_frame_is_a_clear_error():
    frames = labelled_frames(3)
    frames[2].calc = None
    with pytest.raises(TrainingDataError, match=r"frame 2 .*no reference energy"):
        check_training_frames(frames)


def test_labelled_frame_documents_keep_frames_and_labels(frames):
    documents = [LabelledFrame.from_atoms(atoms).model_dump() for atoms in frames]
    copies = [LabelledFrame.model_validate(document).to_atoms() for document in documents]
    assert training_set_hash(copies) == training_set_hash(frames)
    copies[0].calc.results["energy"] += 1e-6
    assert training_set_hash(copies) != training_set_hash(frames)
