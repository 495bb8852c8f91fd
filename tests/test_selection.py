"""Selection from committee predictions: hand-computed cases, NaNs, ties, permutations."""

from __future__ import annotations

import numpy as np
import pytest

from fff_jobs.selection import (
    committee_spread,
    select_by_spread,
    select_farthest_point,
    select_frames,
)
from fff_jobs.spec import SelectionSettings


def predictions_with_a_correlated_twin(rng: np.random.Generator) -> np.ndarray:
    """20 frames x 3 members: frame 0 spreads most, frame 1 is its (scaled) twin, frame 2 differs.

    Frame 1 has the second largest spread but its predictions correlate perfectly with
    frame 0's, so the heuristic drops it together with frame 0 (int(0.05 * 20) + 1 = 2).
    """
    energies = rng.normal(scale=0.01, size=(20, 3))
    energies[0] = [0.0, 3.0, 6.0]  # spread 2.449
    energies[1] = [1.0, 3.0, 5.0]  # spread 1.633, r = 1 with frame 0
    energies[2] = [3.0, 0.0, 1.5]  # spread 1.225, r = -0.5 with frame 0
    energies[3] = [0.0, 0.2, -0.1]  # the next largest spread
    return energies


def test_spread_heuristic_drops_the_frames_correlated_with_each_pick():
    energies = predictions_with_a_correlated_twin(np.random.default_rng(0))
    assert committee_spread(energies)[:3] == pytest.approx([2.449490, 1.632993, 1.224745], 1e-6)
    assert select_by_spread(energies, 3).tolist() == [0, 2, 3]
    assert np.argsort(-committee_spread(energies))[:3].tolist() == [0, 1, 2]  # without the drop


def test_spread_heuristic_with_few_frames_ranks_by_spread():
    energies = np.array([[0.0, 0.1], [0.0, 0.4], [0.0, 0.2], [0.0, 0.3]])
    assert select_by_spread(energies, 3).tolist() == [1, 3, 2]  # each pick drops only itself


def test_a_frame_with_nan_predictions_is_never_picked():
    energies = predictions_with_a_correlated_twin(np.random.default_rng(0))
    energies[5] = [np.nan, -100.0, 100.0]
    picked = select_by_spread(energies, 20)
    assert 5 not in picked
    descriptors = np.random.default_rng(1).normal(size=(20, 4))
    descriptors[7, 2] = np.inf
    picked = select_farthest_point(descriptors, committee_spread(energies), 20)
    assert 5 not in picked and 7 not in picked
    assert len(picked) == 18


def test_fewer_candidates_than_requested_returns_each_valid_one_once():
    energies = np.array([[0.0, 1.0], [0.0, 2.0], [np.nan, 0.0]])
    assert sorted(select_by_spread(energies, 10).tolist()) == [0, 1]
    assert sorted(select_farthest_point(np.eye(3), np.ones(3), 10).tolist()) == [0, 1, 2]
    assert select_by_spread(np.empty((0, 8)), 5).tolist() == []
    assert select_farthest_point(np.empty((0, 2)), np.empty(0), 5).tolist() == []


def test_ties_give_distinct_frames_deterministically_for_a_seed():
    energies = np.tile([0.0, 1.0, 2.0], (30, 1))  # thirty identical frames
    first = select_by_spread(energies, 5, seed=1)
    assert len(set(first.tolist())) == len(first) > 0
    assert first.tolist() == select_by_spread(energies, 5, seed=1).tolist()
    descriptors = np.zeros((10, 3))
    picked = select_farthest_point(descriptors, np.ones(10), 4, seed=2)
    assert len(set(picked.tolist())) == 4
    assert picked.tolist() == select_farthest_point(descriptors, np.ones(10), 4, seed=2).tolist()


def test_selection_is_permutation_consistent():
    rng = np.random.default_rng(42)
    energies = rng.normal(size=(300, 8)) * rng.uniform(0.001, 0.01, size=(300, 1))
    descriptors = rng.normal(size=(300, 5))
    permutation = rng.permutation(300)
    by_spread = select_by_spread(energies, 25)
    assert permutation[select_by_spread(energies[permutation], 25)].tolist() == by_spread.tolist()
    spread = committee_spread(energies)
    farthest = select_farthest_point(descriptors, spread, 25)
    permuted = select_farthest_point(descriptors[permutation], spread[permutation], 25)
    assert permutation[permuted].tolist() == farthest.tolist()


def test_farthest_point_hand_computed_on_a_line():
    positions = np.array([[0.0], [1.0], [2.0], [10.0]])
    assert select_farthest_point(positions, np.array([1, 1, 1, 2.0]), 3).tolist() == [3, 0, 2]
    # uncertainty weighs in: frame 2 starts, then 2 x 8 beats 1 x 2
    assert select_farthest_point(positions, np.array([1, 1, 5, 2.0]), 3).tolist() == [2, 3, 0]
    # no uncertainty at all: plain farthest-point selection from a frame drawn by the seed
    first, second = select_farthest_point(positions, np.zeros(4), 2).tolist()
    assert second == (0 if first == 3 else 3)


def test_select_frames_follows_the_settings():
    energies = predictions_with_a_correlated_twin(np.random.default_rng(0))
    spread = committee_spread(energies)
    picked = select_frames(spread, SelectionSettings(batch_size=3), energies)
    assert picked.tolist() == [0, 2, 3]
    farthest = SelectionSettings(batch_size=2, method="farthest_point")
    with pytest.raises(ValueError, match="needs descriptors"):
        select_frames(spread, farthest, energies)
    descriptors = np.arange(20.0)[:, None]
    assert select_frames(spread, farthest, energies, descriptors).tolist()[0] == 0


def test_spread_selection_ranks_by_the_uncertainty_given():
    """With force deviations, the frame the members' forces disagree on most goes first,
    whatever its energy spread."""
    energies = predictions_with_a_correlated_twin(np.random.default_rng(0))
    force_deviation = np.zeros(len(energies))
    force_deviation[7] = 1.0
    force_deviation[11] = 0.5
    energies[5, 1] = np.nan
    force_deviation[5] = 5.0  # never picked: a member returned NaN for this frame
    picked = select_frames(force_deviation, SelectionSettings(batch_size=2), energies)
    assert picked.tolist() == [7, 11]


def test_spread_over_segments_shares_the_batch_among_segments():
    """Segment a's frames all outrank segment b's: alone they would fill the batch; shared,
    each segment gives half, and a segment with too few frames leaves its share to others."""
    rng = np.random.default_rng(1)
    energies = rng.normal(size=(40, 4))
    score = np.concatenate([2.0 + rng.random(20), rng.random(20)])
    segments = ["t000/0"] * 20 + ["t001/0"] * 20
    shared = SelectionSettings(batch_size=4, spread_over_segments=True)
    picked = select_frames(score, shared, energies, segments=segments)
    assert sorted(segments[i] for i in picked) == ["t000/0"] * 2 + ["t001/0"] * 2
    assert picked[0] == np.argmax(score)
    alone = select_frames(score, SelectionSettings(batch_size=4), energies, segments=segments)
    assert all(i < 20 for i in alone)
    few = segments[:20] + ["t001/0"] + ["t002/0"] * 19
    energies[21:, 0] = np.nan  # t002/0's frames cannot be picked: t001/0 holds one valid frame
    picked = select_frames(score, shared, energies, segments=few)
    assert len(picked) == 4 and [few[i] for i in picked].count("t000/0") >= 3
    with pytest.raises(ValueError, match="needs each frame's segment"):
        select_frames(score, shared, energies)


def test_spread_over_segments_is_refused_with_farthest_point():
    with pytest.raises(ValueError, match="method: spread only"):
        SelectionSettings(method="farthest_point", spread_over_segments=True)
