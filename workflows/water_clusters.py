"""Starting data for a water-cluster campaign: a search space and an initial training set.

Copy this file and edit the settings below. Running it writes two extxyz files:
`search_space.extxyz` (starting structures of MD trajectories) and
`initial_training_set.extxyz` (rattled copies and short-MD frames of them, labelled by
the reference; failed calculations are left out and counted).

    OMP_NUM_THREADS=2 python workflows/water_clusters.py --output-dir data/

A different `--seed` gives clusters and frames a campaign never saw: a hold-out set for
`fff report CAMPAIGN --holdout data/initial_training_set.extxyz`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ase.io

from fff_jobs.spec import MDSettings, ReferenceSettings, WaterClusterSettings
from fff_jobs.structures import initial_training_set

WATERS = WaterClusterSettings(min_waters=3, max_waters=8, structures_per_size=4)
REFERENCE = ReferenceSettings(code="xtb", method="GFN2-xTB")
SHORT_MD = MDSettings(temperature=300.0, timestep=0.5)


def main(output_dir: Path, seed: int) -> None:
    """Build, label and write the starting data."""
    output_dir.mkdir(parents=True, exist_ok=True)
    waters = WATERS.model_copy(update={"seed": seed})
    search_space, results = initial_training_set(waters, REFERENCE, SHORT_MD)
    labelled = [result.to_atoms() for result in results if result.success]
    ase.io.write(output_dir / "search_space.extxyz", search_space, format="extxyz")
    ase.io.write(output_dir / "initial_training_set.extxyz", labelled, format="extxyz")
    failed = len(results) - len(labelled)
    print(
        f"{len(search_space)} starting structures, {len(labelled)} labelled frames "
        f"({failed} failed calculations left out) in {output_dir}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("."))
    parser.add_argument("--seed", type=int, default=WATERS.seed, help="of clusters and frames")
    arguments = parser.parse_args()
    main(arguments.output_dir, arguments.seed)
