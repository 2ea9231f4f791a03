"""Selection by the stages policy (docs/SPEC.md §2.5; the stage types are declared in
``shared.corruption``).

The rows of each message are shared equally among the stages of its split (which stages get
the leftover rows is random), then shuffled. Stage types:

- ``random`` (``max_masked_ratio`` m): per row ``r ~ U(0, m)``, ``round(r * n)`` candidates
  chosen uniformly.
- ``sticky`` (``target_masked_ratio``, ``p1_probability``, ``p2_probability``): the mask grows
  in rounds; an unchosen candidate with no chosen neighbour is added with p1, one with a chosen
  neighbour with p2, until ``ceil(ratio * n)`` are chosen; the excess of the last round is
  removed at random. When no remaining candidate can be added (p2 = 0 and every gap is
  flanked), or after :data:`MAX_STICKY_ROUNDS` rounds, the rest is chosen uniformly.
- ``span`` (``spans_count`` k): 2k sorted uniform candidate indices give k inclusive spans;
  every span position becomes ``[MASK]`` (no 80/10/10).

Rows are processed together per stage type: the sticky rounds loop over rounds, never over
rows or tokens.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from producer.corruption import Selection, candidate_mask, choose_k, rounded_count
from shared.corruption import STAGE_TYPES, RandomStage, SpanStage, Stage, StagesPolicy, StickyStage, sticky_target

MAX_STICKY_ROUNDS = 256


def stages_select(policy: StagesPolicy, rng: np.random.Generator, n_candidates: np.ndarray, block_size: int,
                  split: str) -> Selection:
    """Selection by the stages of ``split``; ``stage`` and ``mask_only`` per row."""
    table = _table(getattr(policy, split))
    n_stages = len(table.kind)
    rows = len(n_candidates)
    stage = rng.permutation(rng.permutation(n_stages)[np.arange(rows) % n_stages])
    kind = table.kind[stage]
    supervised = np.zeros((rows, block_size), dtype=bool)
    random_rows = np.flatnonzero(kind == _RANDOM)
    if random_rows.size:
        n = n_candidates[random_rows]
        ratio = rng.random(random_rows.size) * table.max_ratio[stage[random_rows]]
        supervised[random_rows] = choose_k(rng, candidate_mask(n, block_size), rounded_count(ratio, n))
    sticky_rows = np.flatnonzero(kind == _STICKY)
    if sticky_rows.size:
        n, of = n_candidates[sticky_rows], stage[sticky_rows]
        target = sticky_target(table.target_ratio[of], n)
        supervised[sticky_rows] = sticky_select(rng, n, block_size, target, table.p1[of], table.p2[of])
    span_rows = np.flatnonzero(kind == _SPAN)
    if span_rows.size:
        spans = table.spans[stage[span_rows]]
        supervised[span_rows] = span_select(rng, n_candidates[span_rows], block_size, spans)
    return Selection(supervised, table.mask_only[stage], stage.astype(np.uint8))


_RANDOM, _STICKY, _SPAN = (list(STAGE_TYPES).index(cls.type) for cls in (RandomStage, StickyStage, SpanStage))


@lru_cache(maxsize=16)
def _table(stages: tuple[Stage, ...]) -> _StageTable:
    return _StageTable(stages)


class _StageTable:
    """The parameters of a stage list as arrays indexed by stage (0 where a type lacks one)."""

    def __init__(self, stages: tuple[Stage, ...]) -> None:
        self.kind = np.array([list(STAGE_TYPES).index(s.type) for s in stages])
        self.mask_only = np.array([s.mask_only for s in stages])
        self.max_ratio = np.array([getattr(s, "max_masked_ratio", 0.0) for s in stages])
        self.target_ratio = np.array([getattr(s, "target_masked_ratio", 0.0) for s in stages])
        self.p1 = np.array([getattr(s, "p1_probability", 0.0) for s in stages], dtype=np.float32)
        self.p2 = np.array([getattr(s, "p2_probability", 0.0) for s in stages], dtype=np.float32)
        self.spans = np.array([getattr(s, "spans_count", 0) for s in stages], dtype=np.int64)


def sticky_select(
    rng: np.random.Generator,
    n_candidates: np.ndarray,
    block_size: int,
    target: np.ndarray,
    p1: np.ndarray,
    p2: np.ndarray,
) -> np.ndarray:
    """bool (R, T) with exactly ``target[i]`` chosen candidates per row, grown in rounds (see module doc)."""
    candidates = candidate_mask(n_candidates, block_size)
    chosen = np.zeros_like(candidates)
    active = np.flatnonzero(target > 0)
    rounds = 0
    while active.size:
        rounds += 1
        mask = chosen[active]
        neighbour = np.zeros_like(mask)
        neighbour[:, 1:] |= mask[:, :-1]
        neighbour[:, :-1] |= mask[:, 1:]
        open_ = candidates[active] & ~mask
        p1_row, p2_row = p1[active, None], p2[active, None]
        probability = (p1_row + (p2_row - p1_row) * neighbour) * open_
        need = target[active] - np.count_nonzero(mask, axis=1)
        stuck = ~(probability > 0).any(axis=1) | (rounds > MAX_STICKY_ROUNDS)
        added = (rng.random(mask.shape, dtype=np.float32) < probability) | (stuck[:, None] & open_)
        # Keep `need` of this round's additions, chosen at random, where there are more.
        excess = np.count_nonzero(added, axis=1) > need
        if excess.any():
            added[excess] = choose_k(rng, added[excess], need[excess])
        chosen[active] = mask | added
        active = active[need > np.count_nonzero(added, axis=1)]
    return chosen


def span_select(rng: np.random.Generator, n_candidates: np.ndarray, block_size: int, spans: np.ndarray) -> np.ndarray:
    """bool (R, T): the union of ``spans[i]`` inclusive spans per row, bounded by 2k sorted
    uniform candidate indices. Rows without candidates get none."""
    rows = len(n_candidates)
    covered = np.zeros((rows, block_size), dtype=bool)
    for k in np.unique(spans):
        picked = np.flatnonzero((spans == k) & (n_candidates > 0))
        points = np.sort(rng.integers(0, n_candidates[picked, None], (picked.size, 2 * k)), axis=1)
        # Coverage by a difference array: +1 at each span start, -1 after each span end.
        width = block_size + 1
        base = np.arange(picked.size)[:, None] * width
        delta = np.bincount((base + points[:, 0::2]).ravel(), minlength=picked.size * width)
        delta -= np.bincount((base + points[:, 1::2] + 1).ravel(), minlength=picked.size * width)
        covered[picked] = np.cumsum(delta.reshape(picked.size, width), axis=1)[:, :block_size] > 0
    return covered
