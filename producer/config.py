"""The data flags shared by every producer command and the benchmarks.

:class:`DataConfig` is the parsed, validated form; :func:`add_data_arguments` adds the flags
to an argparse parser and :meth:`DataConfig.from_args` reads them back. Values are checked
twice: by the argparse ``type`` functions (so a bad flag gives a usage error naming it) and
by :meth:`DataConfig.__post_init__` (so a config built in code is just as safe).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from producer.stages import load_stage_plan
from shared.wire import MAX_PRODUCER_ID_CHARS

PACKINGS = ("lines", "fixed")
SAMPLINGS = ("random", "epoch")
POLICIES = ("bert", "uniform", "stages")
MAX_BLOCK_SIZE = 65536
MAX_ROWS_PER_MESSAGE = 4096
EXAMPLE_STAGES = Path(__file__).resolve().parent / "examples" / "stages-baseline.toml"


@dataclass(frozen=True)
class DataConfig:
    """What a producer makes. ``producer_id=None`` lets the caller pick (``BatchStream`` uses "0");
    ``stages=None`` with the stages policy means the shipped baseline mix (:data:`EXAMPLE_STAGES`)."""

    corpus: str | None = None
    block_size: int = 1024
    rows_per_message: int = 16
    packing: str = "lines"
    sampling: str = "random"
    policy: str = "bert"
    mask_prob: float = 0.15
    ratio_range: tuple[float, float] = (0.0, 1.0)
    stages: str | None = None
    mask_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    supervise_sep: bool = False
    val_fraction: float = 0.1
    seed: int = 0
    producer_id: str | None = None

    def __post_init__(self) -> None:
        # Tuples of floats whatever sequence was passed, so configs compare and hash by value.
        object.__setattr__(self, "ratio_range", tuple(float(v) for v in self.ratio_range))
        object.__setattr__(self, "mask_fractions", tuple(float(v) for v in self.mask_fractions))
        _check_block_size(self.block_size)
        _check_rows(self.rows_per_message)
        _check_choice("packing", self.packing, PACKINGS)
        _check_choice("sampling", self.sampling, SAMPLINGS)
        _check_choice("policy", self.policy, POLICIES)
        _check_mask_prob(self.mask_prob)
        _check_ratio_range(self.ratio_range)
        _check_mask_fractions(self.mask_fractions)
        _check_val_fraction(self.val_fraction)
        _check_seed(self.seed)
        if self.producer_id is not None:
            _check_producer_id(self.producer_id)
        if self.stages is not None and self.policy != "stages":
            raise ValueError("--stages applies only to --policy stages")

    @property
    def stages_path(self) -> Path | None:
        """The stage file the stages policy reads, or None for the other policies."""
        if self.policy != "stages":
            return None
        return Path(self.stages) if self.stages is not None else EXAMPLE_STAGES

    @classmethod
    def from_args(cls, namespace: argparse.Namespace) -> "DataConfig":
        """The config of parsed :func:`add_data_arguments` flags; raises ValueError on a bad combination
        (and on a stage file that does not parse, so a command can report it as a usage error)."""
        config = cls(
            corpus=namespace.corpus,
            block_size=namespace.block_size,
            rows_per_message=namespace.rows_per_message,
            packing=namespace.packing,
            sampling=namespace.sampling,
            policy=namespace.policy,
            mask_prob=namespace.mask_prob,
            ratio_range=namespace.ratio_range,
            stages=namespace.stages,
            mask_fractions=namespace.mask_fractions,
            supervise_sep=namespace.supervise_sep,
            val_fraction=namespace.val_fraction,
            seed=namespace.seed,
            producer_id=namespace.producer_id,
        )
        if config.stages_path is not None:
            load_stage_plan(config.stages_path)
        return config


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the data flags (SPEC §2) to ``parser``, with defaults and value checks."""
    group = parser.add_argument_group("data")
    group.add_argument("--corpus", metavar="PATH", default=None,
                       help="UTF-8 text file or folder of .txt files (default: CPython's built-in help text)")
    group.add_argument("--block-size", type=_argtype(int, _check_block_size), default=1024,
                       help="tokens per row, T (default: 1024)")
    group.add_argument("--rows-per-message", type=_argtype(int, _check_rows), default=16,
                       help="rows per wire message (default: 16)")
    group.add_argument("--packing", choices=PACKINGS, default="lines",
                       help="lines: line-aligned rows ending in [SEP]; fixed: the fixed-window baseline")
    group.add_argument("--sampling", choices=SAMPLINGS, default="random",
                       help="random: uniform row starts; epoch: every line once per epoch, shuffled")
    group.add_argument("--policy", choices=POLICIES, default="bert", help="corruption policy (default: bert)")
    group.add_argument("--mask-prob", type=_argtype(float, _check_mask_prob), default=0.15,
                       help="bert: probability that a candidate is supervised (default: 0.15)")
    group.add_argument("--ratio-range", metavar="LO,HI", type=_argtype(_floats, _check_ratio_range),
                       default=(0.0, 1.0), help="uniform: per-row ratio r ~ U(LO, HI) (default: 0,1)")
    group.add_argument("--stages", metavar="FILE", default=None,
                       help="stages: TOML stage file (default: the shipped baseline mix)")
    group.add_argument("--mask-fractions", metavar="M,R,U", type=_argtype(_floats, _check_mask_fractions),
                       default=(0.8, 0.1, 0.1), help="supervised inputs: [MASK], random, unchanged (default: 0.8,0.1,0.1)")
    group.add_argument("--supervise-sep", action="store_true", help="make [SEP] a corruption candidate too")
    group.add_argument("--val-fraction", type=_argtype(float, _check_val_fraction), default=0.1,
                       help="fraction of lines (the last ones) held out for validation (default: 0.1)")
    group.add_argument("--seed", type=_argtype(int, _check_seed), default=0, help="base seed (default: 0)")
    group.add_argument("--producer-id", metavar="ID", type=_argtype(str, _check_producer_id), default=None,
                       help="this producer's id; its train stream differs from every other id's")


def _argtype(convert, check):
    """An argparse ``type``: convert the string, then check it; errors become usage errors."""

    def parse(text: str):
        try:
            value = convert(text)
            check(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error) or f"invalid value {text!r}") from None
        return value

    return parse


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of numbers") from None


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(choices)}")


def _check_block_size(value: int) -> None:
    if not 2 <= value <= MAX_BLOCK_SIZE:
        raise ValueError(f"block size {value} is outside 2..{MAX_BLOCK_SIZE}")


def _check_rows(value: int) -> None:
    if not 1 <= value <= MAX_ROWS_PER_MESSAGE:
        raise ValueError(f"rows per message {value} is outside 1..{MAX_ROWS_PER_MESSAGE}")


def _check_mask_prob(value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"mask probability {value} is outside (0, 1]")


def _check_ratio_range(value: tuple[float, ...]) -> None:
    if len(value) != 2 or not 0.0 <= value[0] <= value[1] <= 1.0:
        raise ValueError(f"ratio range {value} must be LO,HI with 0 <= LO <= HI <= 1")


def _check_mask_fractions(value: tuple[float, ...]) -> None:
    if len(value) != 3 or min(value) < 0.0 or not math.isclose(sum(value), 1.0, abs_tol=1e-6):
        raise ValueError(f"mask fractions {value} must be three non-negative numbers M,R,U that sum to 1")


def _check_val_fraction(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"val fraction {value} is outside [0, 1)")


def _check_seed(value: int) -> None:
    if value < 0:
        raise ValueError(f"seed {value} is negative")


def _check_producer_id(value: str) -> None:
    if not 0 < len(value) <= MAX_PRODUCER_ID_CHARS or not value.isprintable():
        raise ValueError(f"producer id must be 1..{MAX_PRODUCER_ID_CHARS} printable characters")
