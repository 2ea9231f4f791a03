"""Mixtures: several corpora (sources) in one stream, with weights (docs/SPEC.md §2.9,
docs/PROTOCOL.md §4.4).

:class:`SourceInfo` is what the stream meta says about one source (``StreamMeta.sources``).
:class:`Mixture` is the row -> source assignment, a pure function of the global row index
``i = k * R + j`` (message k, row j) and the meta's sources, which producers and trainers both
compute:

- **The rule.** Row ``i`` goes to a source by Tijdeman's rule for the chairman assignment
  problem: with ``c_s`` the rows source s got among rows ``0..i-1``, ``t = i + 1``, the target
  shares ``λ_s = w_s / Σw`` and ``δ = 1 / (2m - 2)`` (m sources), the sources that may take the row
  are those with ``t λ_s - c_s >= δ`` (taking it does not put them a row ahead), and of those the
  row goes to the one with the earliest deadline ``(c_s + 1 - δ) / λ_s`` (ties: the lowest index).
  Tijdeman (1980) proved that then ``|c_s(n) - n λ_s| <= 1 - δ < 1`` for every source and every
  n: after any number of rows every source is within one row of its target. (Megatron-LM's
  greedy rule, "the source that lags its target most", is not: with 8 sources of weights
  1, 596, 442, 823, 9, 9, 1, 1 a source gets 1.13 rows ahead of its target.)
- **Exact and periodic.** The weights are exact fractions (the shortest decimal form of each
  float, ``0.2`` is 1/5), reduced to integer parts ``W_s`` with no common factor; their sum ``P``
  (at most :data:`~shared.limits.MAX_MIXTURE_PERIOD`) is the period: after P rows every source
  has exactly ``W_s`` rows and the rule starts over. So one period is computed once
  (:class:`Period`), and any row range ``[a, b)`` and the counts before any n cost the same time
  whatever a and n (a run resumed at row 10^9 replays nothing).
- **max_epochs.** A source with ``max_epochs = E > 0`` has ``E * epoch_rows`` rows in all
  (epoch sampling). When it has had them it drops out: from that row on the remaining sources
  share the rows by the same rule over their own weights (a new segment, counted from its first
  row). When every source has dropped out the stream ends: rows from :attr:`Mixture.end` on do
  not exist (a producer makes no message that holds one). All of it follows from the meta alone,
  so the trainer knows when a source is exhausted (:meth:`Mixture.exhausted`).
- **Bounded work.** Each segment's period costs ``P x m`` steps of the rule to compute; a
  mixture whose segments would take more than :data:`~shared.limits.MAX_MIXTURE_STEPS` in all
  (at most what one period of the most sources at the longest period takes) is refused before
  the period that would pass it is computed, so a forged meta costs no more than that.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from fractions import Fraction
from functools import cached_property
from typing import Any

import numpy as np

from shared.limits import COUNT_DTYPE, MAX_MIXTURE_PERIOD, MAX_MIXTURE_STEPS, MAX_SOURCES

SOURCE_NAME = re.compile(r"[a-z0-9_-]{1,32}")
FINGERPRINT = re.compile(r"[0-9a-f]{16}")
MAX_INT64 = (1 << 63) - 1  # max_epochs and epoch_rows fit a msgpack int64
SOURCE_DTYPE = np.dtype("u1")  # the wire's source tensor


class MixtureError(ValueError):
    """Sources that cannot make a mixture (names, weights, limits)."""


@dataclass(frozen=True)
class SourceInfo:
    """One source of a mixture, as the stream meta holds it.

    Attributes:
        name: ``[a-z0-9_-]{1,32}``, unique in the mixture (the diagnostics' label).
        weight: its weight (> 0, finite); its target share of the train rows is weight / sum of weights.
        corpus_fingerprint: 16 hex digits naming its corpus (as a single corpus's meta field).
        max_epochs: epochs of it the stream may use (epoch sampling); 0 = unlimited.
        epoch_rows: rows in one epoch of it (the greedy packs of its train lines) with epoch
            sampling, 0 with random sampling.
        token_counts: occurrences of each base id in its train split: V0 little-endian uint64 (as
            the meta's ``token_counts``), for its context-free floor.
    """

    name: str
    weight: float
    corpus_fingerprint: str
    max_epochs: int
    epoch_rows: int
    token_counts: bytes

    def __post_init__(self) -> None:
        if type(self.name) is not str or not SOURCE_NAME.fullmatch(self.name):
            raise MixtureError(f"source name {self.name!r} is not 1-32 of a-z, 0-9, _ and -")
        if type(self.weight) is int:
            object.__setattr__(self, "weight", float(self.weight))
        if type(self.weight) is not float or not (math.isfinite(self.weight) and self.weight > 0):
            raise MixtureError(f"source {self.name}: weight {self.weight!r} is not a positive finite number")
        if type(self.corpus_fingerprint) is not str or not FINGERPRINT.fullmatch(self.corpus_fingerprint):
            raise MixtureError(f"source {self.name}: corpus_fingerprint must be 16 lowercase hex digits")
        for name in ("max_epochs", "epoch_rows"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= MAX_INT64:
                raise MixtureError(f"source {self.name}: {name} {value!r} is not an integer in 0..2^63-1")
        if self.max_epochs * self.epoch_rows > MAX_INT64:
            raise MixtureError(f"source {self.name}: max_epochs x epoch_rows is over 2^63-1 rows")
        if self.max_epochs and not self.epoch_rows:
            raise MixtureError(f"source {self.name}: max_epochs needs epoch sampling (its epoch_rows is 0)")
        if type(self.token_counts) is not bytes or len(self.token_counts) % COUNT_DTYPE.itemsize:
            raise MixtureError(f"source {self.name}: token_counts must be bytes of little-endian uint64")

    @property
    def counts(self) -> np.ndarray:
        """``token_counts`` as a read-only uint64 array (V0,)."""
        return np.frombuffer(self.token_counts, dtype=COUNT_DTYPE)

    def to_wire(self) -> dict[str, Any]:
        """The wire form: a map of the fields, ``token_counts`` raw bytes."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_dict(self) -> dict[str, Any]:
        """The plain form: ``token_counts`` a list of integers (what the digest covers)."""
        return {**self.to_wire(), "token_counts": self.counts.tolist()}

    def summary(self) -> SourceSummary:
        """The source without its counts (for diagnostics)."""
        return SourceSummary(**{f.name: getattr(self, f.name) for f in fields(SourceSummary)})

    @classmethod
    def parse(cls, data: Any, wire: bool) -> SourceInfo:
        """A source from its wire form (``wire``) or plain form; MixtureError on a missing, extra or mistyped field."""
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or set(data) != set(names):
            keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise MixtureError(f"a source is a map of exactly {names}, got {keys}")
        counts = data["token_counts"]
        if not wire:
            if not isinstance(counts, (list, tuple)) or not all(type(c) is int and 0 <= c < 1 << 64 for c in counts):
                raise MixtureError("a source's token_counts must be a list of integers in 0..2^64-1")
            counts = np.asarray(counts, dtype=COUNT_DTYPE).tobytes()
        return cls(**{**data, "token_counts": counts})


@dataclass(frozen=True)
class SourceSummary:
    """A :class:`SourceInfo` without its counts, as the diagnostics show it."""

    name: str
    weight: float
    corpus_fingerprint: str
    max_epochs: int
    epoch_rows: int


def source_differences(a: SourceInfo, b: SourceInfo) -> list[tuple[str, Any, Any]]:
    """``(field, a's value, b's value)`` for every field of two sources that differs; counts are
    shown by their sum of tokens."""
    def shown(source: SourceInfo, name: str) -> Any:
        if name == "token_counts":
            return f"{int(source.counts.sum())} tokens ({len(source.counts)} ids)"
        return getattr(source, name)

    return [(f.name, shown(a, f.name), shown(b, f.name)) for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def check_sources(sources: Sequence[SourceInfo], base_size: int) -> None:
    """Raises MixtureError unless ``sources`` can make a mixture of a stream of ``base_size`` base ids."""
    if not 1 <= len(sources) <= MAX_SOURCES:
        raise MixtureError(f"a mixture has 1..{MAX_SOURCES} sources, not {len(sources)}")
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise MixtureError(f"source names {names} repeat")
    for source in sources:
        if len(source.counts) != base_size:
            raise MixtureError(f"source {source.name}: token_counts has {len(source.counts)} ids, the stream {base_size}")
    if len({bool(source.epoch_rows) for source in sources}) != 1:
        raise MixtureError("either every source has epoch_rows (epoch sampling) or none")
    weight_parts([source.weight for source in sources])


def weight_parts(weights: Sequence[float]) -> tuple[int, ...]:
    """The weights as integers with the same ratios and no common factor (each weight taken as the
    exact fraction its shortest decimal form writes: 0.3 is 3/10). MixtureError when their sum,
    the period, is over :data:`MAX_MIXTURE_PERIOD`."""
    fractions = [Fraction(repr(float(weight))) for weight in weights]
    denominator = math.lcm(*(fraction.denominator for fraction in fractions))
    parts = [int(fraction * denominator) for fraction in fractions]
    common = math.gcd(*parts)
    parts = [part // common for part in parts]
    if sum(parts) > MAX_MIXTURE_PERIOD:
        raise MixtureError(f"weights {list(weights)} are in the ratio {':'.join(map(str, parts))}, which repeats only "
                           f"after {sum(parts)} rows (at most {MAX_MIXTURE_PERIOD}): round them to fewer digits")
    return tuple(parts)


class Period:
    """One period of Tijdeman's rule for integer weight ``parts`` (the module docstring).

    Attributes:
        parts: the integer weights W (m,); ``size`` P = sum(W).
        order: uint8 (P,): the source (index into ``parts``) of each row of the period.
        prefix: int64 (P + 1, m): rows each source got among the period's first r rows.
    """

    def __init__(self, parts: Sequence[int]) -> None:
        self.parts = np.asarray(parts, dtype=np.int64)
        self.size = int(self.parts.sum())
        self.order = _tijdeman(list(map(int, parts)), self.size)
        self.prefix = np.zeros((self.size + 1, len(parts)), dtype=np.int64)
        self.prefix[np.arange(1, self.size + 1), self.order] = 1
        np.cumsum(self.prefix, axis=0, out=self.prefix)

    def counts_before(self, n: np.ndarray) -> np.ndarray:
        """Rows of each source among the first ``n`` rows: int64 (len(n), m) for an int64 array ``n``."""
        q, r = np.divmod(np.asarray(n, dtype=np.int64), self.size)
        return q[:, None] * self.parts[None, :] + self.prefix[r]

    def first_reaching(self, source: int, count: int) -> int:
        """The least n after which ``source`` has had ``count`` (>= 1) rows."""
        q = (count - 1) // int(self.parts[source])
        need = count - q * int(self.parts[source])
        return q * self.size + int(np.searchsorted(self.prefix[:, source], need, side="left"))


def _tijdeman(parts: list[int], size: int) -> np.ndarray:
    """The source of each row of one period (exact integer arithmetic, one Python step a row:
    computed once per mixture, P <= MAX_MIXTURE_PERIOD)."""
    m = len(parts)
    order = np.zeros(size, dtype=SOURCE_DTYPE)
    if m == 1:
        return order
    d = 2 * m - 2  # everything below is scaled by d, so δ = 1/d is an integer
    counts = [0] * m
    for t in range(1, size + 1):
        best, best_key = -1, 0
        for s in range(m):
            # eligible: t λ_s - c_s >= δ  <=>  t W_s d >= (c_s d + 1) P
            if t * parts[s] * d >= (counts[s] * d + 1) * size:
                key = counts[s] * d + d - 1  # the deadline (c_s + 1 - δ) / λ_s is key * P / (d W_s)
                if best < 0 or key * parts[best] < best_key * parts[s]:
                    best, best_key = s, key
        if best < 0:
            raise AssertionError(f"Tijdeman's rule found no source for row {t - 1} of weights {parts}")
        order[t - 1] = best
        counts[best] += 1
    return order


@dataclass(frozen=True)
class Segment:
    """Rows ``start .. stop - 1`` (``stop`` None: for ever), shared by the sources ``active`` (by
    their own period); ``base`` (m,) are the rows each source had before ``start``."""

    start: int
    stop: int | None
    active: np.ndarray
    base: np.ndarray
    period: Period


class Mixture:
    """The row -> source assignment of a stream's sources (the module docstring)."""

    def __init__(self, sources: Sequence[SourceInfo]) -> None:
        self.sources = tuple(sources)
        self.weights = tuple(source.weight for source in self.sources)
        self.limits = np.array([s.max_epochs * s.epoch_rows for s in self.sources], dtype=np.int64)  # 0: none
        self.segments: list[Segment] = []
        self.end: int | None = None  # rows from here on do not exist (every source exhausted)
        active, base, start, steps = np.arange(len(self.sources)), np.zeros(len(self.sources), dtype=np.int64), 0, 0
        while True:
            parts = weight_parts([self.weights[s] for s in active])
            steps += sum(parts) * len(parts)
            if steps > MAX_MIXTURE_STEPS:
                raise MixtureError(f"the sources' assignment would take over {MAX_MIXTURE_STEPS} steps to compute (segment "
                                   f"{len(self.segments) + 1}, started each time a source reaches its max_epochs, "
                                   f"brings it to {steps}): fewer digits in the weights or fewer sources with max_epochs")
            period = Period(parts)
            ends = [period.first_reaching(j, int(self.limits[s] - base[s])) for j, s in enumerate(active) if self.limits[s]]
            stop = start + min(ends) if ends else None
            self.segments.append(Segment(start, stop, active, base, period))
            if stop is None:
                return
            base = self.counts_before(stop)
            active = active[(self.limits[active] == 0) | (base[active] < self.limits[active])]
            start = stop
            if not len(active):
                self.end = stop
                return

    @cached_property
    def period(self) -> Period:
        """The period of every source's weight (before any is exhausted): the val set's proportions."""
        return self.segments[0].period

    def _segment(self, n: int) -> Segment:
        for segment in self.segments:
            if segment.stop is None or n < segment.stop:
                return segment
        return self.segments[-1]

    def counts_before(self, n: int) -> np.ndarray:
        """Rows each source got among the run's first ``n`` rows: int64 (m,)."""
        if n < 0:
            raise ValueError(f"row count {n} is negative")
        n = n if self.end is None else min(n, self.end)
        segment = self._segment(n)
        counts = segment.base.copy()
        counts[segment.active] += segment.period.counts_before(np.array([n - segment.start]))[0]
        return counts

    def assign(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """``(source, index)`` of rows ``start .. stop - 1``: uint8 and int64 arrays (stop - start,),
        the source of each row and its place among that source's rows (0, 1, 2, ...). Raises
        :class:`MixtureExhausted` when a row is at or beyond :attr:`end`."""
        if self.end is not None and stop > self.end:
            raise MixtureExhausted(f"the mixture ends after row {self.end} (every source reached its max_epochs)")
        rows = np.arange(start, stop, dtype=np.int64)
        if len(self.segments) == 1:  # no source has a limit: the common case, without masks
            period = self.period
            q, r = np.divmod(rows, period.size)
            source = period.order[r]
            return source, q * period.parts[source] + period.prefix[r, source]
        source = np.zeros(len(rows), dtype=SOURCE_DTYPE)
        index = np.zeros(len(rows), dtype=np.int64)
        for segment in self.segments:
            here = (rows >= segment.start) & (rows < (segment.stop if segment.stop is not None else stop))
            if not here.any():
                continue
            q, r = np.divmod(rows[here] - segment.start, segment.period.size)
            local = segment.period.order[r]
            source[here] = segment.active[local]
            index[here] = segment.base[source[here]] + q * segment.period.parts[local] + segment.period.prefix[r, local]
        return source, index

    def epochs_completed(self, n: int) -> np.ndarray:
        """Whole epochs of each source among the first ``n`` rows: int64 (m,) (0 with random sampling)."""
        epoch_rows = np.array([s.epoch_rows for s in self.sources], dtype=np.int64)
        return np.where(epoch_rows > 0, self.counts_before(n) // np.maximum(epoch_rows, 1), 0)

    def exhausted(self, n: int) -> np.ndarray:
        """bool (m,): which sources have had all their rows (``max_epochs``) among the first ``n`` rows."""
        return (self.limits > 0) & (self.counts_before(n) >= self.limits)


class MixtureExhausted(ValueError):
    """A row beyond the end of a mixture whose every source reached its max_epochs."""
