"""The corruption description (docs/SPEC.md §2.5, docs/PROTOCOL.md §4.1), typed and declared once.

A :class:`Corruption` is what a stream says about its corruption: the policy (a frozen dataclass
per policy, :data:`POLICY_TYPES`), the mask fractions, whether ``[SEP]`` is a candidate and how
a random replacement is drawn. Everything that follows from it lives here: the candidate rule,
whether batches carry the ``stage`` tensor, whether the NLL bound holds, and what the
context-free floor needs (:meth:`Corruption.floor_parts`). Its JSON form exists only at the wire
edge: :attr:`Corruption.json_text` (canonical, what the meta's digest covers) and
:meth:`Corruption.from_json` (strict: a text that does not re-encode to itself is refused).

A policy's parameters are its dataclass fields; those made by :func:`shared.settings.setting`
are also producer flags (``shared.data_config`` adds them), so adding a policy is a class here,
registered in :data:`POLICY_TYPES`, plus its selection in ``producer.selection``. Numbers keep
the type they were given (``1`` stays ``1``, not ``1.0``), so a parsed description re-encodes
to the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from shared.canonical import canonical_json
from shared.limits import DEFAULT_MASK_FRACTIONS, MAX_STAGES
from shared.settings import floats, setting, settings_fields, show_floats

SPLITS = ("train", "val")
MAX_SPANS = 1 << 16
# How a "random" replacement is drawn, as the producer states it.
RANDOM_TOKEN = "uniform over the base ids other than the original"
BASELINE_STAGES = Path(__file__).resolve().parent / "stages-baseline.toml"  # the fixed-window baseline's mix


class CorruptionError(ValueError):
    """A corruption description (or a stage file) is invalid; the message names the field."""


@dataclass(frozen=True)
class FloorPart:
    """One part of a policy's supervised positions, as the context-free floor sees it.

    Attributes:
        ratio: the expected fraction of a row's candidates this part supervises (its weight).
        mask_only: every supervised input is ``[MASK]`` (else the mask fractions apply).
    """

    ratio: float
    mask_only: bool = False


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _ratio(name: str, value: Any) -> None:
    if not (_is_number(value) and 0 <= value <= 1):
        raise CorruptionError(f"{name} must be a number in [0, 1], got {json.dumps(value)[:100]}")


def _count(name: str, value: Any, high: int) -> None:
    if not (type(value) is int and 1 <= value <= high):
        raise CorruptionError(f"{name} must be a positive integer up to {high}, got {json.dumps(value)[:100]}")


def _plain(value: Any) -> Any:
    """A field value in its JSON form: tuples become lists."""
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def _exact_keys(where: str, mapping: Any, wanted: set[str]) -> None:
    if not isinstance(mapping, dict):
        raise CorruptionError(f"{where} must be a map")
    missing, unknown = sorted(wanted - set(mapping)), sorted(set(map(str, mapping)) - wanted)
    if missing or unknown:
        raise CorruptionError(f"{where}: missing {missing} / unknown {unknown}")


# ---- stage types (the stages policy) --------------------------------------------------------


class _Stage:
    type: ClassVar[str]
    mask_only: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class RandomStage(_Stage):
    """Per row ``r ~ U(0, m)``; ``round(r * n)`` candidates chosen uniformly."""

    max_masked_ratio: float
    type: ClassVar[str] = "random"

    def __post_init__(self) -> None:
        _ratio("max_masked_ratio", self.max_masked_ratio)

    def expected_ratio(self, candidates: int) -> float:
        return self.max_masked_ratio / 2.0


@dataclass(frozen=True)
class StickyStage(_Stage):
    """A mask grown in rounds up to ``ceil(target * n)`` (``producer.stages.sticky_select``)."""

    target_masked_ratio: float
    p1_probability: float
    p2_probability: float
    type: ClassVar[str] = "sticky"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _ratio(field.name, getattr(self, field.name))
        if self.p1_probability == 0:
            raise CorruptionError("p1_probability must be above 0, or the mask never starts")

    def expected_ratio(self, candidates: int) -> float:
        return float(sticky_target(self.target_masked_ratio, np.int64(candidates))) / candidates


def sticky_target(ratio: Any, candidates: Any) -> np.ndarray:
    """int64 ``ceil(ratio * n)``, at most n: what a sticky stage supervises of n candidates (the
    epsilon keeps 0.3 * 10 from becoming 4 through rounding error)."""
    return np.minimum(np.ceil(ratio * candidates - 1e-9).astype(np.int64), candidates)


@dataclass(frozen=True)
class SpanStage(_Stage):
    """``spans_count`` k: 2k sorted uniform candidate indices bound k inclusive spans, all ``[MASK]``."""

    spans_count: int
    type: ClassVar[str] = "span"
    mask_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _count("spans_count", self.spans_count, MAX_SPANS)

    def expected_ratio(self, candidates: int) -> float:
        """The exact expected coverage of the union of the k spans over ``0..n-1``:
        ``1 - mean_i ½[(1 - 1/n)^2k + (1 - (2i+1)/n)^2k]`` (→ ``k / (2k + 1)`` for large n)."""
        n = float(candidates)
        after = 1.0 - (2.0 * np.arange(candidates) + 1.0) / n
        return float(1.0 - 0.5 * np.mean((1.0 - 1.0 / n) ** (2 * self.spans_count) + after ** (2 * self.spans_count)))


Stage = RandomStage | StickyStage | SpanStage
STAGE_TYPES: dict[str, type[Stage]] = {cls.type: cls for cls in (RandomStage, StickyStage, SpanStage)}


def stage_from_dict(table: Any, where: str) -> Stage:
    """A stage from its map (``type`` and exactly its parameters); errors name ``where``."""
    kind = table.get("type") if isinstance(table, dict) else None
    if kind not in STAGE_TYPES:
        raise CorruptionError(f"{where}: type {kind!r} is not one of {sorted(STAGE_TYPES)}")
    cls = STAGE_TYPES[kind]
    parameters = {k: v for k, v in table.items() if k != "type"}
    try:
        _exact_keys(f"a {kind} stage", parameters, {f.name for f in dataclasses.fields(cls)})
        return cls(**parameters)
    except CorruptionError as error:
        raise CorruptionError(f"{where}: {error}") from None


# ---- policies --------------------------------------------------------------------------------


class _Policy:
    """What every policy has; subclasses are frozen dataclasses whose fields are their parameters."""

    name: ClassVar[str]
    carries_stage: ClassVar[bool] = False  # batches carry the uint8 ``stage`` tensor

    @classmethod
    def flags(cls) -> dict[str, tuple[Any, dataclasses.Field]]:
        """Producer flags: field name -> (annotation, a fresh :func:`~shared.settings.setting` field)."""
        return {f.name: (f.type, dataclasses.field(default=f.default, metadata=f.metadata)) for f in settings_fields(cls)}

    @classmethod
    def from_flags(cls, values: Any):
        """The policy from parsed flags (an object with the flags' attributes, e.g. a DataConfig)."""
        return cls(**{f.name: getattr(values, f.name) for f in settings_fields(cls)})

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """The policy from its parameters' JSON values (lists become tuples)."""
        _exact_keys(f"corruption ({cls.name})", data, {f.name for f in dataclasses.fields(cls)})
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def __post_init__(self) -> None:
        """Each setting's own ``check``, as a :class:`CorruptionError` naming the field."""
        for f in settings_fields(type(self)):
            check = f.metadata["setting"]["check"]
            try:
                check is None or check(getattr(self, f.name))
            except (ValueError, TypeError) as error:
                raise CorruptionError(f"corruption {f.name}: {error}") from None

    def stage_count(self, split: str) -> int:
        """How many stages ``split`` has (a batch's ``stage`` values are below it); 0 without stages."""
        return 0

    def nll_bound_unavailable(self) -> str | None:
        """None when this policy's ratios make the inverse-t loss the NLL bound, else why not."""
        return f"the policy is {self.name}, the bound needs uniform"

    def label(self) -> str:
        """A short description for people."""
        return self.name


def _probability(value: Any) -> None:
    if not (_is_number(value) and 0 < value <= 1):
        raise ValueError(f"{value} is outside (0, 1]")


def _ratio_range(value: Any) -> None:
    if not (isinstance(value, tuple) and len(value) == 2 and all(map(_is_number, value)) and 0 <= value[0] <= value[1] <= 1):
        raise ValueError(f"ratio range {value} must be LO,HI with 0 <= LO <= HI <= 1")


@dataclass(frozen=True)
class BertPolicy(_Policy):
    """Each candidate is supervised independently with probability ``mask_prob``."""

    mask_prob: float = setting(0.15, "bert: probability that a candidate is supervised", check=_probability)
    name: ClassVar[str] = "bert"

    def floor_parts(self, split: str, candidates: int) -> tuple[FloorPart, ...]:
        return (FloorPart(self.mask_prob),)

    def label(self) -> str:
        return f"bert ({self.mask_prob:.0%})"


@dataclass(frozen=True)
class UniformPolicy(_Policy):
    """Per row ``r ~ U(lo, hi)``; ``round(r * n)`` candidates chosen uniformly."""

    ratio_range: tuple[float, float] = setting((0.0, 1.0), "uniform: per-row ratio r ~ U(LO, HI)", metavar="LO,HI",
                                               parse=floats, show=show_floats, check=_ratio_range)
    name: ClassVar[str] = "uniform"

    @classmethod
    def from_flags(cls, values: Any) -> UniformPolicy:
        return cls(tuple(float(v) for v in values.ratio_range))

    def floor_parts(self, split: str, candidates: int) -> tuple[FloorPart, ...]:
        return (FloorPart(sum(self.ratio_range) / 2.0),)

    def nll_bound_unavailable(self) -> str | None:
        if self.ratio_range != (0, 1):
            return "the bound needs a mask ratio drawn over the whole of [0, 1] (--ratio-range 0,1)"
        return None


@dataclass(frozen=True)
class StagesPolicy(_Policy):
    """Rows shared equally among the stages of their split (``train`` or ``val``), each stage
    a :data:`Stage` with its own type and parameters."""

    train: tuple[Stage, ...]
    val: tuple[Stage, ...]
    name: ClassVar[str] = "stages"
    carries_stage: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for split in SPLITS:
            stages = getattr(self, split)
            if not isinstance(stages, tuple) or not 1 <= len(stages) <= MAX_STAGES:
                raise CorruptionError(f"corruption stages.{split} must list 1..{MAX_STAGES} stages")
            if not all(isinstance(stage, tuple(STAGE_TYPES.values())) for stage in stages):
                raise CorruptionError(f"corruption stages.{split} holds something that is not a stage")

    @classmethod
    def flags(cls) -> dict[str, tuple[Any, dataclasses.Field]]:
        return {"stages": ("str | None", setting(None, "stages: TOML stage file (none: the shipped baseline mix)", metavar="FILE"))}

    @classmethod
    def from_flags(cls, values: Any) -> StagesPolicy:
        return load_stage_file(values.stages if values.stages is not None else BASELINE_STAGES)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StagesPolicy:
        _exact_keys("corruption (stages)", data, {"stages"})
        _exact_keys("corruption stages", data["stages"], set(SPLITS))
        lists = {}
        for split in SPLITS:
            tables = data["stages"][split]
            if not isinstance(tables, list) or not 1 <= len(tables) <= MAX_STAGES:
                raise CorruptionError(f"corruption stages.{split} must list 1..{MAX_STAGES} stages")
            lists[split] = tuple(stage_from_dict(t, f"corruption stages.{split}[{i}]") for i, t in enumerate(tables))
        return cls(**lists)

    def to_dict(self) -> dict[str, Any]:
        return {"stages": {split: [stage.to_dict() for stage in getattr(self, split)] for split in SPLITS}}

    def stage_count(self, split: str) -> int:
        return len(getattr(self, split))

    def floor_parts(self, split: str, candidates: int) -> tuple[FloorPart, ...]:
        return tuple(FloorPart(stage.expected_ratio(candidates), stage.mask_only) for stage in getattr(self, split))


def _span_mean(value: Any) -> None:
    if not (_is_number(value) and 1 <= value <= MAX_SPANS):
        raise ValueError(f"mean span length {value} is outside [1, {MAX_SPANS}]")


@dataclass(frozen=True)
class SpanPolicy(_Policy):
    """Span masking (SpanBERT / T5 style): per row, ``round(span_ratio * n)`` candidates in
    non-overlapping spans whose lengths are geometric with mean ``span_mean`` (the last one
    cut to the count), placed uniformly at random and apart where the row has room. Each
    supervised input then follows the mask fractions, as with bert."""

    span_ratio: float = setting(0.15, "span: fraction of a row's candidates supervised, in spans", check=_probability)
    span_mean: float = setting(3.0, "span: mean span length (geometric lengths, >= 1)", check=_span_mean)
    name: ClassVar[str] = "span"

    def floor_parts(self, split: str, candidates: int) -> tuple[FloorPart, ...]:
        return (FloorPart(self.span_ratio),)

    def label(self) -> str:
        return f"span ({self.span_ratio:.0%}, mean length {self.span_mean:g})"


def load_stage_file(path: str | Path) -> StagesPolicy:
    """Parse and validate a TOML stage file (``[[train]]`` and ``[[val]]`` tables, each a stage);
    raises :class:`CorruptionError` naming the file and the stage. Ratios become floats."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise CorruptionError(f"stage file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise CorruptionError(f"stage file {path} is not TOML: {error}") from None
    unknown = sorted(set(document) - set(SPLITS))
    if unknown:
        raise CorruptionError(f"stage file {path}: unknown top-level keys {unknown}; expected [[train]] and [[val]]")
    lists = {}
    for split in SPLITS:
        tables = document.get(split)
        if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
            raise CorruptionError(f"stage file {path}: needs at least one [[{split}]] stage")
        if len(tables) > MAX_STAGES:
            raise CorruptionError(f"stage file {path}: {len(tables)} {split} stages, at most {MAX_STAGES}")
        # TOML integers in ratio fields are read as floats (what the producer has always described).
        tables = [{k: float(v) if type(v) is int and k != "spans_count" else v for k, v in t.items()} for t in tables]
        lists[split] = tuple(stage_from_dict(t, f"stage file {path} [[{split}]] #{i + 1}") for i, t in enumerate(tables))
    return StagesPolicy(**lists)


Policy = BertPolicy | UniformPolicy | StagesPolicy | SpanPolicy
POLICY_TYPES: dict[str, type[Policy]] = {cls.name: cls for cls in (BertPolicy, UniformPolicy, StagesPolicy, SpanPolicy)}


def policy_flags() -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every policy's flags (``shared.data_config`` declares them), in registry order."""
    return {name: flag for cls in POLICY_TYPES.values() for name, flag in cls.flags().items()}


# ---- the whole description --------------------------------------------------------------------


def _check_fractions(value: Any) -> None:
    if not (isinstance(value, tuple) and len(value) == 3 and all(_is_number(v) and v >= 0 for v in value)
            and math.isclose(sum(value), 1.0, abs_tol=1e-6)):
        raise CorruptionError(f"corruption mask_fractions {list(value) if isinstance(value, tuple) else value!r} "
                              "must be three non-negative numbers M,R,U that sum to 1")


@dataclass(frozen=True, eq=False)
class Corruption:
    """A stream's corruption. Equal when their JSON forms are (so ``1`` and ``1.0`` differ, as
    their digests do).

    Attributes:
        policy: which positions are supervised (one of :data:`POLICY_TYPES`).
        mask_fractions: (M, R, U): a supervised input becomes ``[MASK]``, another base token,
            or stays unchanged (``mask_only`` parts: always ``[MASK]``).
        supervise_sep: ``[SEP]`` is a candidate too (line packing); None when the description
            does not say (older streams), which means False.
        random_token: how a random replacement is drawn, in words; None when not stated.
    """

    policy: Policy
    mask_fractions: tuple[float, float, float] = DEFAULT_MASK_FRACTIONS
    supervise_sep: bool | None = None
    random_token: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.policy, tuple(POLICY_TYPES.values())):
            raise CorruptionError(f"corruption policy must be one of {tuple(POLICY_TYPES)}")
        _check_fractions(self.mask_fractions)
        if self.supervise_sep is not None and type(self.supervise_sep) is not bool:
            raise CorruptionError("corruption supervise_sep must be a bool")
        if self.random_token is not None and type(self.random_token) is not str:
            raise CorruptionError("corruption random_token must be a str")

    @classmethod
    def from_flags(cls, values: Any) -> Corruption:
        """What a producer describes from its settings (``policy``, the policy's flags,
        ``mask_fractions``, ``supervise_sep``)."""
        policy = POLICY_TYPES[values.policy].from_flags(values)
        return cls(policy, tuple(values.mask_fractions), values.supervise_sep, RANDOM_TOKEN)

    @classmethod
    def from_dict(cls, data: Any) -> Corruption:
        """From the JSON map: ``policy``, its parameters, ``mask_fractions``, and optionally
        ``supervise_sep`` and ``random_token``."""
        kind = data.get("policy") if isinstance(data, dict) else None
        if kind not in POLICY_TYPES:
            raise CorruptionError(f"corruption must be a JSON object whose policy is one of {tuple(POLICY_TYPES)}")
        common = {"policy", "mask_fractions", "supervise_sep", "random_token"}
        if "mask_fractions" not in data:
            raise CorruptionError("corruption: missing ['mask_fractions']")
        fractions = data["mask_fractions"]
        policy = POLICY_TYPES[kind].from_dict({k: v for k, v in data.items() if k not in common})
        return cls(policy, tuple(fractions) if isinstance(fractions, list) else fractions,
                   data.get("supervise_sep"), data.get("random_token"))

    @classmethod
    def from_json(cls, text: str) -> Corruption:
        """Parse the wire form; raises :class:`CorruptionError` unless ``text`` is the canonical
        JSON of a valid description."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as error:  # deep nesting raises RecursionError
            raise CorruptionError(f"corruption is not JSON: {error}") from None
        parsed = cls.from_dict(data)
        if parsed.json_text != text:
            raise CorruptionError("corruption is not in canonical JSON form (sorted keys, no whitespace, ASCII)")
        return parsed

    def to_dict(self) -> dict[str, Any]:
        """The JSON map (a new dict)."""
        data = {"policy": self.policy.name, **self.policy.to_dict(), "mask_fractions": list(self.mask_fractions)}
        for name in ("supervise_sep", "random_token"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data

    @cached_property
    def json_text(self) -> str:
        """The wire form: canonical JSON of :meth:`to_dict`."""
        return canonical_json(self.to_dict())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Corruption) and self.json_text == other.json_text

    def __hash__(self) -> int:
        return hash(self.json_text)

    @property
    def carries_stage(self) -> bool:
        """Batches carry the ``stage`` tensor (uint8, an index into the split's stages)."""
        return self.policy.carries_stage

    def sep_is_candidate(self, packing: str) -> bool:
        """``[SEP]`` is a corruption candidate: with ``supervise_sep`` and line packing."""
        return bool(self.supervise_sep) and packing == "lines"

    def candidates(self, content_len: Any, packing: str) -> Any:
        """Candidates per row (int or int array): the content, plus ``[SEP]`` when it is one."""
        return content_len + int(self.sep_is_candidate(packing))

    def most_candidates(self, block_size: int, packing: str) -> int:
        """The most candidates a row can have (``block_size - 1`` content tokens with line packing)."""
        return self.candidates(block_size - int(packing == "lines"), packing)

    def floor_parts(self, split: str, candidates: int) -> tuple[FloorPart, ...]:
        """The context-free floor's inputs: the parts of ``split``'s supervised positions, at
        ``candidates`` candidates per row."""
        return self.policy.floor_parts(split, candidates)

    def nll_bound_unavailable(self) -> str | None:
        """None when the ``inverse-t`` weighted loss of the stream is an upper bound on its
        negative log-likelihood per token (the MDLM / LLaDA bound), else why not.

        The bound needs the absorbing (mask-only) corruption, ``mask_fractions`` 1,0,0, at a
        per-row ratio drawn uniformly over [0, 1] (``--policy uniform --ratio-range 0,1``):
        then a row's ``1/t``-weighted masked cross-entropy estimates ``E_t[(1/t) sum_masked
        -log p]``. (The ratio is ``round(t n) / n``, so it is the bound up to that rounding.)
        """
        reason = self.policy.nll_bound_unavailable()
        if reason is None and self.mask_fractions != (1, 0, 0):
            return "the bound needs mask-only corruption (--mask-fractions 1,0,0)"
        return reason

    def label(self) -> str:
        """A short description for people: the policy and its main parameter."""
        return self.policy.label()
