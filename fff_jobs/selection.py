"""Selection: which sampled frames the reference computes next, from the committee's predictions.

Inputs are arrays: `score` of shape (n_frames,), each frame's rank by the committee's
doubt (the sum or the largest of its per-atom force deviations, or its energy spread: the
selection settings' `score`); `energies` of shape (n_frames, n_members) holding each
committee member's energy per atom (eV/atom) for each frame; and, for farthest-point
selection, `descriptors` of shape (n_frames, d); and, to share a batch among MD
segments, `segments`, each frame's segment label (n_frames of them).
Outputs are indices into the frames.

A frame with any non-finite prediction (or descriptor) is never picked: a member that
returned NaN says nothing reliable about that frame. Ties are broken by an order drawn
from the seed, so a selection is deterministic for a given seed and input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fff_jobs.spec import SelectionSettings

DROP_FRACTION = 0.05  # of the remaining frames, dropped with each pick (the original's 5 %)


def committee_spread(energies: np.ndarray) -> np.ndarray:
    """Standard deviation over committee members of each frame's energy per atom."""
    return np.asarray(energies, dtype=float).std(axis=1)


def select_frames(
    score: np.ndarray,
    settings: SelectionSettings,
    energies: np.ndarray | None = None,
    descriptors: np.ndarray | None = None,
    segments: Sequence[str] | None = None,
) -> np.ndarray:
    """Indices of up to `batch_size` frames, by the method the settings name."""
    if settings.method == "spread":
        if energies is None:
            raise ValueError("spread selection needs the members' energies (n_frames x members)")
        if settings.spread_over_segments and segments is None:
            raise ValueError("spread_over_segments needs each frame's segment (n_frames,)")
        shared = segments if settings.spread_over_segments else None
        return select_by_spread(energies, settings.batch_size, settings.seed, score, shared)
    if descriptors is None:
        raise ValueError("farthest_point selection needs descriptors (n_frames x d)")
    return select_farthest_point(descriptors, score, settings.batch_size, settings.seed)


def select_by_spread(
    energies: np.ndarray,
    batch_size: int,
    seed: int = 0,
    score: np.ndarray | None = None,
    segments: Sequence[str] | None = None,
) -> np.ndarray:
    """The original heuristic: pick the most uncertain, drop what correlates with it, repeat.

    The score defaults to the energy spread. Each pick drops int(0.05 n) + 1 of
    the n remaining frames: those whose centred committee-prediction vectors correlate
    most (|Pearson r|) with the picked one, the picked one first. Stops when the batch
    is full or no frame remains. With `segments`, a segment that has given
    ceil(batch_size / segments) picks gives no more while another segment has frames left.
    """
    energies = np.asarray(energies, dtype=float)
    valid = np.isfinite(energies).all(axis=1)
    if score is not None:
        score = np.asarray(score, dtype=float)
        valid &= np.isfinite(score)
    order = _candidates(valid, seed)
    centred = energies[order] - energies[order].mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    spread = norms / np.sqrt(energies.shape[1]) if score is None else score[order]
    labels = None if segments is None else np.asarray(segments)[order]
    share = None if labels is None else -(-batch_size // np.unique(labels).size)
    remaining = np.arange(order.size)
    picked: list[int] = []
    while len(picked) < batch_size and remaining.size:
        ranking = spread[remaining]
        if labels is not None:
            ranking = _within_share(ranking, labels, remaining, picked, share)
        best = int(np.argmax(ranking))
        picked.append(int(remaining[best]))
        correlation = _abs_correlation(centred[remaining], norms[remaining], best)
        count = int(DROP_FRACTION * remaining.size) + 1
        dropped = np.argpartition(-correlation, count - 1)[:count]
        keep = np.ones(remaining.size, dtype=bool)
        keep[dropped] = False
        remaining = remaining[keep]
    return order[picked]


def _within_share(
    ranking: np.ndarray,
    segments: np.ndarray,
    remaining: np.ndarray,
    picked: list[int],
    share: int,
) -> np.ndarray:
    """The ranking with the frames of segments that have given `share` picks set to -inf
    (unchanged when every remaining frame's segment has)."""
    labels, counts = np.unique(segments[picked], return_counts=True)
    full = np.isin(segments[remaining], labels[counts >= share])
    if full.all():
        return ranking
    return np.where(full, -np.inf, ranking)


def _abs_correlation(centred: np.ndarray, norms: np.ndarray, best: int) -> np.ndarray:
    """|Pearson r| of each row with row `best`; 0 where a row has no spread, inf for `best`."""
    with np.errstate(divide="ignore", invalid="ignore"):
        correlation = np.abs(centred @ centred[best]) / (norms * norms[best])
    correlation[~np.isfinite(correlation)] = 0.0
    correlation[best] = np.inf
    return correlation


def select_farthest_point(
    descriptors: np.ndarray, score: np.ndarray, batch_size: int, seed: int = 0
) -> np.ndarray:
    """Farthest-point selection weighted by the score.

    Starts from the highest-scoring frame, then repeatedly picks the frame that
    maximises score x (distance to the nearest picked frame). With no score
    anywhere, plain farthest-point selection.
    """
    descriptors = np.asarray(descriptors, dtype=float)
    score = np.asarray(score, dtype=float)
    valid = np.isfinite(descriptors).all(axis=1) & np.isfinite(score)
    order = _candidates(valid, seed)
    points, weight = descriptors[order], score[order]
    if weight.size and weight.max() <= 0:
        weight = np.ones_like(weight)
    squared_norms = np.einsum("ij,ij->i", points, points)
    nearest = np.full(order.size, np.inf)
    picked: list[int] = []
    best = int(np.argmax(weight)) if order.size else -1
    while len(picked) < min(batch_size, order.size):
        picked.append(best)
        squared = squared_norms - 2 * points @ points[best] + squared_norms[best]
        nearest = np.minimum(nearest, np.sqrt(np.maximum(squared, 0.0)))
        gain = weight * nearest
        gain[picked] = -np.inf
        best = int(np.argmax(gain))
    return order[picked]


def _candidates(valid: np.ndarray, seed: int) -> np.ndarray:
    """Indices of the valid frames, in an order drawn from the seed (it breaks ties)."""
    indices = np.flatnonzero(valid)
    return indices[np.random.default_rng(seed).permutation(indices.size)]
