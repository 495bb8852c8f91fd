"""Batched committee inference against mace-torch's own calculator and eval command."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from mace.calculators import MACECalculator
from test_training import TINY_MODEL, TINY_TRAINING, labelled_frames

from fff_jobs.committee import (
    CommitteePrediction,
    committee_uncertainty,
    export_model,
    load_member,
    predict_committee,
)
from fff_jobs.training import TrainedMember, UnknownElementError, build_model, train_member


@pytest.fixture(scope="module")
def committee() -> list[TrainedMember]:
    """Three tiny members: one trained, two freshly built (inference does not care)."""
    frames = labelled_frames(16)
    first = train_member(frames, TINY_MODEL, TINY_TRAINING.model_copy(update={"max_epochs": 2}), 0)
    members = [first]
    for seed in (1, 2):
        torch.manual_seed(seed)
        members.append(replace(first, model=build_model(first.hyperparameters), seed=seed))
    return members


@pytest.fixture(scope="module")
def model_files(committee, tmp_path_factory) -> list[str]:
    directory = tmp_path_factory.mktemp("models")
    return [
        str(
            export_model(
                member.hyperparameters, member.model.state_dict(), directory / f"{i}.model"
            )
        )
        for i, member in enumerate(committee)
    ]


def test_batched_inference_equals_mace_calculator(committee, model_files):
    frames = labelled_frames(9, seed=5)
    models = [member.model for member in committee]
    prediction = predict_committee(models, frames, compute_forces=True, batch_size=4)
    calculator = MACECalculator(model_paths=model_files, device="cpu")

    for index, atoms in enumerate(frames):
        calculator.calculate(atoms)
        results = calculator.results
        np.testing.assert_allclose(
            prediction.energies[:, index], results["energy_comm"], atol=1e-10
        )
        np.testing.assert_allclose(prediction.forces[index], results["forces_comm"], atol=1e-10)
        assert prediction.energy_mean[index] == pytest.approx(results["energy"], abs=1e-10)
        assert prediction.energy_per_atom_std[index] == pytest.approx(
            np.sqrt(results["energy_var"]) / len(atoms), abs=1e-10
        )


@pytest.mark.parametrize("kind", ["force", "energy"])
def test_md_reuses_the_driving_members_results_for_the_same_uncertainty(committee, kind):
    """In MD the calculator has already run member 0 on the frame: only the others are
    evaluated, and the uncertainty is the whole committee's."""
    models = [member.model for member in committee]
    atoms = labelled_frames(1, seed=3)[0]
    atoms.calc = MACECalculator(models=[models[0]], device="cpu", default_dtype="float64")
    atoms.get_forces()
    whole = committee_uncertainty(models, kind, device="cpu")(atoms)
    reused = committee_uncertainty(models, kind, device="cpu", driven_by_first=True)
    assert reused(atoms) == pytest.approx(whole, rel=1e-9) and whole > 0
    atoms.positions[0] += 0.05  # moved since the calculator ran: its results are recomputed
    assert reused(atoms) == pytest.approx(committee_uncertainty(models, kind)(atoms), rel=1e-9)


def test_total_force_deviation_ranks_broad_doubt_above_one_doubtful_atom():
    one_atom = np.zeros((2, 3, 3))  # two members, three atoms
    one_atom[0, 0, 0], one_atom[1, 0, 0] = 0.4, -0.4  # atom 0 at 0.4 eV/A deviation
    every_atom = np.zeros((2, 6, 3))
    every_atom[0, :, 1], every_atom[1, :, 1] = 0.3, -0.3  # six atoms at 0.3 eV/A
    prediction = CommitteePrediction(
        energies=np.zeros((2, 2)),
        energy_per_atom_mean=np.zeros(2),
        energy_per_atom_std=np.zeros(2),
        forces=[one_atom, every_atom],
    )
    assert prediction.force_deviation == pytest.approx([0.4, 0.3])
    assert prediction.total_force_deviation == pytest.approx([0.4, 1.8])


def test_descriptors_are_the_first_member_mean_invariants(committee, model_files):
    frames = labelled_frames(5, seed=6)
    prediction = predict_committee([m.model for m in committee], frames, descriptors=True)
    calculator = MACECalculator(model_paths=model_files[:1], device="cpu")

    assert prediction.forces is None
    assert prediction.descriptors.shape[0] == 5
    for index, atoms in enumerate(frames):
        expected = calculator.get_descriptors(atoms).mean(axis=0)
        np.testing.assert_allclose(prediction.descriptors[index], expected, atol=1e-10)


def test_rebuilt_member_predicts_the_same(committee):
    frames = labelled_frames(4, seed=8)
    member = committee[0]
    rebuilt = load_member(member.hyperparameters, member.model.state_dict())
    original = predict_committee([member.model], frames).energies
    assert np.array_equal(predict_committee([rebuilt], frames).energies, original)


def test_members_of_one_architecture_load_as_independent_models(committee):
    """Loading copies one built model per architecture: each copy holds its own weights."""
    frames = labelled_frames(4, seed=8)
    originals = [member.model for member in committee]
    loaded = [
        load_member(member.hyperparameters, member.model.state_dict()) for member in committee
    ]
    assert len({id(model) for model in loaded}) == 3
    expected = predict_committee(originals, frames, compute_forces=True)
    actual = predict_committee(loaded, frames, compute_forces=True)
    assert np.array_equal(actual.energies, expected.energies)
    assert len(set(actual.energies[:, 0])) == 3
    with torch.no_grad():
        next(loaded[0].parameters()).add_(1.0)
    assert np.array_equal(predict_committee(loaded[1:], frames).energies, expected.energies[1:])


def test_unknown_element_names_the_structure(committee):
    frames = labelled_frames(3, seed=9)
    frames[2].symbols[0] = "N"
    with pytest.raises(UnknownElementError, match=r"structure 2 .*holds N.*knows H, O"):
        predict_committee([m.model for m in committee], frames)


def test_no_frames_give_empty_predictions(committee):
    prediction = predict_committee([m.model for m in committee], [])
    assert prediction.energies.shape == (3, 0)
    assert prediction.energy_per_atom_std.shape == (0,)


@pytest.mark.slow
def test_exported_model_runs_in_mace_eval_configs(committee, model_files, tmp_path: Path):
    frames = labelled_frames(6, seed=10)
    ase.io.write(tmp_path / "frames.xyz", [atoms.copy() for atoms in frames])
    eval_configs = Path(sys.executable).with_name("mace_eval_configs")
    subprocess.run(
        [
            str(eval_configs),
            "--configs",
            str(tmp_path / "frames.xyz"),
            "--model",
            model_files[1],
            "--output",
            str(tmp_path / "out.xyz"),
            "--batch_size",
            "4",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    evaluated = ase.io.read(tmp_path / "out.xyz", index=":")
    prediction = predict_committee([committee[1].model], frames, compute_forces=True)
    energies = [atoms.info["MACE_energy"] for atoms in evaluated]
    np.testing.assert_allclose(energies, prediction.energies[0], atol=1e-8)
    np.testing.assert_allclose(
        evaluated[0].arrays["MACE_forces"], prediction.forces[0][0], atol=1e-8
    )
