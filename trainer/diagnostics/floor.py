"""The context-free floor: the lowest loss reachable without looking at other positions (docs/SPEC.md §6).

A predictor that sees only its own, possibly corrupted, input token ``i`` at a supervised
position can do no better than the Bayes posterior ``q(c | i)`` of the original token ``c``.
Its expected cross-entropy is the conditional entropy ``H(C | I)`` in nats, computed here
exactly from the train unigram distribution (``meta.counts``) and the corruption
(``meta.corruption``: its mask fractions and :meth:`~shared.corruption.Corruption.floor_parts`).

Corruption model (docs/SPEC.md §2.5, as ``producer.corruption.corrupt`` does it), per supervised
position with original ``c ~ p``: the input is [MASK] with probability m, another base token
(uniform over the V0 - 1 base ids other than ``c``) with probability r, ``c`` itself with
probability u. So ``P(c, [MASK]) = m p(c)`` (posterior = prior: entropy ``H(p)``) and for a
base input j: ``P(c, j) = p(c) r / (V0 - 1)`` for ``j != c`` and ``P(c, c) = u p(c)``.

``[SEP]`` (only with ``supervise_sep``): each row of line-packed data has exactly one [SEP]
but its share of the candidates depends on the row lengths, which the meta does not carry.
It is taken as ``sep_share`` of the candidates, by default ``1 / block_size`` (a row holds at
most ``block_size - 1`` content tokens plus its [SEP]); fixed packing has no [SEP]. A random
replacement of [SEP] is uniform over all V0 base ids; an unchanged [SEP] reveals its class
(no base token is ever [SEP]), so it costs nothing.

Parts (a policy's :class:`~shared.corruption.FloorPart`: one for most policies, one per stage
for stages): every part gets the same expected share of the rows and every row has the same
candidate-count distribution, so a part's share of the supervised positions is proportional
to its expected supervised fraction of a row's n candidates (``FloorPart.ratio``), evaluated at
the largest n (``block_size - 1`` content tokens, + 1 with supervise_sep; ``block_size`` for
fixed packing); the stage types' ratios are in ``shared.corruption``. A ``mask_only`` part
(span stages) is all [MASK]: ``H(p)``. The floor is the mix of the per-part floors with those
weights: the expected loss pooled over supervised positions, which is what the mean
cross-entropy over a batch measures.

Mixtures: a row's lines all come from one source, so each source has its own floor, the same
computation from that source's train unigram counts (:func:`source_floors`); the stream's floor
stays the one of ``meta.counts``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from shared.meta import StreamMeta


def entropy(probs: np.ndarray) -> float:
    """Shannon entropy in nats of a probability vector (zeros ignored)."""
    nonzero = probs[probs > 0]
    return float(-(nonzero * np.log(nonzero)).sum())


def _xlogx(values: np.ndarray) -> np.ndarray:
    """``v * log(v)`` elementwise, 0 where ``v`` is 0."""
    out = np.zeros_like(values, dtype=np.float64)
    positive = values > 0
    out[positive] = values[positive] * np.log(values[positive])
    return out


def corrupted_token_entropy(class_probs: np.ndarray, base_size: int, mask_fractions: Iterable[float]) -> float:
    """``H(C | I)`` in nats for one supervised position under (m, r, u) corruption, in O(K).

    Args:
        class_probs: shape (K,), K >= base_size: the distribution of the original token;
            entries ``0..base_size-1`` are base ids, any further entries are special classes
            (e.g. [SEP]) that a random replacement never produces.
        base_size: V0, the number of base ids random replacements are drawn from.
        mask_fractions: (m, r, u), normalised to sum to 1.

    With ``w_c = p_c a_c`` the probability that class c becomes one given other base input
    (``a_c = r / (V0 - 1)`` for a base class, ``r / V0`` for a special one), a base input j has
    ``P(j) = W - w_j + u p_j`` (W = sum of w) and ``sum_c P(c, j) log P(c, j) = A - w_j log w_j
    + u p_j log(u p_j)`` (A = sum of w log w), so no (K, V0) joint table is needed: a vocabulary
    of 50,000 ids costs microseconds, not gigabytes.
    """
    probs = np.asarray(class_probs, dtype=np.float64)
    m, r, u = np.asarray(tuple(mask_fractions), dtype=np.float64) / float(sum(mask_fractions))
    share = np.full(len(probs), r / base_size)
    if base_size > 1:  # a base original is replaced by one of the *other* V0 - 1 base ids
        share[:base_size] = r / (base_size - 1)
    w = probs * share
    base_p, base_w = probs[:base_size], w[:base_size]
    input_probs = w.sum() - base_w + u * base_p
    joint_xlogx = _xlogx(w).sum() - _xlogx(base_w) + _xlogx(u * base_p)
    base_inputs = float((_xlogx(input_probs) - joint_xlogx).sum())
    # A [MASK] input leaves the prior; an unchanged special input reveals its class (0 nats).
    return float(m * entropy(probs) + base_inputs)


def row_candidates(meta: StreamMeta) -> int:
    """The largest number of corruption candidates in a row (the n the part weights use)."""
    return meta.corruption.most_candidates(meta.block_size, meta.packing)


def stage_floors(meta: StreamMeta, split: str = "train", sep_share: float | None = None,
                 counts: np.ndarray | None = None) -> list[tuple[float, float]]:
    """``(weight, floor)`` per part of ``split`` (one per stage for stages); weights sum to 1.
    ``counts``: the unigram counts to use instead of ``meta.counts`` (one source's)."""
    corruption = meta.corruption
    class_probs = class_distribution(meta, sep_share, counts)
    with_fractions = corrupted_token_entropy(class_probs, len(meta.counts), corruption.mask_fractions)
    parts = corruption.floor_parts(split, row_candidates(meta))
    if len(parts) == 1 and not parts[0].mask_only:
        return [(1.0, with_fractions)]
    ratios = np.array([part.ratio for part in parts], dtype=np.float64)
    if ratios.sum() <= 0:
        raise ValueError(f"the {split} stages supervise nothing")
    all_masked = entropy(class_probs)
    floors = [all_masked if part.mask_only else with_fractions for part in parts]
    return list(zip((ratios / ratios.sum()).tolist(), floors))


def context_free_floor(meta: StreamMeta, split: str = "train", sep_share: float | None = None,
                       counts: np.ndarray | None = None) -> float:
    """The context-free floor in nats for the supervised positions of ``split`` (of the rows
    whose unigram counts are ``counts``, by default the stream's ``meta.counts``)."""
    return float(sum(weight * floor for weight, floor in stage_floors(meta, split, sep_share, counts)))


def source_floors(meta: StreamMeta, split: str = "val") -> dict[str, float]:
    """Source name -> the context-free floor of its rows of ``split`` (empty for a single corpus)."""
    return {source.name: context_free_floor(meta, split, counts=source.counts) for source in meta.sources}


def class_distribution(meta: StreamMeta, sep_share: float | None = None, counts: np.ndarray | None = None) -> np.ndarray:
    """Distribution of the original token at a supervised position: base ids (+ [SEP] last),
    from ``counts`` (V0,), by default ``meta.counts``."""
    counts = (meta.counts if counts is None else counts).astype(np.float64)
    if counts.sum() <= 0:
        raise ValueError("token_counts is empty: no train content tokens to build the floor from")
    base = counts / counts.sum()
    if not meta.corruption.sep_is_candidate(meta.packing):
        return base
    share = 1.0 / meta.block_size if sep_share is None else float(sep_share)
    return np.concatenate([base * (1.0 - share), [share]])
