"""The stages policy (docs/SPEC.md §2.5): a TOML stage file with ``[[train]]`` and ``[[val]]`` stages.

The rows of each message are shared equally among the stages of its split (which stages get
the leftover rows is random), then shuffled. Stage types and their parameters:

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

import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from producer.corruption import Selection, candidate_mask, choose_k, rounded_count
from shared.limits import MAX_STAGES

MAX_STICKY_ROUNDS = 256


EXAMPLE_STAGES = Path(__file__).resolve().parent / "examples" / "stages-baseline.toml"


class StageError(ValueError):
    """The stage file is missing or invalid."""


@dataclass(frozen=True)
class RandomStage:
    max_masked_ratio: float
    type: str = "random"


@dataclass(frozen=True)
class StickyStage:
    target_masked_ratio: float
    p1_probability: float
    p2_probability: float
    type: str = "sticky"


@dataclass(frozen=True)
class SpanStage:
    spans_count: int
    type: str = "span"


Stage = RandomStage | StickyStage | SpanStage
_STAGE_TYPES = {"random": RandomStage, "sticky": StickyStage, "span": SpanStage}


@dataclass(frozen=True)
class StagePlan:
    """The train and val stage lists of a stage file."""

    train: tuple[Stage, ...]
    val: tuple[Stage, ...]

    def describe(self) -> dict[str, list[dict[str, Any]]]:
        """JSON form; each stage carries its type and parameters (span stages: all [MASK])."""
        return {split: [asdict(stage) for stage in getattr(self, split)] for split in ("train", "val")}


def load_stage_plan(path: str | Path) -> StagePlan:
    """Parse and validate a stage file; raises :class:`StageError` naming the file and the stage."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise StageError(f"stage file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise StageError(f"stage file {path} is not TOML: {error}") from None
    unknown = sorted(set(document) - {"train", "val"})
    if unknown:
        raise StageError(f"stage file {path}: unknown top-level keys {unknown}; expected [[train]] and [[val]]")
    lists = {}
    for split in ("train", "val"):
        tables = document.get(split)
        if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
            raise StageError(f"stage file {path}: needs at least one [[{split}]] stage")
        if len(tables) > MAX_STAGES:
            raise StageError(f"stage file {path}: {len(tables)} {split} stages, at most {MAX_STAGES}")
        lists[split] = tuple(_parse_stage(table, f"{path} [[{split}]] #{i + 1}") for i, table in enumerate(tables))
    return StagePlan(**lists)


def _parse_stage(table: dict[str, Any], where: str) -> Stage:
    kind = table.get("type")
    if kind not in _STAGE_TYPES:
        raise StageError(f"{where}: type {kind!r} is not one of {sorted(_STAGE_TYPES)}")
    cls = _STAGE_TYPES[kind]
    wanted = set(cls.__dataclass_fields__) - {"type"}
    if set(table) - {"type"} != wanted:
        raise StageError(f"{where}: a {kind} stage takes exactly {sorted(wanted)}, got {sorted(set(table) - {'type'})}")
    if kind == "span":
        count = table["spans_count"]
        if type(count) is not int or count < 1:
            raise StageError(f"{where}: spans_count must be a positive integer, got {count!r}")
        return SpanStage(count)
    values = {}
    for name in wanted:
        value = table[name]
        if type(value) not in (int, float) or not 0.0 <= value <= 1.0:
            raise StageError(f"{where}: {name} must be a number in [0, 1], got {value!r}")
        values[name] = float(value)
    if kind == "sticky" and values["p1_probability"] == 0.0:
        raise StageError(f"{where}: p1_probability must be above 0, or the mask never starts")
    return cls(**values)


class StagesPolicy:
    """Selection by the stages of a :class:`StagePlan` (train stages for train, val for val)."""

    def __init__(self, plan: StagePlan) -> None:
        self.plan = plan
        self._tables = {split: _StageTable(getattr(plan, split)) for split in ("train", "val")}

    def describe(self) -> dict[str, Any]:
        return {"policy": "stages", "stages": self.plan.describe()}

    def select(self, rng: np.random.Generator, n_candidates: np.ndarray, block_size: int, split: str) -> Selection:
        table = self._tables[split]
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
            # ceil of the exact product; the epsilon keeps 0.3 * 10 from becoming 4 through rounding error.
            target = np.minimum(np.ceil(table.target_ratio[of] * n - 1e-9).astype(np.int64), n)
            supervised[sticky_rows] = sticky_select(rng, n, block_size, target, table.p1[of], table.p2[of])
        span_rows = np.flatnonzero(kind == _SPAN)
        if span_rows.size:
            spans = table.spans[stage[span_rows]]
            supervised[span_rows] = span_select(rng, n_candidates[span_rows], block_size, spans)
        return Selection(supervised, kind == _SPAN, stage.astype(np.uint8))


_RANDOM, _STICKY, _SPAN = 0, 1, 2


class _StageTable:
    """The parameters of a stage list as arrays indexed by stage (0 where a type lacks one)."""

    def __init__(self, stages: tuple[Stage, ...]) -> None:
        self.kind = np.array([list(_STAGE_TYPES).index(s.type) for s in stages])
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
