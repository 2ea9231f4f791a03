"""A keyed permutation of ``0 .. n-1`` computed per index, never materialized (docs/SPEC.md §2.6).

The epoch order of the train packs must be a shuffle of every pack, the same in every producer,
and computable for any message index in constant time and memory, whatever the corpus size (a
1 GB corpus has tens of millions of packs: a materialized permutation would be hundreds of MB in
every producer). :class:`KeyedPermutation` is a balanced Feistel network over the smallest
power-of-four domain that holds ``n``, with cycle walking (an index that lands outside
``0 .. n-1`` is permuted again until it lands inside): a bijection of ``0 .. n-1`` by
construction. The round function mixes the half-block with a 64-bit round key by
multiply-xorshift (SplitMix64's finalizer). Vectorized over an array of indices.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(values: np.ndarray, key: np.uint64) -> np.ndarray:
    z = values ^ key
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class KeyedPermutation:
    """A bijection of ``0 .. n-1`` chosen by ``keys`` (:data:`ROUNDS` 64-bit round keys, e.g.
    drawn from a ``SeedSequence``). ``perm(indices)`` maps an int64 array elementwise."""

    def __init__(self, n: int, keys: np.ndarray) -> None:
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        if len(keys) != ROUNDS:
            raise ValueError(f"{ROUNDS} round keys, got {len(keys)}")
        self.n = n
        self.keys = [np.uint64(key) for key in keys]
        self.half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
        self._half_mask = np.uint64((1 << self.half_bits) - 1)

    def _encrypt(self, values: np.ndarray) -> np.ndarray:
        bits, mask = np.uint64(self.half_bits), self._half_mask
        left, right = values >> bits, values & mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right, key) & mask)
        return (left << bits) | right

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.n):
            raise IndexError(f"indices outside 0..{self.n - 1}")
        values = self._encrypt(indices.astype(np.uint64))
        outside = values >= np.uint64(self.n)
        while outside.any():  # cycle walking: fewer than 4 rounds on average (the domain is < 4n)
            values[outside] = self._encrypt(values[outside])
            outside = values >= np.uint64(self.n)
        return values.astype(np.int64)
