"""Declaring and loading a mixture's sources (docs/SPEC.md §2.9).

A mixture is declared by repeating ``--corpus [NAME=]PATH[:WEIGHT]`` or by a TOML file
(``--mixture FILE``)::

    [[source]]
    name = "code"              # optional: the path's file name (lowercased, without suffixes)
    path = "prepared/code"     # relative to the file's folder
    weight = 0.3               # optional: 1
    max_epochs = 2             # optional: 0 = unlimited (needs --sampling epoch)

A ``--corpus`` value is read from both ends: a leading ``NAME=`` (NAME of ``[a-z0-9_-]{1,32}``) is
the name and a trailing ``:WEIGHT`` (a decimal number) the weight, unless the value itself, or
what is left after taking the name, is a path that exists (a path may hold ``=`` and ``:``). One
``--corpus`` is a single corpus, as before mixtures. Every source is a prepared folder
(memory-mapped) or text tokenized in memory; all must share one tokenizer (kind and digest): text
sources take ``--tokenizer``, else a prepared source's tokenizer, else ``char`` over the text of
every text source.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from producer.corpus import read_text, tokenize
from producer.formats import COMPRESSIONS, FORMATS
from producer.lines import CorpusError, TokenCorpus
from producer.prepared import is_prepared, open_prepared
from shared.data_config import DataConfig
from shared.mixture import SOURCE_NAME
from shared.tokenizer import Tokenizer, load_tokenizer
from shared.vocab import VocabularyError

NAME_PREFIX = re.compile(r"([a-z0-9_-]{1,32})=(.+)", re.DOTALL)
WEIGHT_SUFFIX = re.compile(r"(.+):((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)", re.DOTALL)
SOURCE_KEYS = {"name", "path", "weight", "max_epochs"}
TEXT_SUFFIXES = (*FORMATS, *COMPRESSIONS)  # what default_name strips


@dataclass(frozen=True)
class SourceSpec:
    """One declared source: its name, path, weight (> 0) and max_epochs (0 = unlimited)."""

    name: str
    path: str
    weight: float = 1.0
    max_epochs: int = 0


def parse_corpus_value(text: str) -> tuple[str | None, str, float]:
    """``(name or None, path, weight)`` of one ``--corpus [NAME=]PATH[:WEIGHT]`` value."""
    name, path, weight = None, text, 1.0
    named = NAME_PREFIX.fullmatch(path)
    if named and not Path(path).exists():
        name, path = named.groups()
    weighted = WEIGHT_SUFFIX.fullmatch(path)
    if weighted and not Path(path).exists():
        path, weight = weighted.group(1), float(weighted.group(2))
    return name, path, weight


def default_name(path: str) -> str:
    """A source name from its path: the file or folder name, lowercased, without text suffixes,
    other characters than ``[a-z0-9_-]`` as ``-``, at most 32."""
    stem = Path(path.rstrip("/")).name.lower()
    while stem.endswith(TEXT_SUFFIXES):
        stem = stem.rsplit(".", 1)[0]
    return re.sub(r"[^a-z0-9_-]", "-", stem)[:32] or "source"


def declared_sources(config: DataConfig) -> list[SourceSpec]:
    """The sources ``config`` declares (``--mixture`` or ``--corpus``); one or none is a single corpus.
    Raises CorpusError naming the value or the file."""
    if config.mixture is not None:
        specs = read_mixture_file(config.mixture)
    else:
        specs = []
        for value in config.corpus:
            name, path, weight = parse_corpus_value(value)
            specs.append(SourceSpec(name or default_name(path), path, weight))
    names = [spec.name for spec in specs]
    for spec in specs:
        if not SOURCE_NAME.fullmatch(spec.name):
            raise CorpusError(f"source name {spec.name!r} is not 1-32 of a-z, 0-9, _ and -")
        if names.count(spec.name) > 1:
            raise CorpusError(f"two sources are named {spec.name!r}: name them (--corpus NAME=PATH)")
        if not spec.weight > 0 or spec.weight == float("inf"):
            raise CorpusError(f"source {spec.name}: weight {spec.weight} is not a positive number")
        if spec.max_epochs and config.sampling != "epoch":
            raise CorpusError(f"source {spec.name}: max_epochs needs --sampling epoch (random sampling has no epochs)")
    return specs


def read_mixture_file(path: str) -> list[SourceSpec]:
    """The ``[[source]]`` tables of a mixture file (paths relative to its folder). Raises CorpusError."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise CorpusError(f"mixture file {path}: {error}") from None
    tables = document.get("source")
    if set(document) != {"source"} or not isinstance(tables, list) or len(tables) < 2:
        raise CorpusError(f"mixture file {path}: it holds [[source]] tables (at least two) and nothing else")
    specs = []
    for number, table in enumerate(tables, start=1):
        unknown = set(table) - SOURCE_KEYS
        if unknown or not isinstance(table.get("path"), str):
            raise CorpusError(f"mixture file {path}: source {number} needs a path (string) and takes only "
                              f"{sorted(SOURCE_KEYS)}{f', not {sorted(unknown)}' if unknown else ''}")
        weight, max_epochs = table.get("weight", 1.0), table.get("max_epochs", 0)
        if type(weight) not in (int, float) or type(max_epochs) is not int or max_epochs < 0:
            raise CorpusError(f"mixture file {path}: source {number}: weight is a number and max_epochs an integer >= 0")
        source_path = str(Path(path).parent / table["path"])
        specs.append(SourceSpec(table.get("name", default_name(source_path)), source_path, float(weight), max_epochs))
    return specs


def load_sources(specs: list[SourceSpec], config: DataConfig) -> list[TokenCorpus]:
    """Each source's corpus, all with one tokenizer; CorpusError naming two sources whose tokenizers differ."""
    prepared = {spec.name: open_prepared(spec.path, config.tokenizer, config.val_fraction)
                for spec in specs if is_prepared(spec.path)}
    texts = {spec.name: read_text(spec.path, config.text_field) for spec in specs if spec.name not in prepared}
    tokenizer: str | Tokenizer | None = config.tokenizer
    if tokenizer is None:
        tokenizer = next(iter(prepared.values())).tokenizer if prepared else "char"
    if isinstance(tokenizer, str):
        try:
            tokenizer = load_tokenizer(tokenizer, "".join(text.text for text in texts.values()))
        except VocabularyError as error:
            raise CorpusError(f"the mixture's tokenizer: {error}") from None
    corpora = [prepared[spec.name] if spec.name in prepared else tokenize(texts[spec.name], tokenizer, config.val_fraction)
               for spec in specs]
    first = corpora[0]
    for spec, corpus in zip(specs, corpora):
        if (corpus.tokenizer.kind, corpus.tokenizer.digest) != (first.tokenizer.kind, first.tokenizer.digest):
            raise CorpusError(f"the sources of a mixture must share one tokenizer: source {specs[0].name} ({specs[0].path}) "
                              f"has {first.tokenizer.kind} {first.tokenizer.digest[:16]}, source {spec.name} ({spec.path}) "
                              f"has {corpus.tokenizer.kind} {corpus.tokenizer.digest[:16]}")
    return corpora
