"""Settings declared once: a dataclass field made by :func:`setting` is a CLI flag, a
``LINEPACK_*`` environment variable and a launcher pass-through at the same time.

A settings class is a dataclass whose configurable fields come from :func:`setting` (fields
made otherwise, e.g. ``ModelConfig.vocab_size``, are not settings). From the class:

- :func:`add_arguments` adds one ``--kebab-name`` flag per field to an argparse parser: its
  type from the annotation, its help, choices and default; a value that fails the field's
  ``check`` is a usage error naming the flag;
- the default of each flag is ``LINEPACK_<FIELD_NAME>`` when that variable is set and not
  empty, else the field's default: a container is configured by environment variables alone
  (``LINEPACK_BLOCK_SIZE=256`` is ``--block-size 256``), and a flag on the command line wins;
- :func:`from_namespace` builds the instance from parsed arguments;
- :func:`to_argv` gives the flags that reproduce an instance (what launchers pass on).

Booleans are switches: ``--name`` when the default is False, ``--no-name`` when it is True; in
the environment ``true/1/yes/on`` and ``false/0/no/off``. argparse stays the parser, so usage
errors, ``--help`` and exit status 2 are argparse's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

ENV_PREFIX = "LINEPACK_"
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] | None = None,
    parse: Callable[[str], Any] | None = None,
    show: Callable[[Any], str] | None = None,
    check: Callable[[Any], None] | None = None,
    metavar: str | None = None,
    const: Any = None,
    many: bool = False,
    separator: str | None = ",",
) -> Any:
    """A dataclass field that is also a flag and an environment variable.

    Args:
        default: the value when neither the flag nor the variable is given.
        help: one line for ``--help`` (the default and the variable are appended).
        choices: the allowed values.
        parse: text -> value (default: the annotation's type); ``show`` is its inverse for argv.
        check: raises ValueError for a value the field does not accept.
        metavar: the placeholder in ``--help``.
        const: the value of the bare flag (``--resume`` alone); the flag then takes an optional value.
        many: the value is a tuple: the flag may be repeated and each use may list values separated
            by ``separator`` (None: each use is one value), as may the variable.
    """
    metadata = {"help": help, "choices": choices, "parse": parse, "show": show, "check": check,
                "metavar": metavar, "const": const, "many": many, "separator": separator}
    return dataclasses.field(default=default, metadata={"setting": metadata})


def floats(text: str) -> tuple[float, ...]:
    """``"0.8,0.1,0.1"`` -> ``(0.8, 0.1, 0.1)``."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of numbers") from None


def show_floats(values: tuple[float, ...]) -> str:
    return ",".join(f"{value:g}" for value in values)


def at_least(low: float) -> Callable[[float], None]:
    """A ``check`` for :func:`setting`: ValueError for a value below ``low`` (``at_least(0)``: not negative)."""
    def check(value: float) -> None:
        if value < low:
            raise ValueError(f"{value} is below {low:g}")

    return check


def above(low: float) -> Callable[[float], None]:
    """A ``check`` for :func:`setting`: ValueError unless the value is above ``low`` (``above(0)``: positive)."""
    def check(value: float) -> None:
        if not value > low:
            raise ValueError(f"{value} is not above {low:g}")

    return check


def in_range(low: float, high: float, *, name: str = "", low_open: bool = False,
             high_open: bool = False) -> Callable[[float], None]:
    """A ``check`` for :func:`setting`: ValueError naming ``name`` for a value outside ``[low, high]``
    (an open end excludes its bound: ``in_range(0, 1, high_open=True)`` is [0, 1))."""
    def check(value: float) -> None:
        below = value <= low if low_open else value < low
        over = value >= high if high_open else value > high
        if below or over:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise ValueError(f"{name + ' ' if name else ''}{value} is outside {interval}")

    return check


def settings_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` made by :func:`setting`, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "setting" in f.metadata]


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field: dataclasses.Field, default: Any = dataclasses.MISSING) -> str:
    default = field.default if default is dataclasses.MISSING else default
    name = field.name.replace("_", "-")
    return f"--no-{name}" if _value_type(field) is bool and default is True else f"--{name}"


def check_fields(instance: Any) -> None:
    """Runs every field's ``check`` on its value (call from ``__post_init__``)."""
    for field in settings_fields(type(instance)):
        check = field.metadata["setting"]["check"]
        value = getattr(instance, field.name)
        if check is not None and value is not None:
            check(value)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _value_type(field: dataclasses.Field, hints: dict[str, Any] | None = None) -> Any:
    """The annotation without ``| None``."""
    annotation = field.type if not isinstance(field.type, str) else (hints or {}).get(field.name, field.type)
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "str": str, "bool": bool}.get(annotation.split(" |")[0], str)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = members[0]
    return annotation


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false, 1/0, yes/no, on/off)")


def _converter(field: dataclasses.Field, value_type: Any) -> Callable[[str], Any]:
    meta = field.metadata["setting"]
    if meta["parse"] is not None:
        return meta["parse"]
    if meta["many"] and typing.get_origin(value_type) is tuple:
        value_type = typing.get_args(value_type)[0]
    if value_type is bool:
        return parse_bool
    if value_type in (int, float, str):
        return value_type
    raise TypeError(f"setting {field.name}: no parser for {value_type}; pass parse=")


def _argtype(field: dataclasses.Field, convert: Callable[[str], Any], many: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: convert, then check; a failure is a usage error naming the flag.
    With ``many``, the text is a comma-separated list and each item is converted and checked."""
    check = field.metadata["setting"]["check"]

    def parse(text: str) -> Any:
        try:
            value = tuple(convert(part) for part in _split(text, field)) if many else convert(text)
            if many and not value:
                raise ValueError(f"{text!r} lists no value")
            if check is not None:
                check(value)
        except (ValueError, TypeError) as error:
            raise argparse.ArgumentTypeError(str(error) or f"invalid value {text!r}") from None
        return value

    parse.__name__ = field.name  # argparse names the type in some messages
    return parse


def env_default(cls: type, field: dataclasses.Field, environ: typing.Mapping[str, str] | None = None) -> Any:
    """The field's default, or its ``LINEPACK_*`` variable's value when that is set and not empty.
    Raises ValueError naming the variable when its value does not parse or check."""
    environ = os.environ if environ is None else environ
    text = environ.get(env_name(field.name), "")
    if text == "":
        return field.default
    convert = _converter(field, _value_type(field, _hints(cls)))
    many = field.metadata["setting"]["many"]
    try:
        value = tuple(convert(part) for part in _split(text, field)) if many else convert(text)
        check = field.metadata["setting"]["check"]
        if check is not None:
            check(value)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{env_name(field.name)}={text!r}: {error}") from None
    choices = field.metadata["setting"]["choices"]
    if choices is not None and not many and value not in choices:
        raise ValueError(f"{env_name(field.name)}={text!r} is not one of {', '.join(map(str, choices))}")
    return value


def add_arguments(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    *,
    only: typing.Iterable[str] | None = None,
    skip: typing.Iterable[str] = (),
    title: str | None = None,
    required: typing.Iterable[str] = (),
) -> None:
    """Adds the flags of ``cls``'s settings (``only`` those, or all but ``skip``) to ``parser``
    (in a group named ``title``). Fields in ``required`` must be given (flag or variable).
    Raises SystemExit (usage error, status 2) when a ``LINEPACK_*`` variable is invalid."""
    hints = _hints(cls)
    target = parser.add_argument_group(title) if title else parser
    wanted = None if only is None else set(only)
    for field in settings_fields(cls):
        if (wanted is not None and field.name not in wanted) or field.name in set(skip):
            continue
        meta = field.metadata["setting"]
        value_type = _value_type(field, hints)
        try:
            default = env_default(cls, field)
        except ValueError as error:
            (parser if isinstance(parser, argparse.ArgumentParser) else target).error(str(error))
        is_required = field.name in set(required) and default is None
        help_text = meta["help"] + _default_note(field, default, is_required)
        if value_type is bool:
            target.add_argument(flag_name(field), dest=field.name, default=default,
                                action="store_false" if field.default is True else "store_true", help=help_text)
            continue
        kwargs: dict[str, Any] = dict(dest=field.name, default=default, type=_argtype(field, _converter(field, value_type)),
                                      help=help_text, required=is_required)
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        if meta["metavar"] is not None:
            kwargs["metavar"] = meta["metavar"]
        if meta["const"] is not None:
            kwargs.update(nargs="?", const=meta["const"])
        if meta["many"]:
            kwargs.update(action=_Extend, type=_argtype(field, _converter(field, value_type), many=True))
        target.add_argument(flag_name(field), **kwargs)


def _split(text: str, field: dataclasses.Field) -> list[str]:
    separator = field.metadata["setting"]["separator"]
    if separator is None:
        return [text]
    return [part.strip() for part in text.split(separator) if part.strip()]


class _Extend(argparse.Action):
    """Each use of a ``many`` flag adds its (comma-separated) values; the first use replaces the default."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = f"_{self.dest}_given"
        previous = getattr(namespace, self.dest) if getattr(namespace, seen, False) else ()
        setattr(namespace, seen, True)
        setattr(namespace, self.dest, tuple(previous) + tuple(values))


def _default_note(field: dataclasses.Field, default: Any, required: bool) -> str:
    shown = _show(field, default)
    if required:
        return f" (required; env {env_name(field.name)})"
    if shown == "":
        return f" (env {env_name(field.name)})"
    return f" (default: {shown}; env {env_name(field.name)})"


def _show(field: dataclasses.Field, value: Any) -> str:
    show = field.metadata["setting"]["show"]
    if value is None:
        return ""
    if show is not None:
        return show(value)
    if field.metadata["setting"]["many"]:
        return (field.metadata["setting"]["separator"] or " ").join(str(item) for item in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def from_namespace(cls: type, namespace: argparse.Namespace, **extra: Any) -> Any:
    """An instance of ``cls`` from parsed :func:`add_arguments` flags (fields not parsed keep
    their defaults; ``extra`` sets other fields and wins over the namespace)."""
    values = {f.name: getattr(namespace, f.name) for f in settings_fields(cls) if hasattr(namespace, f.name)}
    return cls(**{**values, **extra})


def to_argv(instance: Any, *, only: typing.Iterable[str] | None = None, skip: typing.Iterable[str] = (),
            changed_only: bool = False) -> list[str]:
    """The flags that give ``instance``'s values (``changed_only``: only those that differ from
    the field defaults), in declaration order."""
    argv: list[str] = []
    wanted = None if only is None else set(only)
    for field in settings_fields(type(instance)):
        if (wanted is not None and field.name not in wanted) or field.name in set(skip):
            continue
        value = getattr(instance, field.name)
        if changed_only and value == field.default:
            continue
        argv += _flag_values(field, value)
    return argv


def _flag_values(field: dataclasses.Field, value: Any) -> list[str]:
    if _value_type(field) is bool or isinstance(value, bool):
        return [flag_name(field)] if value != field.default else []
    if value is None:
        return []
    if field.metadata["setting"]["many"]:
        return [arg for item in value for arg in (flag_name(field), _show(field, (item,)))]
    return [flag_name(field), _show(field, value)]


def iter_settings(*classes: type) -> Iterator[tuple[type, dataclasses.Field]]:
    """``(class, field)`` for every setting of ``classes`` (for the tests and the compose check)."""
    for cls in classes:
        for field in settings_fields(cls):
            yield cls, field
