"""Selection: each policy of ``shared.corruption`` picks the supervised positions of a batch (docs/SPEC.md §2.5).

A selector takes the policy, the generator, the candidates per row (int (R,); candidates are
the first ``n_candidates[i]`` positions of row i), the block size T and the split, and gives a
:class:`~producer.corruption.Selection`. :data:`SELECTORS` maps each policy type to its
selector; a policy declared in ``shared.corruption`` needs one here, and nothing else in the
producer. Everything is vectorized over rows and positions.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from producer.corruption import Selection, below, candidate_mask, choose_k, random_bits, rounded_count
from producer.stages import stages_select
from shared.corruption import BertPolicy, Policy, SpanPolicy, StagesPolicy, UniformPolicy


def bert_select(policy: BertPolicy, rng: np.random.Generator, n_candidates: np.ndarray, block_size: int,
                split: str) -> Selection:
    """Each candidate supervised independently with probability ``mask_prob``."""
    draws = random_bits(rng, (len(n_candidates), block_size))
    return Selection(below(draws, policy.mask_prob) & candidate_mask(n_candidates, block_size))


def uniform_select(policy: UniformPolicy, rng: np.random.Generator, n_candidates: np.ndarray, block_size: int,
                   split: str) -> Selection:
    """Per row ``r ~ U(lo, hi)``; ``round(r * n)`` candidates chosen uniformly."""
    low, high = policy.ratio_range
    counts = rounded_count(rng.uniform(low, high, len(n_candidates)), n_candidates)
    return Selection(choose_k(rng, candidate_mask(n_candidates, block_size), counts))


def span_policy_select(policy: SpanPolicy, rng: np.random.Generator, n_candidates: np.ndarray, block_size: int,
                       split: str) -> Selection:
    """Exactly ``round(span_ratio * n)`` candidates per row, in non-overlapping spans.

    Lengths ``L ~ Geometric(1 / span_mean)`` (support 1, 2, ...) are drawn for as many spans as
    the largest count could need; a row keeps its first lengths up to its count, the last one
    cut to fit. Placement: each of the row's ``s`` spans is preceded by a number of its
    ``free`` unsupervised candidates drawn uniformly from ``0..free`` (sorted, so the spans
    keep their order), with a gap of one more between spans where the row has room
    (``n - count >= s - 1``; else adjacent spans may touch).
    """
    rows = len(n_candidates)
    counts = rounded_count(np.full(rows, policy.span_ratio), n_candidates)
    most = int(counts.max(initial=0))
    if most == 0:
        return Selection(np.zeros((rows, block_size), dtype=bool))
    # Geometric by inversion, 1 + floor(log(U) / log(1 - p)) with U in (0, 1] (p = 1: log(1 - p) = -inf, L = 1):
    # several times faster than rng.geometric.
    with np.errstate(divide="ignore"):
        log_q = np.log1p(-1.0 / policy.span_mean)
    drawn = 1 + (np.log(1.0 - rng.random((rows, most))) / log_q).astype(np.int64)
    lengths = np.clip(counts[:, None] - (np.cumsum(drawn, axis=1) - drawn), 0, drawn)  # 0 after the count
    spans = np.count_nonzero(lengths, axis=1)
    apart = (n_candidates - counts >= spans - 1).astype(np.int64)
    free = n_candidates - counts - np.maximum(spans - 1, 0) * apart
    index = np.arange(most)
    before = (rng.random((rows, most)) * (free[:, None] + 1)).astype(np.int64)
    before = np.sort(np.where(index < spans[:, None], before, free[:, None]), axis=1)  # the unused last
    start = before + (np.cumsum(lengths, axis=1) - lengths) + index * apart[:, None]
    # Coverage by a difference array: +1 at each span start, -1 after its end.
    width = block_size + 1
    offset = np.arange(rows)[:, None] * width
    placed = lengths > 0
    delta = np.bincount((offset + start)[placed], minlength=rows * width)
    delta -= np.bincount((offset + start + lengths)[placed], minlength=rows * width)
    return Selection(np.cumsum(delta.reshape(rows, width), axis=1)[:, :block_size] > 0)


SELECTORS: dict[type, Callable[..., Selection]] = {
    BertPolicy: bert_select,
    UniformPolicy: uniform_select,
    StagesPolicy: stages_select,
    SpanPolicy: span_policy_select,
}


def select(policy: Policy, rng: np.random.Generator, n_candidates: np.ndarray, block_size: int, split: str) -> Selection:
    """The supervised set of a batch of ``len(n_candidates)`` rows of ``block_size`` positions."""
    return SELECTORS[type(policy)](policy, rng, n_candidates, block_size, split)
