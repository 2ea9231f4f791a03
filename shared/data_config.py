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
from shared.corruption import POLICY_TYPES, Corruption, policy_flags
from shared.limits import (
    DEFAULT_MASK_FRACTIONS,
    MAX_BLOCK_SIZE,
    MAX_PRODUCER_ID_CHARS,
    MAX_ROWS_PER_MESSAGE,
    PACKINGS,
    SAMPLINGS,
)
from shared.settings import at_least, floats, in_range, setting, show_floats

DEFAULT_VAL_FRACTION = 0.1  # the val split of a text corpus (prepare's default too): the last tenth of the lines


def _check_mask_fractions(value: tuple[float, ...]) -> None:
    if len(value) != 3 or min(value) < 0.0 or not math.isclose(sum(value), 1.0, abs_tol=1e-6):
        raise ValueError(f"mask fractions {value} must be three non-negative numbers M,R,U that sum to 1")


def check_producer_id(value: str) -> None:
    if not 0 < len(value) <= MAX_PRODUCER_ID_CHARS or not value.isprintable():
        raise ValueError(f"producer id must be 1..{MAX_PRODUCER_ID_CHARS} printable characters")


def _with_policy_flags(cls: type) -> type:
    """Adds every policy's own flags (``shared.corruption.policy_flags``) as fields of ``cls``
    right after ``policy``, before ``dataclass`` reads it: a new policy brings its flags without
    an edit here."""
    annotations = {}
    for name, annotation in cls.__annotations__.items():
        annotations[name] = annotation
        if name == "policy":
            for flag, (flag_annotation, field) in policy_flags().items():
                annotations[flag] = flag_annotation
                setattr(cls, flag, field)
    cls.__annotations__ = annotations
    return cls


@dataclass(frozen=True)
@_with_policy_flags
class DataConfig:
    """What a producer makes. ``producer_id=None`` lets the caller pick (``BatchStream`` uses "0").
    The policies' own settings (``mask_prob``, ``ratio_range``, ``stages``, ...) are fields too,
    declared by their policies in ``shared.corruption``; ``stages=None`` with the stages policy
    means the shipped baseline mix (``shared.corruption.BASELINE_STAGES``)."""

    corpus: tuple[str, ...] = setting((), "a prepared folder (python -m producer prepare), or a .txt file or a folder of .txt "
                                          "(and, with --text-field, .jsonl and .parquet; .gz or .zst of .txt and .jsonl) "
                                          "files tokenized in memory (none: CPython's built-in help text); repeat it for a "
                                          "mixture, each [NAME=]PATH[:WEIGHT] (docs/SPEC.md §2.9)", metavar="[NAME=]PATH[:WEIGHT]",
                                      many=True, separator=None)
    mixture: str | None = setting(None, "a mixture file instead of --corpus: TOML [[source]] tables of name, path, weight, "
                                        "max_epochs (docs/SPEC.md §2.9)", metavar="FILE")
    text_field: str | None = setting(None, "the field of each .jsonl line, or the .parquet column, that holds the text "
                                           "(a text corpus)", metavar="NAME")
    tokenizer: str | None = setting(None, "char, bytes, or a Hugging Face tokenizers JSON file (none: char for text, "
                                          "the prepared folder's own)", metavar="KIND|FILE")
    block_size: int = setting(128, "tokens per row, T", check=in_range(2, MAX_BLOCK_SIZE, name="block size"))
    rows_per_message: int = setting(16, "rows per wire message", check=in_range(1, MAX_ROWS_PER_MESSAGE, name="rows per message"))
    packing: str = setting("lines", "lines: line-aligned rows ending in [SEP]; fixed: the fixed-window baseline",
                           choices=PACKINGS)
    sampling: str = setting("random", "random: uniform row starts; epoch: every line once per epoch, shuffled",
                            choices=SAMPLINGS)
    policy: str = setting("bert", "corruption policy (each takes its own flags below)", choices=tuple(POLICY_TYPES))
    mask_fractions: tuple[float, float, float] = setting(
        DEFAULT_MASK_FRACTIONS, "supervised inputs: [MASK], random, unchanged", metavar="M,R,U",
        parse=floats, show=show_floats, check=_check_mask_fractions)
    supervise_sep: bool = setting(False, "make [SEP] a corruption candidate too")
    val_fraction: float | None = setting(None, "fraction of lines (the last ones) held out for validation (none: "
                                               f"{DEFAULT_VAL_FRACTION} for text, the prepared folder's own)",
                                         check=in_range(0.0, 1.0, name="val fraction", high_open=True))
    seed: int = setting(0, "base seed", check=at_least(0))
    producer_id: str | None = setting(None, "this producer's id; its train stream differs from every other id's",
                                      metavar="ID", check=check_producer_id)

    def __post_init__(self) -> None:
        # One corpus may be given as a string; tuples of floats whatever sequence was passed, so
        # configs compare and hash by value.
        object.__setattr__(self, "corpus", (self.corpus,) if isinstance(self.corpus, str) else tuple(self.corpus or ()))
        for field in settings.settings_fields(type(self)):
            if field.metadata["setting"]["parse"] is floats:
                object.__setattr__(self, field.name, tuple(float(v) for v in getattr(self, field.name)))
        for name, choices in (("packing", PACKINGS), ("sampling", SAMPLINGS), ("policy", tuple(POLICY_TYPES))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(choices)}")
        settings.check_fields(self)
        if self.mixture is not None and self.corpus:
            raise ValueError("give --corpus or --mixture, not both")
        # A flag without a default (a file, say) belongs to its policy alone.
        for policy, cls in POLICY_TYPES.items():
            for name, (_, field) in cls.flags().items():
                if policy != self.policy and field.default is None and getattr(self, name) is not None:
                    raise ValueError(f"--{name.replace('_', '-')} applies only to --policy {policy}")

    def corruption(self) -> Corruption:
        """The corruption these settings describe (a stage file is read here)."""
        return Corruption.from_flags(self)
