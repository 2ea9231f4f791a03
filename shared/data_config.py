"""The data settings (docs/SPEC.md §2), declared once: every producer command takes them, and
the launchers (``trainer.stack``, ``trainer.compare``) pass them on to producers.

:class:`DataConfig` is the typed, validated form. Each field is a setting
(:func:`shared.settings.setting`): the flag ``--block-size``, the variable
``LINEPACK_BLOCK_SIZE`` and what launchers pass on all come from the field. Values are
checked by the field's ``check`` both when parsed (a usage error naming the flag) and in
``__post_init__`` (so a config built in code is just as safe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared import settings
from shared.limits import (
    DEFAULT_MASK_FRACTIONS,
    MAX_BLOCK_SIZE,
    MAX_PRODUCER_ID_CHARS,
    MAX_ROWS_PER_MESSAGE,
    PACKINGS,
    POLICIES,
    SAMPLINGS,
)
from shared.settings import setting


def floats(text: str) -> tuple[float, ...]:
    """``"0.8,0.1,0.1"`` -> ``(0.8, 0.1, 0.1)``."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of numbers") from None


def show_floats(values: tuple[float, ...]) -> str:
    return ",".join(f"{value:g}" for value in values)


def _in_range(name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    def check(value: float) -> None:
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above:
            raise ValueError(f"{name} {value} is outside {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")

    return check


def _check_ratio_range(value: tuple[float, ...]) -> None:
    if len(value) != 2 or not 0.0 <= value[0] <= value[1] <= 1.0:
        raise ValueError(f"ratio range {value} must be LO,HI with 0 <= LO <= HI <= 1")


def _check_mask_fractions(value: tuple[float, ...]) -> None:
    if len(value) != 3 or min(value) < 0.0 or not math.isclose(sum(value), 1.0, abs_tol=1e-6):
        raise ValueError(f"mask fractions {value} must be three non-negative numbers M,R,U that sum to 1")


def check_producer_id(value: str) -> None:
    if not 0 < len(value) <= MAX_PRODUCER_ID_CHARS or not value.isprintable():
        raise ValueError(f"producer id must be 1..{MAX_PRODUCER_ID_CHARS} printable characters")


def _check_seed(value: int) -> None:
    if value < 0:
        raise ValueError(f"seed {value} is negative")


@dataclass(frozen=True)
class DataConfig:
    """What a producer makes. ``producer_id=None`` lets the caller pick (``BatchStream`` uses "0");
    ``stages=None`` with the stages policy means the shipped baseline mix
    (``producer.stages.EXAMPLE_STAGES``)."""

    corpus: tuple[str, ...] = setting((), "a prepared folder (python -m producer prepare), or a UTF-8 text file or folder "
                                          "of .txt (and, with --text-field, .jsonl; .gz of either) files tokenized in "
                                          "memory (none: CPython's built-in help text); repeat it for a mixture, each "
                                          "[NAME=]PATH[:WEIGHT] (docs/SPEC.md §2.9)", metavar="[NAME=]PATH[:WEIGHT]",
                                      many=True, separator=None)
    mixture: str | None = setting(None, "a mixture file instead of --corpus: TOML [[source]] tables of name, path, weight, "
                                        "max_epochs (docs/SPEC.md §2.9)", metavar="FILE")
    text_field: str | None = setting(None, "the field of each .jsonl line that holds its text (a text corpus)",
                                     metavar="NAME")
    tokenizer: str | None = setting(None, "char, bytes, or a Hugging Face tokenizers JSON file (none: char for text, "
                                          "the prepared folder's own)", metavar="KIND|FILE")
    block_size: int = setting(128, "tokens per row, T", check=_in_range("block size", 2, MAX_BLOCK_SIZE))
    rows_per_message: int = setting(16, "rows per wire message", check=_in_range("rows per message", 1, MAX_ROWS_PER_MESSAGE))
    packing: str = setting("lines", "lines: line-aligned rows ending in [SEP]; fixed: the fixed-window baseline",
                           choices=PACKINGS)
    sampling: str = setting("random", "random: uniform row starts; epoch: every line once per epoch, shuffled",
                            choices=SAMPLINGS)
    policy: str = setting("bert", "corruption policy", choices=POLICIES)
    mask_prob: float = setting(0.15, "bert: probability that a candidate is supervised",
                               check=_in_range("mask probability", 0.0, 1.0, low_open=True))
    ratio_range: tuple[float, float] = setting((0.0, 1.0), "uniform: per-row ratio r ~ U(LO, HI)", metavar="LO,HI",
                                               parse=floats, show=show_floats, check=_check_ratio_range)
    stages: str | None = setting(None, "stages: TOML stage file (none: the shipped baseline mix)", metavar="FILE")
    mask_fractions: tuple[float, float, float] = setting(
        DEFAULT_MASK_FRACTIONS, "supervised inputs: [MASK], random, unchanged", metavar="M,R,U",
        parse=floats, show=show_floats, check=_check_mask_fractions)
    supervise_sep: bool = setting(False, "make [SEP] a corruption candidate too")
    val_fraction: float | None = setting(None, "fraction of lines (the last ones) held out for validation (none: 0.1 "
                                               "for text, the prepared folder's own)",
                                         check=_in_range("val fraction", 0.0, 1.0, high_open=True))
    seed: int = setting(0, "base seed", check=_check_seed)
    producer_id: str | None = setting(None, "this producer's id; its train stream differs from every other id's",
                                      metavar="ID", check=check_producer_id)

    def __post_init__(self) -> None:
        # One corpus may be given as a string; tuples of floats whatever sequence was passed, so
        # configs compare and hash by value.
        object.__setattr__(self, "corpus", (self.corpus,) if isinstance(self.corpus, str) else tuple(self.corpus or ()))
        object.__setattr__(self, "ratio_range", tuple(float(v) for v in self.ratio_range))
        object.__setattr__(self, "mask_fractions", tuple(float(v) for v in self.mask_fractions))
        for name, choices in (("packing", PACKINGS), ("sampling", SAMPLINGS), ("policy", POLICIES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(choices)}")
        settings.check_fields(self)
        if self.mixture is not None and self.corpus:
            raise ValueError("give --corpus or --mixture, not both")
        if self.stages is not None and self.policy != "stages":
            raise ValueError("--stages applies only to --policy stages")
