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
from shared.corruption import BertPolicy, Policy, StagesPolicy, UniformPolicy


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


SELECTORS: dict[type, Callable[..., Selection]] = {
    BertPolicy: bert_select,
    UniformPolicy: uniform_select,
    StagesPolicy: stages_select,
}


def select(policy: Policy, rng: np.random.Generator, n_candidates: np.ndarray, block_size: int, split: str) -> Selection:
    """The supervised set of a batch of ``len(n_candidates)`` rows of ``block_size`` positions."""
    return SELECTORS[type(policy)](policy, rng, n_candidates, block_size, split)
