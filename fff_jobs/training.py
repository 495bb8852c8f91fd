"""Training of one MACE committee member: build the model, prepare the data, fit with mace-torch.

Plain functions on ASE Atoms and torch models; nothing here knows of databases.
A labelled frame is an ``Atoms`` whose calculator holds its reference energy and
forces (a ``SinglePointCalculator`` or any ASE calculator), or, without a
calculator, ``atoms.info["energy"]`` and ``atoms.arrays["forces"]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.metadata
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import mace  # noqa: F401  (mace must be imported before e3nn)
import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols
from e3nn import o3
from mace import data as mace_data
from mace import modules
from mace.tools import AtomicNumberTable, torch_geometric
from mace.tools.scripts_utils import get_params_options
from mace.tools.train import evaluate, train_one_epoch
from torch_ema import ExponentialMovingAverage

from fff_jobs.spec import ModelSettings, TrainingSettings
from fff_jobs.structures import frame_labels

log = logging.getLogger(__name__)

INTERACTION = "RealAgnosticResidualInteractionBlock"
FIRST_INTERACTION = "RealAgnosticInteractionBlock"
PACKAGES = ("fff-jobs", "mace-torch", "torch", "e3nn", "ase", "numpy")
# A member that holds no frame out judges its epochs (best epoch, learning-rate plateaus)
# on every tenth of its training frames, the monitor frames: like validation frames they
# are scored with the weights kept after the epoch (their moving average), which the mean
# loss of the epoch's steps, taken on weights still changing, is not
MONITOR_STRIDE = 10
JudgedBy = Literal["validation", "monitor"]


class TrainingDataError(ValueError):
    """The training frames cannot be used: too few, or unlabelled, or not finite."""


class UnknownElementError(ValueError):
    """A structure holds an element the model was not built for."""


@dataclass
class TrainedMember:
    """One trained committee member, its best model and how it was obtained."""

    model: torch.nn.Module
    hyperparameters: dict
    seed: int
    metrics: dict[str, float]
    epochs: int
    best_epoch: int
    wall_time: float
    device: str
    warm_started: bool
    training_indices: list[int]
    validation_indices: list[int]
    history: list[dict[str, float]] = field(default_factory=list)


@contextlib.contextmanager
def default_dtype(dtype: str) -> Iterator[None]:
    """Set torch's default dtype (MACE builds models and data in it) and always restore it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def resolve_device(device: str = "auto") -> str:
    """``cuda`` when asked for or, with ``auto``, when present; ``cpu`` otherwise."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide what a trained model computes."""
    return {name: importlib.metadata.version(name) for name in PACKAGES}


def member_seed(committee_seed: int, generation: int, member: int, attempt: int = 0) -> int:
    """The seed of one member's training: distinct per (generation, member, attempt)."""
    entropy = [committee_seed, generation, member] + ([attempt] if attempt else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def check_training_frames(frames: Sequence[Atoms]) -> list[tuple[float, np.ndarray]]:
    """Labels of every frame; a clear error for too few frames or missing or non-finite labels."""
    if len(frames) < 2:
        raise TrainingDataError(
            f"a committee member needs at least 2 labelled frames (training and validation), "
            f"got {len(frames)}: compute more reference results first"
        )
    labels = []
    for index, atoms in enumerate(frames):
        try:
            energy, forces = frame_labels(atoms)
        except (KeyError, RuntimeError) as error:
            raise TrainingDataError(
                f"frame {index} ({atoms.get_chemical_formula()}) has no reference energy and "
                f"forces ({error!r}): label it or drop it from the training set"
            ) from None
        if not np.isfinite(energy) or not np.all(np.isfinite(forces)):
            raise TrainingDataError(
                f"frame {index} ({atoms.get_chemical_formula()}) has a NaN or infinite reference "
                f"energy or force: drop it from the training set or recompute it"
            )
        labels.append((energy, forces))
    return labels


def training_set_hash(frames: Sequence[Atoms]) -> str:
    """sha256 of the frames and their labels: equal training sets give equal hashes."""
    digest = hashlib.sha256()
    for atoms, (energy, forces) in zip(frames, check_training_frames(frames), strict=True):
        for array in (atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, forces):
            digest.update(np.ascontiguousarray(array, dtype=float).tobytes())
        digest.update(np.float64(energy).tobytes())
    return digest.hexdigest()


def _configuration(atoms: Atoms, label: tuple[float, np.ndarray] | None) -> mace_data.Configuration:
    properties = {"energy": label[0], "forces": label[1]} if label else {}
    return mace_data.Configuration(
        atomic_numbers=np.asarray(atoms.numbers),
        positions=np.asarray(atoms.positions),
        properties=properties,
        property_weights={name: 1.0 for name in properties},
        cell=np.asarray(atoms.cell.array),
        pbc=tuple(bool(flag) for flag in atoms.pbc),
    )


def check_elements(frames: Sequence[Atoms], elements: Sequence[int], model_name: str) -> None:
    """A clear error naming the first structure with an element outside ``elements``."""
    known = set(elements)
    for index, atoms in enumerate(frames):
        unknown = sorted(set(atoms.numbers.tolist()) - known)
        if unknown:
            raise UnknownElementError(
                f"structure {index} ({atoms.get_chemical_formula()}) holds "
                f"{', '.join(chemical_symbols[z] for z in unknown)}, which {model_name} was not "
                f"built for (it knows {', '.join(chemical_symbols[z] for z in elements)}): "
                f"add reference results with these elements to the training set and retrain"
            )


def to_atomic_data(
    frames: Sequence[Atoms],
    elements: Sequence[int],
    r_max: float,
    labels: Sequence[tuple[float, np.ndarray]] | None = None,
) -> list[mace_data.AtomicData]:
    """MACE graphs of the frames (in torch's current default dtype), labelled when given."""
    check_elements(frames, elements, "the model")
    table = AtomicNumberTable(list(elements))
    return [
        mace_data.AtomicData.from_config(
            _configuration(atoms, labels[index] if labels else None), z_table=table, cutoff=r_max
        )
        for index, atoms in enumerate(frames)
    ]


def fit_atomic_energies(
    frames: Sequence[Atoms], labels: Sequence[tuple[float, np.ndarray]], elements: Sequence[int]
) -> dict[int, float]:
    """Atomic reference energies (E0s) by least squares on the frames (mace-torch's own fit)."""
    configurations = [
        _configuration(atoms, label) for atoms, label in zip(frames, labels, strict=True)
    ]
    fitted = mace_data.compute_average_E0s(configurations, AtomicNumberTable(list(elements)))
    return {int(z): float(energy) for z, energy in fitted.items()}


def elements_of(frames: Sequence[Atoms]) -> list[int]:
    """Sorted atomic numbers present in the frames."""
    return sorted({int(z) for atoms in frames for z in atoms.numbers})


def _atomic_energies(
    settings: ModelSettings,
    frames: Sequence[Atoms],
    labels: Sequence[tuple[float, np.ndarray]],
    elements: list[int],
) -> list[float]:
    if settings.atomic_energies is None:
        fitted = fit_atomic_energies(frames, labels, elements)
        return [fitted[z] for z in elements]
    missing = [
        chemical_symbols[z] for z in elements if chemical_symbols[z] not in settings.atomic_energies
    ]
    if missing:
        raise TrainingDataError(
            f"model.atomic_energies lacks E0s for {', '.join(missing)}: add them or leave "
            f"atomic_energies unset to fit them on the training set"
        )
    return [float(settings.atomic_energies[chemical_symbols[z]]) for z in elements]


def model_hyperparameters(
    settings: ModelSettings,
    frames: Sequence[Atoms],
    labels: Sequence[tuple[float, np.ndarray]],
    elements: list[int] | None = None,
) -> dict:
    """Everything needed to rebuild a member: the settings plus statistics of its training data.

    ``elements`` (default: those in ``frames``) are the elements the model will know.
    """
    elements = elements or elements_of(frames)
    atomic_energies = _atomic_energies(settings, frames, labels, elements)
    with default_dtype(settings.dtype):
        loader = torch_geometric.dataloader.DataLoader(
            to_atomic_data(frames, elements, settings.r_max, labels), batch_size=50
        )
        avg_num_neighbors = float(modules.compute_avg_num_neighbors(loader))
        shift, scale = modules.scaling_classes["rms_forces_scaling"](
            loader, np.array(atomic_energies)
        )
    hidden = (settings.num_channels * o3.Irreps.spherical_harmonics(settings.max_L)).sort()
    return settings.model_dump(exclude={"atomic_energies", "num_channels", "max_L"}) | {
        "hidden_irreps": str(hidden.irreps.simplify()),
        "atomic_numbers": elements,
        "atomic_energies": atomic_energies,
        "avg_num_neighbors": avg_num_neighbors,
        "scale": float(np.atleast_1d(scale)[0]),
        "shift": float(np.atleast_1d(shift)[0]),
    }


def build_model(hyperparameters: dict) -> torch.nn.Module:
    """A freshly initialised MACE model (``ScaleShiftMACE``) from its hyperparameters."""
    h = hyperparameters
    with default_dtype(h["dtype"]):
        return modules.ScaleShiftMACE(
            r_max=h["r_max"],
            num_bessel=h["num_radial_basis"],
            num_polynomial_cutoff=h["num_cutoff_basis"],
            max_ell=h["max_ell"],
            interaction_cls=modules.interaction_classes[INTERACTION],
            interaction_cls_first=modules.interaction_classes[FIRST_INTERACTION],
            num_interactions=h["num_interactions"],
            num_elements=len(h["atomic_numbers"]),
            hidden_irreps=o3.Irreps(h["hidden_irreps"]),
            MLP_irreps=o3.Irreps(h["mlp_irreps"]),
            atomic_energies=np.array(h["atomic_energies"]),
            avg_num_neighbors=h["avg_num_neighbors"],
            atomic_numbers=h["atomic_numbers"],
            correlation=h["correlation"],
            gate=modules.gate_dict["silu"],
            radial_MLP=list(h["radial_mlp"]),
            atomic_inter_scale=h["scale"],
            atomic_inter_shift=h["shift"],
        )


def split_key(committee_seed: int, member: int) -> int:
    """The key of one member's split: the same in every generation, distinct per member."""
    return int(np.random.SeedSequence([committee_seed, member, 0x5B1]).generate_state(1)[0])


def _uniform(key: int, frame: str) -> float:
    """A number in [0, 1) fixed by the member's split key and the frame's name."""
    digest = hashlib.blake2b(f"{key}/{frame}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _poisson_one(uniform: float) -> int:
    """The Poisson(1) count whose cumulative probability first exceeds ``uniform``."""
    count, probability = 0, np.exp(-1.0)
    cumulative = probability
    while uniform >= cumulative and count < 20:
        count += 1
        probability /= count
        cumulative += probability
    return count


def fixed_split(
    frames: Sequence[str], key: int, split: str, validation_fraction: float
) -> tuple[list[int], list[int]]:
    """Training indices (repeated for a bootstrap) and validation indices of named frames.

    Where a frame goes is a fixed function of its name and the member's ``key``, so a
    frame keeps its place as the training set grows: a warm-started member has never
    trained on its validation frames. ``random`` holds out a frame with probability
    ``validation_fraction``; ``bootstrap`` draws each frame's count from Poisson(1) (the
    Poisson bootstrap) and validates on those drawn zero times. Each side keeps at least
    one frame: the lowest number validates, the highest trains.
    """
    draws = np.array([_uniform(key, frame) for frame in frames])
    if split == "random":
        counts = (draws >= validation_fraction).astype(int)
    else:
        counts = np.array([_poisson_one(draw) for draw in draws])
    if len(frames) >= 2 and not (counts == 0).any():
        counts[int(np.argmin(draws))] = 0
    if len(frames) >= 2 and not counts.any():
        counts[int(np.argmax(draws))] = 1
    training = [index for index, count in enumerate(counts) for _ in range(count)]
    return training, np.flatnonzero(counts == 0).tolist()


class _DiscardMetrics:
    """Stands in for mace's MetricsLogger: the history is kept by :func:`_fit` instead."""

    def log(self, record: dict) -> None:
        """Drop one record of per-step metrics."""


def _loss(settings: TrainingSettings) -> torch.nn.Module:
    if settings.loss == "mse":
        return modules.WeightedEnergyForcesLoss(settings.energy_weight, settings.forces_weight)
    # mace's Huber loss also has a stress term; molecules have none, so its weight is 0.
    return modules.WeightedHuberEnergyForcesStressLoss(
        settings.energy_weight, settings.forces_weight, 0.0, huber_delta=settings.huber_delta
    )


def _optimizer(model: torch.nn.Module, settings: TrainingSettings) -> torch.optim.Optimizer:
    """Adam (AMSGrad) with mace's parameter groups: weight decay on interactions and products."""
    arguments = argparse.Namespace(
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
        amsgrad=True,
        beta=0.9,
        lr_params_factors="{}",
        freeze=None,
    )
    return torch.optim.Adam(**get_params_options(arguments, model))


def _outputs(settings: TrainingSettings) -> dict[str, bool]:
    """What the model computes while training: energy, forces, stress for mace's Huber loss."""
    return {"energy": True, "forces": True, "virials": False, "stress": settings.loss == "huber"}


def _train_epoch(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    settings: TrainingSettings,
    epoch: int,
    ema: ExponentialMovingAverage | None,
) -> None:
    """One epoch of mace's ``train_one_epoch``, updating the moving average after each step."""
    train_one_epoch(
        model=model,
        loss_fn=loss_fn,
        data_loader=loader,
        optimizer=optimizer,
        epoch=epoch,
        output_args=_outputs(settings),
        max_grad_norm=settings.max_grad_norm,
        ema=ema,
        logger=_DiscardMetrics(),
        device=next(model.parameters()).device,
        distributed=False,
    )


def _validate(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    settings: TrainingSettings,
    epoch: int,
    judged_by: JudgedBy,
) -> dict[str, float]:
    """The loss and errors of the model's current weights on the frames epochs are judged
    by, named after them (``validation_loss``, ``monitor_loss``, ...)."""
    device = next(model.parameters()).device
    loss, metrics = evaluate(model, loss_fn, loader, _outputs(settings), device)
    return {
        "epoch": epoch,
        f"{judged_by}_loss": float(loss),
        f"{judged_by}_energy_mae_per_atom": float(metrics["mae_e_per_atom"]),
        f"{judged_by}_force_mae": float(metrics["mae_f"]),
    }


def epoch_loss(entry: Mapping[str, float]) -> float:
    """The loss an epoch of a member's history is judged by: on its validation frames, or
    on its monitor frames where it holds none out."""
    return entry.get("validation_loss", entry.get("monitor_loss", math.nan))


def _fit(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    loaders: tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader],
    settings: TrainingSettings,
    judged_by: JudgedBy,
) -> tuple[list[dict[str, float]], int]:
    """Train until the loss on the frames epochs are judged by (the second loader) stops
    improving; leave the best model in ``model``.

    mace's ``mace.tools.train.train`` would run this loop, but in mace-torch 0.3.16 its
    early stopping never ends a run outside distributed mode (ACEsuit/mace#1384) and it
    keeps no per-epoch history, so the epochs are driven here with mace's own
    ``train_one_epoch``, ``evaluate``, loss modules and optimizer parameter groups. With
    ``ema_decay``, as mace's ``--ema``, the weights validated and kept are the exponential
    moving average of the trained ones.
    """
    optimizer = _optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=settings.learning_rate_factor, patience=settings.scheduler_patience
    )
    ema = None
    if settings.ema_decay is not None:
        ema = ExponentialMovingAverage(model.parameters(), decay=settings.ema_decay)
    start, history = time.perf_counter(), []
    best_loss, best_epoch, best_state = np.inf, 0, copy.deepcopy(model.state_dict())
    for epoch in range(settings.max_epochs + 1):
        if epoch:
            _train_epoch(model, loss_fn, loaders[0], optimizer, settings, epoch, ema)
        with ema.average_parameters() if ema is not None else contextlib.nullcontext():
            entry = _validate(model, loss_fn, loaders[1], settings, epoch, judged_by)
            if epoch_loss(entry) < best_loss:
                best_loss, best_epoch = epoch_loss(entry), epoch
                best_state = copy.deepcopy(model.state_dict())
        history.append(entry | {"seconds": time.perf_counter() - start})
        if epoch:
            scheduler.step(epoch_loss(entry))
        if epoch - best_epoch >= settings.patience:
            break
    model.load_state_dict(best_state)
    return history, best_epoch


def _loaders(
    frames: Sequence[Atoms],
    labels: Sequence[tuple[float, np.ndarray]],
    split: tuple[list[int], list[int]],
    hyperparameters: dict,
    settings: TrainingSettings,
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """mace data loaders of the training frames (shuffled) and of the frames epochs are
    judged by (``split``: their indices)."""
    graphs = to_atomic_data(
        frames, hyperparameters["atomic_numbers"], hyperparameters["r_max"], labels
    )
    training, judged = split
    return (
        torch_geometric.dataloader.DataLoader(
            [graphs[i] for i in training], batch_size=settings.batch_size, shuffle=True
        ),
        torch_geometric.dataloader.DataLoader(
            [graphs[i] for i in judged], batch_size=settings.validation_batch_size
        ),
    )


def _final_metrics(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    loaders: tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader],
    settings: TrainingSettings,
    device: torch.device,
    judged_by: JudgedBy,
) -> dict[str, float]:
    """Energy MAE per atom (eV/atom) and force MAE (eV/A) of the best model on the
    training frames and on the validation frames (monitor frames are training frames)."""
    metrics = {}
    names = ("train", "validation") if judged_by == "validation" else ("train",)
    for name, loader in zip(names, loaders, strict=False):
        _, values = evaluate(model, loss_fn, loader, _outputs(settings), device)
        metrics[f"{name}_energy_mae_per_atom"] = float(values["mae_e_per_atom"])
        metrics[f"{name}_force_mae"] = float(values["mae_f"])
    return metrics


def _starting_point(
    settings: ModelSettings,
    frames: Sequence[Atoms],
    labels: Sequence[tuple[float, np.ndarray]],
    training: list[int],
    parent: tuple[dict, dict] | None,
) -> tuple[dict, dict | None]:
    """Hyperparameters and initial weights: the parent's (warm start) or fresh ones."""
    elements = elements_of(frames)
    if parent is not None and set(elements) <= set(parent[0]["atomic_numbers"]):
        return parent
    if parent is not None:
        log.warning(
            "warm start impossible: the training set has elements the parent model "
            "lacks; training this member from scratch"
        )
    training_frames = [frames[i] for i in training]
    hyperparameters = model_hyperparameters(
        settings, training_frames, [labels[i] for i in training], elements
    )
    return hyperparameters, None


def train_member(
    frames: Sequence[Atoms],
    model_settings: ModelSettings,
    training_settings: TrainingSettings,
    seed: int,
    parent: tuple[dict, dict] | None = None,
    split: tuple[list[int], list[int]] | None = None,
) -> TrainedMember:
    """Train one committee member on its own split of ``frames``; keep its best model.

    ``parent`` (hyperparameters, state dict) warm-starts it from a member of the
    previous generation, whose architecture and E0s it then keeps. ``split`` gives the
    training and validation indices (default: :func:`fixed_split` of the frames'
    positions, keyed by ``seed``); with no validation index, epochs are judged on the
    monitor frames (``MONITOR_STRIDE``).
    """
    start = time.perf_counter()
    labels = check_training_frames(frames)
    settings = training_settings
    if split is None:
        names = [str(index) for index in range(len(frames))]
        split = fixed_split(names, seed, settings.split, settings.validation_fraction)
    torch.manual_seed(seed)
    hyperparameters, state = _starting_point(model_settings, frames, labels, split[0], parent)
    model = build_model(hyperparameters)
    if state is not None:
        model.load_state_dict(state)
        # fine-tuning: at the full rate the first epochs undo what the parent learnt
        # (validation force MAE 0.046 -> 0.34 eV/A in one epoch, benchmarks/committee.py)
        rate = settings.learning_rate * settings.warm_start_learning_rate_factor
        settings = settings.model_copy(update={"learning_rate": rate})
    device = torch.device(resolve_device(settings.device))
    with default_dtype(hyperparameters["dtype"]):
        judged_by = "validation" if split[1] else "monitor"
        judged = split[1] or sorted(set(split[0]))[::MONITOR_STRIDE]
        loaders = _loaders(frames, labels, (split[0], judged), hyperparameters, settings)
        model.to(device)
        loss_fn = _loss(settings).to(device)
        history, best_epoch = _fit(model, loss_fn, loaders, settings, judged_by)
        metrics = _final_metrics(model, loss_fn, loaders, settings, device, judged_by)
    return TrainedMember(
        model=model.to("cpu").eval(),
        hyperparameters=hyperparameters,
        seed=seed,
        metrics=metrics,
        epochs=history[-1]["epoch"],
        best_epoch=best_epoch,
        wall_time=time.perf_counter() - start,
        device=device.type,
        warm_started=state is not None,
        training_indices=split[0],
        validation_indices=split[1],
        history=history,
    )
