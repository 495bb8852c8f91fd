"""The MACE committee at work: rebuild members from weights, batched inference, model export.

Members travel as (hyperparameters, state dict) and are rebuilt here; nothing is
unpickled. Inference batches structures through mace's data loaders and runs every
member on each batch, on ``cuda`` when present. The last functions turn weights into
the bytes the model registry (:mod:`fff_jobs.database`) stores and back: torch stays on
the GPU side, and CPU workers never load it.
"""

from __future__ import annotations

import copy
import functools
import io
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import mace  # noqa: F401  (mace must be imported before e3nn)
import numpy as np
import torch
from ase import Atoms
from e3nn import o3
from mace.modules.utils import extract_invariant
from mace.tools import torch_geometric
from mace.tools.scatter import scatter_mean
from mace.tools.train import preserve_grad_state
from pymongo.database import Database

from fff_jobs import calibration
from fff_jobs import database as registry
from fff_jobs.schemas import ModelRecord
from fff_jobs.training import (
    build_model,
    check_elements,
    default_dtype,
    resolve_device,
    to_atomic_data,
)

# Structures per batch when none is given. On a CPU a few at a time run fastest (the
# symmetric contraction's einsum stays in cache: 8 water clusters per batch ran about twice
# as fast as 64, benchmarks/committee.py); a GPU wants large batches.
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 8, 64


@dataclass
class CommitteePrediction:
    """Predictions of every member for a list of structures (energies in eV, forces in eV/A)."""

    energies: np.ndarray  # (members, structures)
    energy_per_atom_mean: np.ndarray  # (structures,)
    energy_per_atom_std: np.ndarray  # (structures,): spread over members, population std
    forces: list[np.ndarray] | None = None  # per structure: (members, atoms, 3)
    descriptors: np.ndarray | None = None  # (structures, features): first member's invariants

    @property
    def energy_mean(self) -> np.ndarray:
        """Committee mean of the energy of each structure."""
        return self.energies.mean(axis=0)

    @property
    def force_deviation(self) -> np.ndarray:
        """Largest per-atom force standard deviation over members of each structure (eV/A)."""
        return np.array([calibration.force_deviation(forces) for forces in self._member_forces])

    @property
    def total_force_deviation(self) -> np.ndarray:
        """Sum over atoms of the per-atom force standard deviations of each structure (eV/A)."""
        return np.array([calibration.atom_force_deviations(f).sum() for f in self._member_forces])

    @property
    def _member_forces(self) -> list[np.ndarray]:
        """The members' forces of each structure; an error if they were not predicted."""
        if self.forces is None:
            raise ValueError("the force deviation needs forces: predict with compute_forces=True")
        return self.forces

    def uncertainty(self, kind: calibration.Uncertainty) -> np.ndarray:
        """Each structure's force deviation (eV/A) or energy-per-atom spread (eV/atom)."""
        return self.force_deviation if kind == "force" else self.energy_per_atom_std

    def frame_prediction(self, index: int, generation: int) -> calibration.Prediction:
        """Structure ``index`` as a :class:`~fff_jobs.calibration.Prediction` (needs forces)."""
        if self.forces is None:
            raise ValueError("a frame's prediction needs forces: predict with compute_forces=True")
        return calibration.Prediction.from_members(
            generation, self.energies[:, index], self.forces[index]
        )


@functools.lru_cache(maxsize=16)
def _built_architecture(hyperparameters_json: str) -> torch.nn.Module:
    """One built model per architecture and process, for :func:`load_member` to copy.

    Building a MACE compiles e3nn's tensor products (1-3 s for the laptop model on a CPU);
    copying a built one takes a tenth of that. A worker runs job after job in one process
    (``rlaunch rapidfire``, ``fff run``), and each MD segment and selection loads the
    whole committee, so each architecture is built once per process.
    """
    return build_model(json.loads(hyperparameters_json))


def load_member(
    hyperparameters: dict, state_dict: Mapping[str, torch.Tensor], device: str = "cpu"
) -> torch.nn.Module:
    """A committee member rebuilt from its hyperparameters and weights, ready for inference."""
    built = _built_architecture(json.dumps(hyperparameters, sort_keys=True))
    model = copy.deepcopy(built)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval()


def _committee_geometry(models: Sequence[torch.nn.Module]) -> tuple[list[int], float]:
    """Elements and cutoff shared by all members (a clear error if they differ)."""
    if not models:
        raise ValueError("a committee needs at least one member")
    elements = [int(z) for z in models[0].atomic_numbers]
    r_max = float(models[0].r_max)
    for index, model in enumerate(models):
        if [int(z) for z in model.atomic_numbers] != elements or float(model.r_max) != r_max:
            raise ValueError(
                f"committee member {index} differs from member 0 in its elements or cutoff: "
                "a committee must share them; evaluate such models separately"
            )
    return elements, r_max


def _descriptors(model: torch.nn.Module, output: dict, batch) -> torch.Tensor:
    """Mean over the atoms of each structure of the invariant node features (as mace's eval)."""
    irreps_out = o3.Irreps(str(model.products[0].linear.irreps_out))
    features = irreps_out.dim // (irreps_out.lmax + 1) ** 2
    num_layers = int(model.num_interactions)
    invariants = extract_invariant(
        output["node_feats"], num_layers=num_layers, num_features=features, l_max=irreps_out.lmax
    )
    return scatter_mean(invariants, batch.batch, dim=0, dim_size=batch.num_graphs)


def _evaluate_batch(
    models: Sequence[torch.nn.Module], batch, compute_forces: bool, descriptors: bool
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None]:
    """Energies (members, graphs), forces per structure (members, atoms, 3), descriptors."""
    energies, forces, features = [], [], None
    for index, model in enumerate(models):
        with torch.set_grad_enabled(compute_forces):
            output = model(batch.clone().to_dict(), training=False, compute_force=compute_forces)
        energies.append(output["energy"].detach())
        if compute_forces:
            forces.append(output["forces"].detach())
        if descriptors and index == 0:
            features = _descriptors(model, output, batch).detach().cpu().numpy()
    per_structure = []
    if compute_forces:
        stacked = torch.stack(forces).cpu().numpy()
        bounds = batch.ptr.cpu().numpy()
        per_structure = [stacked[:, a:b] for a, b in itertools.pairwise(bounds)]
    return torch.stack(energies).cpu().numpy(), per_structure, features


def predict_committee(
    models: Sequence[torch.nn.Module],
    frames: Sequence[Atoms],
    compute_forces: bool = False,
    descriptors: bool = False,
    batch_size: int | None = None,
    device: str = "auto",
) -> CommitteePrediction:
    """Every member's energy (and forces) for every structure, in batches through mace's loaders.

    The members are moved to ``device`` (``auto``: cuda when present); ``batch_size``
    structures go through them at a time (default: 8 on a CPU, 64 on a GPU). Raises
    :class:`fff_jobs.training.UnknownElementError` naming the first structure with an
    element the committee was not built for.
    """
    elements, r_max = _committee_geometry(models)
    check_elements(frames, elements, "the committee")
    target = torch.device(resolve_device(device))
    if batch_size is None:
        batch_size = GPU_BATCH_SIZE if target.type == "cuda" else CPU_BATCH_SIZE
    dtype = str(next(models[0].parameters()).dtype).removeprefix("torch.")
    with default_dtype(dtype), preserve_grad_state(torch.nn.ModuleList(models)):
        members = [model.to(target) for model in models]
        loader = torch_geometric.dataloader.DataLoader(
            to_atomic_data(frames, elements, r_max), batch_size=batch_size, shuffle=False
        )
        results = [
            _evaluate_batch(members, batch.to(target), compute_forces, descriptors)
            for batch in loader
        ]
    return _prediction(frames, len(models), results)


def committee_uncertainty(
    models: Sequence[torch.nn.Module],
    kind: calibration.Uncertainty,
    device: str = "auto",
    driven_by_first: bool = False,
) -> Callable[[Atoms], float]:
    """The committee's uncertainty of one structure, as a function of its atoms (for MD).

    With ``driven_by_first``, the atoms' calculator runs ``models[0]`` and has computed
    this structure's energy and forces (as in MD, whose observers run right after the
    step): those stand for member 0, and only the other members are evaluated.
    """
    compute_forces = kind == "force"
    reuse = driven_by_first and len(models) > 1

    def estimate(atoms: Atoms) -> float:
        prediction = predict_committee(
            models[1:] if reuse else models,
            [atoms],
            compute_forces=compute_forces,
            batch_size=1,
            device=device,
        )
        if reuse:
            prediction = _with_driving_member(prediction, atoms, compute_forces)
        return float(prediction.uncertainty(kind)[0])

    return estimate


def _with_driving_member(
    others: CommitteePrediction, atoms: Atoms, compute_forces: bool
) -> CommitteePrediction:
    """The other members' prediction of one structure, with member 0 read from the atoms'
    calculator (its cached results, recomputed only if the atoms moved) put first."""
    energy = atoms.calc.get_property("energy", atoms)
    energies = np.vstack([[[energy]], others.energies])
    forces = []
    if compute_forces:
        forces = [np.concatenate([[atoms.calc.get_property("forces", atoms)], others.forces[0]])]
    return _prediction([atoms], len(energies), [(energies, forces, None)])


def _prediction(frames: Sequence[Atoms], size: int, results: list[tuple]) -> CommitteePrediction:
    energies = np.concatenate([result[0] for result in results] or [np.zeros((size, 0))], axis=1)
    per_atom = energies / np.array([len(atoms) for atoms in frames])
    forces = [structure for result in results for structure in result[1]]
    features = [result[2] for result in results if result[2] is not None]
    return CommitteePrediction(
        energies=energies,
        energy_per_atom_mean=per_atom.mean(axis=0),
        energy_per_atom_std=per_atom.std(axis=0),
        forces=forces or None,
        descriptors=np.concatenate(features) if features else None,
    )


def out_of_sample_errors(
    models: Sequence[torch.nn.Module],
    frames: Sequence[Atoms],
    held_out: Sequence[set[int]],
    batch_size: int | None = None,
) -> dict[str, float]:
    """The committee's errors on frames its members never trained on (out of bag).

    ``held_out[m]`` holds the indices of the frames member m validated on; each such
    frame is predicted by the mean of the members that held it out. Energy MAE per atom
    (eV/atom), force MAE and RMSE (eV/A) over those frames, and how many there were.
    """
    indices = sorted(set().union(*held_out))
    if not indices:
        nan = float("nan")
        keys = ("energy_mae_per_atom", "force_mae", "force_rmse")
        return {f"validation_{key}": nan for key in keys} | {"validation_frames": 0}
    chosen = [frames[index] for index in indices]
    prediction = predict_committee(models, chosen, compute_forces=True, batch_size=batch_size)
    energy_errors, force_errors = [], []
    for column, (index, atoms) in enumerate(zip(indices, chosen, strict=True)):
        members = [m for m, frames_out in enumerate(held_out) if index in frames_out]
        energy = prediction.energies[members, column].mean()
        forces = prediction.forces[column][members].mean(axis=0)
        energy_errors.append(abs(energy - atoms.get_potential_energy()) / len(atoms))
        force_errors.append((forces - atoms.get_forces()).ravel())
    force_errors = np.concatenate(force_errors)
    return {
        "validation_energy_mae_per_atom": float(np.mean(energy_errors)),
        "validation_force_mae": float(np.abs(force_errors).mean()),
        "validation_force_rmse": float(np.sqrt((force_errors**2).mean())),
        "validation_frames": len(indices),
    }


def export_model(
    hyperparameters: dict, state_dict: Mapping[str, torch.Tensor], path: str | Path
) -> Path:
    """Write a member as a mace ``.model`` file (a pickled module, as mace-torch writes and
    reads them: ``MACECalculator(model_paths=[path])``, ``mace_eval_configs --model path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(load_member(hyperparameters, state_dict, device="cpu"), path)
    return path


def weights_to_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict as bytes (``torch.save``), moved to the CPU first."""
    buffer = io.BytesIO()
    torch.save({name: tensor.detach().cpu() for name, tensor in state_dict.items()}, buffer)
    return buffer.getvalue()


def weights_from_bytes(content: bytes) -> dict[str, torch.Tensor]:
    """A state dict from bytes, loaded with ``weights_only=True`` (no code runs)."""
    return torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)


def register_member(
    database: Database, record: ModelRecord, state_dict: Mapping[str, torch.Tensor]
) -> tuple[ModelRecord, bool]:
    """Register a trained member and its weights (see :func:`fff_jobs.database.register_member`);
    its generation becomes current once all its members are registered."""
    registration = registry.register_member(database, record, weights_to_bytes(state_dict))
    registry.publish_generation(database, record.campaign_id, record.generation)
    return registration


def load_weights(
    database: Database, document: ModelRecord, cache_directory: Path | None = None
) -> dict[str, torch.Tensor]:
    """The state dict of a registered member, checked against its sha256 (cached locally)."""
    return weights_from_bytes(registry.load_weights(database, document, cache_directory))


def load_committee(
    database: Database,
    campaign_id: str,
    generation: int | None = None,
    device: str = "auto",
    cache_directory: Path | None = None,
    healthy: bool = True,
    documents: Sequence[ModelRecord] | None = None,
) -> tuple[list[ModelRecord], list[torch.nn.Module]]:
    """Registry documents and rebuilt models of a committee (default: the current generation).

    ``healthy``: leave out members whose training diverged (they never sample, score
    frames or count in errors). ``documents``: the members' registry documents, if
    the caller read them already.
    """
    if documents is None:
        documents = registry.committee_documents(database, campaign_id, generation, healthy)
    elif healthy:
        documents = [document for document in documents if not document.diverged]
    models = [
        load_member(
            document.hyperparameters,
            load_weights(database, document, cache_directory),
            resolve_device(device),
        )
        for document in documents
    ]
    return list(documents), models


def export_model_files(
    database: Database,
    campaign_id: str,
    generation: int | None,
    member: int | None,
    output_dir: str | Path,
) -> list[Path]:
    """Write ``<model id>.model`` files for one member or (member None) the whole committee."""
    documents = registry.committee_documents(database, campaign_id, generation)
    if member is not None:
        documents = [document for document in documents if document.member == member]
        if not documents:
            raise registry.RegistryError(
                f"campaign {campaign_id!r} has no member {member} in that generation"
            )
    return [
        export_model(
            document.hyperparameters,
            load_weights(database, document),
            Path(output_dir) / f"{document.id}.model",
        )
        for document in documents
    ]
