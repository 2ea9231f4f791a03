"""MetaPins: the pinned stream, and foreign metas remembered within a bound in number and bytes."""

import numpy as np

from trainer.data.pinning import MetaPins

from helpers.wire import make_meta


def big_meta(base_size: int, seed: int):
    chars = "".join(chr(c) for c in range(0x10FFFF) if not 0xD800 <= c < 0xE000)[:base_size]
    return make_meta(chars=chars, seed=seed, token_counts=np.ones(base_size, dtype=np.uint64))


def test_foreign_metas_are_remembered_within_a_byte_bound():
    """Issue 26 item 2: 16 large foreign metas used to stay (~148 MiB each for a 16.8 MB meta)."""
    pins = MetaPins(max_foreign=16, max_foreign_bytes=24 << 20)
    pins.pin(make_meta())
    for seed in range(1, 12):
        assert "seed" in pins.mismatch(big_meta(400_000, seed), "foreign")
    assert pins.foreign_bytes() <= 24 << 20
    assert 2 <= len(pins.known) - 1 < 11
    assert pins.meta.digest in pins.known  # the pinned one is never forgotten


def test_small_foreign_metas_are_bounded_in_number():
    pins = MetaPins(max_foreign=4)
    pins.pin(make_meta())
    for seed in range(1, 10):
        pins.mismatch(make_meta(seed=seed), "foreign")
    assert len(pins.known) == 5 and make_meta(seed=9).digest in pins.known
