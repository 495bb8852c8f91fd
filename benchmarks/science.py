"""Benchmark of the science of the loop: guarded MD, selection, xTB reference cost.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/science.py [--quick]``. Prints a
table and writes ``benchmarks/results/science.json``.

(a) MD steps/s of :func:`fff_jobs.sampling.run_segment` (guards every step, frames
    kept) against plain ASE ``VelocityVerlet`` with the same ``MACECalculator``
    (a tiny untrained ScaleShiftMACE, float64, CPU) on the same water cluster;
    runs alternate, best of the repeats.
(a') the same with a calculator that costs nothing: the guards' microseconds per step.
(b) seconds to select a batch from 10^5 candidates x 8 committee members (spread
    heuristic), and farthest-point selection over 10^5 x 64 descriptors.
(c) seconds per GFN2-xTB reference calculation (tblite) for clusters of 3-20 waters.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import mace  # noqa: F401  (before e3nn)
import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.md.verlet import VelocityVerlet
from e3nn import o3
from mace import modules
from mace.calculators import MACECalculator

from fff_jobs.reference import compute_references
from fff_jobs.sampling import make_dynamics, run_segment
from fff_jobs.selection import committee_spread, select_by_spread, select_farthest_point
from fff_jobs.spec import MDSettings, ReferenceSettings, WaterClusterSettings
from fff_jobs.structures import water_cluster

RESULTS = Path(__file__).parent / "results" / "science.json"
# The model is untrained, so its dynamics are unphysical: the guards run at every step
# (the cost measured) with thresholds that let them pass, and steps are short.
BENCHMARK_MD = MDSettings(timestep=0.1, max_force=1e6, min_distance=0.01, fragment_distance=100)


def tiny_mace_model(path: Path) -> Path:
    """An untrained ScaleShiftMACE for H and O (16x0e, two interactions), saved whole."""
    torch.manual_seed(0)
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=2, interaction_cls=block,
        interaction_cls_first=block, num_interactions=2, num_elements=2,
        hidden_irreps=o3.Irreps("16x0e"), MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.array([-10.707, -102.522]), avg_num_neighbors=8.0,
        atomic_numbers=[1, 8], correlation=2, gate=torch.nn.functional.silu,
        atomic_inter_scale=1.0, atomic_inter_shift=0.0,
    )  # fmt: skip
    torch.save(model, path)
    return path


def clusters(n_waters: int, count: int, seed: int = 0) -> list[Atoms]:
    """`count` water clusters of `n_waters` from the project's own builder."""
    settings = WaterClusterSettings(min_waters=n_waters, max_waters=n_waters, seed=seed)
    rng = np.random.default_rng(seed)
    return [water_cluster(n_waters, settings, rng) for _ in range(count)]


def plain_verlet(atoms: Atoms, calculator: Calculator, steps: int) -> float:
    """Steps/s of ASE VelocityVerlet alone, from the same velocities as the sampler."""
    work = atoms.copy()
    work.calc = calculator
    dynamics = make_dynamics(work, BENCHMARK_MD, seed=0)
    dynamics = VelocityVerlet(work, dynamics.dt)
    start = time.perf_counter()
    dynamics.run(steps)
    return steps / (time.perf_counter() - start)


def guarded_segment(atoms: Atoms, calculator: Calculator, steps: int) -> float:
    """Steps/s of run_segment: guards every step, 10 frames kept."""
    start = time.perf_counter()
    segment = run_segment(atoms, calculator, BENCHMARK_MD, num_steps=steps, num_frames=10)
    elapsed = time.perf_counter() - start
    assert segment.steps == steps, segment.detail
    return steps / elapsed


def md_throughput(quick: bool) -> list[dict]:
    """(a) sampler against plain ASE VelocityVerlet, for a small and a larger cluster."""
    rows = []
    steps, repeats = (50, 2) if quick else (100, 3)
    with tempfile.TemporaryDirectory() as directory:
        path = tiny_mace_model(Path(directory) / "tiny.model")
        calculator = MACECalculator(model_paths=[str(path)], device="cpu", default_dtype="float64")
        for n_waters in (6,) if quick else (6, 32):
            atoms = clusters(n_waters, 1)[0]
            guarded_segment(atoms, calculator, 5)  # warm-up
            plain, guarded = [], []
            for _ in range(repeats):
                plain.append(plain_verlet(atoms, calculator, steps))
                guarded.append(guarded_segment(atoms, calculator, steps))
            rows.append(
                {
                    "atoms": len(atoms),
                    "steps": steps,
                    "plain_steps_per_s": max(plain),
                    "sampler_steps_per_s": max(guarded),
                    "ratio": max(guarded) / max(plain),
                }
            )
    return rows


class NoForces(Calculator):
    """Free particles at no cost: what remains of a step is the integrator and the guards."""

    implemented_properties = ("energy", "forces")

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """Zero energy and forces."""
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": 0.0, "forces": np.zeros((len(self.atoms), 3))}


def guard_overhead(quick: bool) -> list[dict]:
    """(a') microseconds per step the guards and frame keeping add, with a free calculator."""
    rows = []
    steps = 200 if quick else 1000
    for n_waters in (6, 32, 64):
        atoms = clusters(n_waters, 1)[0]
        plain = 1 / plain_verlet(atoms, NoForces(), steps)
        guarded = 1 / guarded_segment(atoms, NoForces(), steps)
        rows.append(
            {
                "atoms": len(atoms),
                "plain_us_per_step": 1e6 * plain,
                "sampler_us_per_step": 1e6 * guarded,
                "overhead_us_per_step": 1e6 * (guarded - plain),
            }
        )
    return rows


def selection_timing(quick: bool) -> list[dict]:
    """(b) 10^5 candidates x 8 members, spread heuristic and farthest point."""
    rng = np.random.default_rng(0)
    n = 100_000
    energies = rng.normal(size=(n, 8)) * rng.uniform(1e-3, 1e-2, size=(n, 1))
    descriptors = rng.normal(size=(n, 64))
    spread = committee_spread(energies)
    rows = []
    for batch in (16, 100) if quick else (16, 100, 1000):
        start = time.perf_counter()
        picked = select_by_spread(energies, batch)
        rows.append(_selection_row("spread", n, batch, len(picked), start))
    for batch in (16,) if quick else (16, 100):
        start = time.perf_counter()
        picked = select_farthest_point(descriptors, spread, batch)
        rows.append(_selection_row("farthest_point (d=64)", n, batch, len(picked), start))
    return rows


def _selection_row(method: str, n: int, batch: int, picked: int, start: float) -> dict:
    return {
        "method": method,
        "candidates": n,
        "batch": batch,
        "picked": picked,
        "seconds": time.perf_counter() - start,
    }


def xtb_cost(quick: bool) -> list[dict]:
    """(c) GFN2-xTB seconds per structure (median wall time of successful results)."""
    rows = []
    for n_waters in (3, 6, 10) if quick else (3, 6, 10, 15, 20):
        results = compute_references(clusters(n_waters, 3 if quick else 5), ReferenceSettings())
        times = [r.wall_time for r in results if r.success]
        rows.append(
            {
                "waters": n_waters,
                "atoms": 3 * n_waters,
                "succeeded": f"{len(times)}/{len(results)}",
                "seconds_per_structure": float(np.median(times)),
            }
        )
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    """A plain text table of dict rows."""
    print(f"\n{title}")
    keys = list(rows[0])
    print("  ".join(f"{k:>22}" for k in keys))
    for row in rows:
        cells = [f"{v:>22.4g}" if isinstance(v, float) else f"{v!s:>22}" for v in row.values()]
        print("  ".join(cells))


def main() -> None:
    """Run the three benchmarks, print them and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and sizes")
    parser.add_argument("--output", type=Path, default=RESULTS)
    arguments = parser.parse_args()
    threads = {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.get_num_threads(),
    }
    results = {
        "threads": threads,
        "md": md_throughput(arguments.quick),
        "guard_overhead": guard_overhead(arguments.quick),
        "selection": selection_timing(arguments.quick),
        "xtb": xtb_cost(arguments.quick),
    }
    print(f"threads: {threads}")
    print_table(
        "(a) MD with MACE (CPU, float64): sampler with guards vs plain VelocityVerlet",
        results["md"],
    )
    print_table(
        "(a') guard overhead per step (free-particle calculator)", results["guard_overhead"]
    )
    print_table("(b) selection", results["selection"])
    print_table("(c) GFN2-xTB reference cost", results["xtb"])
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {arguments.output}")


if __name__ == "__main__":
    main()
