"""Structures for a campaign: frames as documents, users' files read with checks, water clusters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import ase.db
import ase.io
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import chemical_symbols
from ase.neighborlist import neighbor_list
from scipy.spatial.transform import Rotation

from fff_jobs.schemas import Frame, ReferenceResult
from fff_jobs.spec import (
    MDSettings,
    ReferenceSettings,
    StructureSettings,
    SystemSettings,
    WaterClusterSettings,
)

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator

OH_BOND = 0.96  # A
HOH_ANGLE = 104.5  # degrees
ASE_DB_SUFFIXES = (".db", ".json")
# A trajectory document holds three frames with velocities (about 300 bytes per atom in
# BSON): 10^4 atoms keep it near 3 MB, far below MongoDB's 16 MB document limit.
MAX_ATOMS = 10_000


class StructureError(ValueError):
    """A structure that cannot be used; the message names the file and the structure index."""


def frame_labels(atoms: Atoms) -> tuple[float, np.ndarray]:
    """Reference energy (eV) and forces (eV/A) of a labelled frame; KeyError if it has none."""
    if atoms.calc is not None:
        return float(atoms.get_potential_energy()), np.asarray(atoms.get_forces(), dtype=float)
    return float(atoms.info["energy"]), np.asarray(atoms.arrays["forces"], dtype=float)


class LabelledFrame(Frame):
    """A frame with its reference energy (eV) and forces (eV/A), if it has them."""

    energy: float | None = None
    forces: list[list[float]] | None = None

    @classmethod
    def from_atoms(cls, atoms: Atoms, velocities: bool = False) -> LabelledFrame:
        """Document of an Atoms object and its labels (none if it is unlabelled)."""
        frame = super().from_atoms(atoms, velocities)
        with contextlib.suppress(KeyError, RuntimeError):
            energy, forces = frame_labels(atoms)
            frame.energy, frame.forces = energy, forces.tolist()
        return frame

    def to_atoms(self) -> Atoms:
        """The Atoms object, its labels in a SinglePointCalculator."""
        atoms = super().to_atoms()
        if self.energy is not None:
            atoms.calc = SinglePointCalculator(
                atoms, energy=self.energy, forces=np.array(self.forces)
            )
        return atoms


def check_structure(atoms: Atoms, settings: StructureSettings, where: str) -> None:
    """Raise StructureError, naming `where`: no atoms, unknown elements, empty cell, overlaps."""
    if len(atoms) == 0:
        raise StructureError(f"{where}: has no atoms")
    if len(atoms) > MAX_ATOMS:
        raise StructureError(
            f"{where}: has {len(atoms)} atoms, more than the {MAX_ATOMS} fff supports (frames "
            "travel in MongoDB documents of at most 16 MB); cut a smaller cluster from it"
        )
    _check_elements(atoms, settings.elements, where)
    if not np.isfinite(atoms.positions).all():
        raise StructureError(f"{where}: has non-finite positions")
    _check_cell(atoms, where)
    first, second, distance = neighbor_list("ijd", atoms, settings.min_distance)
    if len(distance):
        k = int(np.argmin(distance))
        raise StructureError(
            f"{where}: atoms {first[k]} and {second[k]} overlap, {distance[k]:.3f} A apart "
            f"(below min_distance {settings.min_distance} A); fix or drop this structure"
        )


def _check_elements(atoms: Atoms, elements: list[str] | None, where: str) -> None:
    unknown = sorted({int(z) for z in atoms.numbers if z < 1 or z >= len(chemical_symbols)})
    if unknown:
        raise StructureError(f"{where}: unknown atomic numbers {unknown}")
    if elements is not None:
        extra = sorted(set(atoms.get_chemical_symbols()) - set(elements))
        if extra:
            raise StructureError(f"{where}: elements {extra} are not among {sorted(elements)}")


def _check_cell(atoms: Atoms, where: str) -> None:
    lengths = atoms.cell.lengths()
    empty = [axis for axis, periodic in zip("xyz", atoms.pbc, strict=True) if periodic]
    empty = [axis for axis in empty if lengths["xyz".index(axis)] < 1e-6]
    if empty:
        raise StructureError(
            f"{where}: periodic along {', '.join(empty)} but the cell vector there is empty; "
            "give the cell (extxyz Lattice=...) or set pbc to False"
        )
    if atoms.pbc.all() and atoms.cell.volume < 1e-6:
        raise StructureError(f"{where}: periodic cell has zero volume")


def read_structures(path: str | Path, settings: StructureSettings | None = None) -> list[Atoms]:
    """Read and check every structure of an extxyz file or ASE database (.db, .json)."""
    path = Path(path)
    settings = settings or StructureSettings()
    if not path.is_file():
        raise StructureError(f"{path}: no such file")
    reader = _read_ase_db if path.suffix in ASE_DB_SUFFIXES else _read_extxyz
    structures: list[Atoms] = []
    try:
        for atoms in reader(path):
            structures.append(atoms)
    except Exception as error:
        raise StructureError(
            f"{path}: structure {len(structures)} cannot be read ({type(error).__name__}: {error})"
        ) from error
    if not structures:
        raise StructureError(f"{path}: holds no structures")
    for index, atoms in enumerate(structures):
        check_structure(atoms, settings, f"{path}: structure {index}")
    return structures


def _read_extxyz(path: Path) -> Iterator[Atoms]:
    yield from ase.io.iread(path, index=":", format="extxyz")


def _read_ase_db(path: Path) -> Iterator[Atoms]:
    with ase.db.connect(path) as database:
        for row in database.select():
            yield row.toatoms(add_additional_information=False)


def water_molecule() -> Atoms:
    """One water molecule, O at the origin: O-H 0.96 A, H-O-H 104.5 degrees."""
    angle = np.radians(HOH_ANGLE)
    hydrogens = OH_BOND * np.array([[1.0, 0.0, 0.0], [np.cos(angle), np.sin(angle), 0.0]])
    return Atoms("OH2", positions=np.vstack([np.zeros(3), hydrogens]))


def water_cluster(n_waters: int, settings: WaterClusterSettings, rng: np.random.Generator) -> Atoms:
    """A compact cluster: oxygens on a jittered cubic grid, molecules randomly oriented."""
    sites = _oxygen_sites(n_waters, settings, rng)
    molecule = water_molecule()
    molecule.positions -= molecule.get_center_of_mass()
    cluster = Atoms()
    for site in sites:
        cluster += _place_molecule(molecule, site, cluster, settings, rng)
    cluster.positions -= cluster.get_center_of_mass()
    cluster.info["name"] = f"water-{n_waters}"
    return cluster


def _oxygen_sites(
    n_waters: int, settings: WaterClusterSettings, rng: np.random.Generator
) -> np.ndarray:
    side = int(np.ceil(n_waters ** (1 / 3))) + 1
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    grid = grid * settings.oxygen_spacing
    centre = grid.mean(axis=0) + rng.normal(scale=0.3 * settings.oxygen_spacing, size=3)
    nearest = np.argsort(np.linalg.norm(grid - centre, axis=1), kind="stable")[:n_waters]
    return grid[nearest] + rng.uniform(-settings.jitter, settings.jitter, (n_waters, 3))


def _place_molecule(
    molecule: Atoms,
    site: np.ndarray,
    cluster: Atoms,
    settings: WaterClusterSettings,
    rng: np.random.Generator,
    attempts: int = 200,
) -> Atoms:
    """A randomly rotated copy at `site`, no closer than 1.5 A to atoms already placed."""
    for _ in range(attempts):
        placed = molecule.copy()
        placed.positions = Rotation.random(rng=rng).apply(molecule.positions) + site
        if len(cluster) == 0:
            return placed
        gaps = np.linalg.norm(placed.positions[:, None] - cluster.positions[None], axis=-1)
        if gaps.min() >= settings.min_intermolecular_distance:
            return placed
    raise StructureError(
        f"no orientation keeps a water {settings.min_intermolecular_distance} A from its "
        "neighbours; increase oxygen_spacing or lower jitter"
    )


def water_search_space(settings: WaterClusterSettings) -> list[Atoms]:
    """Starting structures: `structures_per_size` clusters for each size in the range."""
    rng = np.random.default_rng(settings.seed)
    structures = []
    for n_waters in range(settings.min_waters, settings.max_waters + 1):
        for copy in range(settings.structures_per_size):
            cluster = water_cluster(n_waters, settings, rng)
            cluster.info["name"] = f"water-{n_waters}-{copy}"
            structures.append(cluster)
    return structures


def rattled(atoms: Atoms, count: int, stdev: float, rng: np.random.Generator) -> list[Atoms]:
    """Copies of a structure with Gaussian noise (standard deviation `stdev`, A) on positions."""
    copies = []
    for index in range(count):
        copy = atoms.copy()
        copy.positions += rng.normal(scale=stdev, size=copy.positions.shape)
        copy.info["name"] = f"{atoms.info.get('name', 'structure')}-rattled-{index}"
        copies.append(copy)
    return copies


def initial_frames(
    search_space: list[Atoms],
    settings: WaterClusterSettings,
    md: MDSettings,
    calculator: Calculator,
) -> list[Atoms]:
    """Each starting structure, its rattled copies and frames of a short MD with `calculator`."""
    from fff_jobs.sampling import run_segment

    rng = np.random.default_rng(settings.seed)
    frames: list[Atoms] = []
    for index, atoms in enumerate(search_space):
        frames.append(atoms.copy())
        frames += rattled(atoms, settings.rattled_per_structure, settings.rattle_stdev, rng)
        if settings.md_frames_per_structure == 0:
            continue
        segment = run_segment(
            atoms,
            calculator,
            md,
            num_steps=settings.md_steps,
            num_frames=settings.md_frames_per_structure,
            seed=settings.seed + index,
        )
        name = atoms.info.get("name", "structure")
        frames += [_md_frame(frame, f"{name}-md-{k}") for k, frame in enumerate(segment.frames)]
    return frames


def _md_frame(frame: Frame, name: str) -> Atoms:
    """An MD frame as a structure to label: no velocities, a name that says where it came from."""
    return frame.model_copy(update={"velocities": None, "info": {"name": name}}).to_atoms()


def initial_training_set(
    settings: WaterClusterSettings, reference: ReferenceSettings, md: MDSettings
) -> tuple[list[Atoms], list[ReferenceResult]]:
    """The water search space and its initial training set, labelled by the reference."""
    from fff_jobs.reference import compute_references, make_calculator

    search_space = water_search_space(settings)
    frames = initial_frames(search_space, settings, md, make_calculator(reference))
    return search_space, compute_references(frames, reference)


def starting_data(system: SystemSettings) -> tuple[list[Frame], list[Frame]]:
    """A campaign's starting structures and the frames the user labelled for generation 0,
    checked (at submit: the only time files are read). Water clusters are generated here;
    their initial data comes later, from the reference (:func:`initial_frames`)."""
    if system.water_clusters is not None:
        return [Frame.from_atoms(atoms) for atoms in water_search_space(system.water_clusters)], []
    starting = read_structures(system.starting_structures, system.structures)
    initial = read_structures(system.initial_data, system.structures)
    return [Frame.from_atoms(atoms) for atoms in starting], [
        Frame.from_atoms(atoms) for atoms in initial
    ]
