"""Corruption (docs/SPEC.md §2.5): which positions are supervised, and what their inputs become.

A policy's selection (``producer.selection``) picks the supervised set S of every row from its
candidate count: candidates are always the first ``n_candidates`` positions of a row (the
visible content, plus ``[SEP]`` with ``--supervise-sep``: ``shared.corruption.Corruption.candidates``),
so nothing at or after ``valid_len`` is ever one.
:func:`corrupt` then writes the labels and replaces the inputs on S: ``[MASK]`` with
probability M, another base token with R, unchanged with U (the mask fractions); rows a
policy marks ``mask_only`` (span stages) get ``[MASK]`` everywhere on S.

Everything is vectorized over rows and positions; :func:`choose_k` is the one exact "k of n without replacement" primitive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from producer.packing import prefix_mask
from shared.vocab import IGNORE_INDEX, SPECIAL_TOKENS, label_dtype

_NOT_A_CANDIDATE = np.uint32(0xFFFF_FFFF)


@dataclass
class Selection:
    """The supervised set of a batch.

    Attributes:
        supervised: bool (R, T), True on S.
        mask_only: bool (R,) rows whose supervised inputs all become ``[MASK]``, or None.
        stage: uint8 (R,) index of each row's stage in its split's stage list, or None.
    """

    supervised: np.ndarray
    mask_only: np.ndarray | None = None
    stage: np.ndarray | None = None


def candidate_mask(n_candidates: np.ndarray, block_size: int) -> np.ndarray:
    """bool (R, T): position t of row i is a candidate iff ``t < n_candidates[i]``."""
    return prefix_mask(n_candidates, block_size)


def random_bits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform uint32 array of ``shape``, from the generator's raw 64-bit output: several times
    faster than ``rng.random(dtype=float32)``, and thresholds on it resolve 2**-32."""
    size = int(np.prod(shape))
    return rng.bit_generator.random_raw(-(-size // 2)).view(np.uint32)[:size].reshape(shape)


def below(bits: np.ndarray, probability: float) -> np.ndarray:
    """bool: ``bits`` (uniform uint32) under ``probability * 2**32``, i.e. True with that probability."""
    threshold = round(probability * 2**32)
    return np.ones(bits.shape, bool) if threshold >= 2**32 else bits < np.uint32(threshold)


def choose_k(rng: np.random.Generator, candidates: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """bool (R, T): in each row, ``counts[i]`` of its candidate positions (bool (R, T)), chosen
    uniformly without replacement. ``counts[i]`` must not exceed the row's candidates."""
    rows, block_size = candidates.shape
    # Random 32-bit keys; the k smallest of a row are its choice (the k-th smallest is the threshold).
    keys = random_bits(rng, (rows, block_size))
    np.copyto(keys, _NOT_A_CANDIDATE, where=~candidates)
    threshold = np.sort(keys, axis=1)[np.arange(rows), np.maximum(counts - 1, 0)]
    chosen = (keys <= threshold[:, None]) & candidates & (counts > 0)[:, None]
    # A key tied with the threshold (about one row in 10^7) chooses too many: draw those rows again.
    tied = np.count_nonzero(chosen, axis=1) != counts
    if tied.any():
        chosen[tied] = choose_k(rng, candidates[tied], counts[tied])
    return chosen


def rounded_count(ratio: np.ndarray, n_candidates: np.ndarray) -> np.ndarray:
    """int64 ``round(ratio * n_candidates)`` per row (half to even), never above ``n_candidates``."""
    return np.minimum(np.rint(ratio * n_candidates).astype(np.int64), n_candidates)


def corrupt(
    rng: np.random.Generator,
    x: np.ndarray,
    selection: Selection,
    mask_fractions: tuple[float, float, float],
    base_size: int,
    mask_id: int,
) -> np.ndarray:
    """Labels (R, T), int16 or int32 (``shared.vocab.label_dtype``): the original token on S,
    ``IGNORE_INDEX`` elsewhere. Replaces the inputs on S in ``x`` (uint16 or uint32 (R, T),
    modified in place): ``[MASK]`` / another base token / unchanged with the mask fractions
    (``[MASK]`` always in ``mask_only`` rows)."""
    supervised = selection.supervised
    # Arithmetic on the boolean masks rather than np.where/copyto: random masks defeat branch
    # prediction and this is several times faster. Ids are below the label dtype's maximum, so
    # a same-width view reads them exactly; the arithmetic wraps, so it is exact too.
    label = label_dtype(mask_id + len(SPECIAL_TOKENS))
    wide = x.view(label) if x.dtype.itemsize == label.itemsize else x.astype(label)
    labels = (wide - IGNORE_INDEX) * supervised + label.type(IGNORE_INDEX)
    choice = random_bits(rng, x.shape)
    to_mask = below(choice, mask_fractions[0])
    to_random = below(choice, mask_fractions[0] + mask_fractions[1]) & ~to_mask
    if selection.mask_only is not None:
        to_mask |= selection.mask_only[:, None]
        to_random &= ~selection.mask_only[:, None]
    to_mask &= supervised
    to_random &= supervised
    replaced = np.flatnonzero(to_random)
    original = x.reshape(-1)[replaced].astype(np.int64)
    x += (mask_id - x) * to_mask
    # Another base token: uniform over the base ids minus the original, shifting draws at or
    # above it up by one; a supervised [SEP] (not a base id) draws from all of them.
    draws = rng.integers(0, base_size - 1, replaced.size, dtype=np.int64)
    draws += draws >= original
    is_special = original >= base_size
    if is_special.any():
        draws[is_special] = rng.integers(0, base_size, int(is_special.sum()))
    x.reshape(-1)[replaced] = draws
    return labels


def mask_ratio(supervised: np.ndarray, n_candidates: np.ndarray) -> np.ndarray:
    """float32 (R,): |S| / n_candidates per row, 0 for a row without candidates."""
    counts = supervised.view(np.uint8).sum(axis=1, dtype=np.int32)
    return (counts / np.maximum(n_candidates, 1)).astype(np.float32)
