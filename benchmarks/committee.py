"""Benchmark of the MACE committee: batched inference, warm start, training throughput.

Run: ``.venv/bin/python benchmarks/committee.py [--quick]``. Prints a table and
writes ``benchmarks/results/committee.json``. Data: random water clusters of 3-10
rigid-ish waters, rattled, labelled with GFN2-xTB (tblite).

(a) 8 members (the default 33k-parameter model, float64), N frames: structures/s of
    :func:`fff_jobs.committee.predict_committee` (energies and descriptors, as selection
    uses it; and energies with forces) against a loop of
    ``MACECalculator(model_paths=[8 files])`` over the same frames (energy, forces and
    stress of every member), and the peak resident memory of the process during each.
(b) generation g+1 on the same data, cold start against warm start from
    generation g: epochs and seconds to reach the validation force MAE that the cold
    start reaches at its best epoch.
(c) seconds per epoch (training plus validation) of the default model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from mace.calculators import MACECalculator
from tblite.ase import TBLite

from fff_jobs.committee import export_model, predict_committee
from fff_jobs.spec import ModelSettings, TrainingSettings
from fff_jobs.training import (
    build_model,
    check_training_frames,
    model_hyperparameters,
    train_member,
)

RESULTS = Path(__file__).parent / "results" / "committee.json"
WATER = np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.2399872, 0.9266272, 0.0]])


def water_cluster(rng: np.random.Generator, waters: int, rattle: float = 0.05) -> Atoms:
    """Randomly oriented waters, oxygens at least 2.6 A apart, every atom rattled."""
    oxygens: list[np.ndarray] = []
    radius = 1.6 * waters ** (1 / 3) + 1.0
    while len(oxygens) < waters:
        candidate = rng.uniform(-radius, radius, 3)
        if all(np.linalg.norm(candidate - other) > 2.6 for other in oxygens):
            oxygens.append(candidate)
    positions = []
    for oxygen in oxygens:
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        positions.extend(oxygen + WATER @ rotation.T)
    atoms = Atoms("OH2" * waters, positions=np.array(positions))
    atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
    return atoms


def water_frames(count: int, seed: int, labelled: bool) -> list[Atoms]:
    """Clusters of 3-10 waters; with GFN2-xTB energies and forces when ``labelled``."""
    rng = np.random.default_rng(seed)
    frames = [water_cluster(rng, int(rng.integers(3, 11))) for _ in range(count)]
    if labelled:
        for atoms in frames:
            atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
            energy, forces = atoms.get_potential_energy(), atoms.get_forces()
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return frames


class PeakMemory:
    """Peak resident memory (MiB) of this process while the block runs, sampled every 5 ms."""

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = self._rss()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join()

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)


def _best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The shortest of ``repeats`` timed runs (other processes share this machine)."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return min(timings)


def inference(frames: list[Atoms], labelled: list[Atoms], members: int, repeats: int) -> dict:
    """(a) Batched committee inference against a loop of MACECalculator calls (best of runs)."""
    hyperparameters = model_hyperparameters(
        ModelSettings(), labelled, check_training_frames(labelled)
    )
    models = []
    for seed in range(members):
        torch.manual_seed(seed)
        models.append(build_model(hyperparameters).eval())
    figures: dict[str, float] = {"members": members, "frames": len(frames), "repeats": repeats}
    predict_committee(models, frames[:8])
    for name, forces in (("batched_energy", False), ("batched_energy_forces", True)):
        with PeakMemory() as memory:
            seconds = _best_seconds(
                lambda forces=forces: predict_committee(
                    models, frames, compute_forces=forces, descriptors=not forces
                ),
                repeats,
            )
        figures[f"{name}_structures_per_s"] = len(frames) / seconds
        figures[f"{name}_peak_rss_mib"] = memory.peak
        figures[f"{name}_rss_increase_mib"] = memory.peak - memory.start
    with tempfile.TemporaryDirectory() as directory:
        paths = [
            str(export_model(hyperparameters, model.state_dict(), f"{directory}/{index}.model"))
            for index, model in enumerate(models)
        ]
        calculator = MACECalculator(model_paths=paths, device="cpu")
        with PeakMemory() as memory:
            seconds = _best_seconds(
                lambda: [calculator.calculate(atoms) for atoms in frames], repeats
            )
        figures["calculator_structures_per_s"] = len(frames) / seconds
        figures["calculator_peak_rss_mib"] = memory.peak
        figures["calculator_rss_increase_mib"] = memory.peak - memory.start
    for name in ("batched_energy", "batched_energy_forces"):
        speedup = figures[f"{name}_structures_per_s"] / figures["calculator_structures_per_s"]
        figures[f"{name}_speedup"] = speedup
    return figures


def _reached(history: list[dict], target: float) -> dict | None:
    """The first epoch whose validation force MAE is at or below ``target``."""
    return next((entry for entry in history if entry["validation_force_mae"] <= target), None)


def warm_start(old: list[Atoms], new: list[Atoms], settings: TrainingSettings) -> dict:
    """(b) Generation g+1 cold against warm started from generation g, (c) seconds per epoch."""
    model = ModelSettings()
    parent = train_member(old, model, settings, seed=1)
    weights = (parent.hyperparameters, parent.model.state_dict())
    cold = train_member(old + new, model, settings, seed=2)
    warm = train_member(old + new, model, settings, seed=2, parent=weights)
    target = cold.history[cold.best_epoch]
    reached = _reached(warm.history, target["validation_force_mae"])
    history = cold.history
    return {
        "generation_g_frames": len(old),
        "generation_g1_frames": len(old + new),
        "cold_best_validation_force_mae": target["validation_force_mae"],
        "cold_epochs_to_best": target["epoch"],
        "cold_seconds_to_best": target["seconds"],
        "cold_epochs_run": cold.epochs,
        "warm_epochs_to_cold_mae": reached["epoch"] if reached else None,
        "warm_seconds_to_cold_mae": reached["seconds"] if reached else None,
        "warm_epochs_run": warm.epochs,
        "warm_best_validation_force_mae": warm.metrics["validation_force_mae"],
        "warm_over_cold_seconds": reached["seconds"] / target["seconds"] if reached else None,
        "seconds_per_epoch": (history[-1]["seconds"] - history[0]["seconds"]) / cold.epochs,
        "training_frames_per_epoch": len(cold.training_indices),
        "validation_frames": len(cold.validation_indices),
        "model_parameters": sum(p.numel() for p in cold.model.parameters()),
        "batch_size": settings.batch_size,
    }


def print_table(figures: dict) -> None:
    """The figures as an aligned two-column table."""
    for section, values in figures.items():
        print(f"\n[{section}]")
        for key, value in values.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            print(f"  {key:<36} {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames and epochs")
    quick = parser.parse_args().quick
    start = time.perf_counter()
    old = water_frames(30 if quick else 60, seed=0, labelled=True)
    new = water_frames(15 if quick else 30, seed=1, labelled=True)
    label_seconds = time.perf_counter() - start
    settings = TrainingSettings(max_epochs=15 if quick else 120, patience=5 if quick else 20)
    frames = water_frames(100 if quick else 500, seed=2, labelled=False)
    figures = {
        "setup": {
            "torch_threads": torch.get_num_threads(),
            "load_average_1min_at_start": os.getloadavg()[0],
            "quick": quick,
            "xtb_labelling_seconds": label_seconds,
        },
        "inference": inference(frames, old, members=8, repeats=1 if quick else 2),
        "warm_start": warm_start(old, new, settings),
    }
    figures["setup"]["load_average_1min_at_end"] = os.getloadavg()[0]
    figures["setup"]["total_seconds"] = time.perf_counter() - start
    print_table(figures)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
