"""Starting structures: sensible water clusters; users' files read with clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms

from fff_jobs.spec import (
    MDSettings,
    ReferenceSettings,
    StructureSettings,
    WaterClusterSettings,
)
from fff_jobs.structures import (
    Frame,
    StructureError,
    check_structure,
    initial_training_set,
    read_structures,
    water_molecule,
    water_search_space,
)


@pytest.fixture(autouse=True, scope="module")
def _one_openmp_thread():
    """xTB and PySCF on one OpenMP thread: on a busy 2-core machine two threads run 100x slower.

    OpenMP reads OMP_NUM_THREADS when tblite first loads, which happens inside the tests.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def test_water_molecule_has_the_textbook_geometry():
    water = water_molecule()
    assert water.get_chemical_symbols() == ["O", "H", "H"]
    assert water.get_distance(0, 1) == pytest.approx(0.96)
    assert water.get_distance(0, 2) == pytest.approx(0.96)
    assert water.get_angle(1, 0, 2) == pytest.approx(104.5)


def test_search_space_holds_compact_clusters_of_intact_waters_without_overlaps():
    settings = WaterClusterSettings(min_waters=3, max_waters=10, structures_per_size=3, seed=7)
    space = water_search_space(settings)
    sizes = [len(atoms) // 3 for atoms in space]
    assert sizes == [n for n in range(3, 11) for _ in range(3)]
    for atoms in space:
        check_structure(atoms, StructureSettings(min_distance=0.9), atoms.info["name"])
        oxygens = atoms.positions[::3]
        hydrogens = atoms.positions.reshape(-1, 3, 3)[:, 1:]
        bonds = np.linalg.norm(hydrogens - oxygens[:, None], axis=-1)
        assert np.allclose(bonds, 0.96)  # every water intact, no hydrogen swapped
        oo = np.linalg.norm(oxygens[:, None] - oxygens[None], axis=-1)
        np.fill_diagonal(oo, np.inf)
        assert oo.min() >= 2.8 - 2 * np.sqrt(3) * settings.jitter
        assert oo.min(axis=1).max() < 2.8 * np.sqrt(2) + 0.6  # each water has a close neighbour
        intermolecular = np.linalg.norm(atoms.positions[:, None] - atoms.positions[None], axis=-1)
        same_molecule = np.arange(len(atoms))[:, None] // 3 == np.arange(len(atoms))[None] // 3
        assert intermolecular[~same_molecule].min() >= settings.min_intermolecular_distance


def test_search_space_is_reproducible_for_a_seed():
    first = water_search_space(WaterClusterSettings(seed=3))
    again = water_search_space(WaterClusterSettings(seed=3))
    other = water_search_space(WaterClusterSettings(seed=4))
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0].positions, other[0].positions)


def test_initial_training_set_is_labelled_by_the_reference():
    settings = WaterClusterSettings(
        min_waters=2,
        max_waters=3,
        structures_per_size=1,
        rattled_per_structure=2,
        md_frames_per_structure=2,
        md_steps=10,
    )
    space, results = initial_training_set(settings, ReferenceSettings(), MDSettings())
    assert len(space) == 2
    assert len(results) == 2 * (1 + 2 + 2)  # each structure, its rattled copies, MD frames
    assert all(r.success and np.isfinite(r.energy) for r in results)
    assert [len(r.frame.numbers) for r in results] == [6] * 5 + [9] * 5
    assert all(r.frame.velocities is None for r in results)


def test_frame_round_trip_keeps_velocities_when_asked():
    atoms = water_molecule()
    atoms.set_velocities(np.ones((3, 3)) * 0.01)
    atoms.info["name"] = "w"
    frame = Frame.model_validate(Frame.from_atoms(atoms, velocities=True).model_dump())
    back = frame.to_atoms()
    assert np.allclose(back.get_velocities(), 0.01)
    assert np.allclose(back.positions, atoms.positions)
    assert back.info["name"] == "w"
    assert not Frame.from_atoms(atoms).to_atoms().get_momenta().any()


def test_reads_extxyz_and_ase_databases(tmp_path: Path):
    space = water_search_space(WaterClusterSettings(max_waters=4, structures_per_size=1))
    ase.io.write(tmp_path / "space.extxyz", space)
    with ase.db.connect(tmp_path / "space.db") as database:
        for atoms in space:
            database.write(atoms)
    for name in ("space.extxyz", "space.db"):
        structures = read_structures(tmp_path / name, StructureSettings(elements=["H", "O"]))
        assert [len(a) for a in structures] == [len(a) for a in space]
        assert np.allclose(structures[1].positions, space[1].positions)


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


GOOD = "2\n\nH 0 0 0\nH 0.74 0 0\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no structures"),
        (GOOD + GOOD + "3\n\nH 0 0 0\nH 1 0 0\n", "structure 2 cannot be read"),
        (GOOD + "2\n\nH 0 0 0\nXx 1 0 0\n", "structure 1 cannot be read.*Xx"),
        (GOOD + "2\n\nO 0 0 0\nH 0.1 0 0\n", "structure 1: atoms 0 and 1 overlap, 0.100 A"),
        (
            '2\nLattice="0 0 0 0 0 0 0 0 0" pbc="T T T"\nH 0 0 0\nH 1 0 0\n',
            "structure 0: periodic along x, y, z but the cell vector there is empty",
        ),
        ("1\n\nFe 0 0 0\n", r"structure 0: elements \['Fe'\] are not among \['H', 'O'\]"),
    ],
)
def test_bad_files_name_the_file_and_the_structure(tmp_path: Path, content: str, message: str):
    path = write_text(tmp_path / "user.extxyz", content)
    with pytest.raises(StructureError, match=f"user.extxyz: .*{message}"):
        read_structures(path, StructureSettings(elements=["H", "O"]))


def test_a_missing_file_and_an_empty_database_are_errors(tmp_path: Path):
    with pytest.raises(StructureError, match="no such file"):
        read_structures(tmp_path / "missing.extxyz")
    ase.db.connect(tmp_path / "empty.db").count()
    with pytest.raises(StructureError, match=r"empty\.db: holds no structures"):
        read_structures(tmp_path / "empty.db")


def test_check_structure_rejects_unknown_elements_and_empty_structures():
    with pytest.raises(StructureError, match="here: unknown atomic numbers \\[0\\]"):
        check_structure(
            Atoms(numbers=[0, 1], positions=[[0, 0, 0], [2, 0, 0]]), StructureSettings(), "here"
        )
    with pytest.raises(StructureError, match="here: has no atoms"):
        check_structure(Atoms(), StructureSettings(), "here")
    grid = np.stack(np.meshgrid(*[np.arange(22)] * 3), axis=-1).reshape(-1, 3) * 1.5
    with pytest.raises(StructureError, match="here: has 10648 atoms, more than the 10000"):
        check_structure(Atoms(f"H{len(grid)}", positions=grid), StructureSettings(), "here")
    slab = Atoms("H2", positions=[[0, 0, 0], [1, 0, 0]], cell=[3, 3, 0], pbc=[True, True, False])
    check_structure(slab, StructureSettings(), "slab")  # periodic in x and y only: fine
