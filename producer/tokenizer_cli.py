"""``python -m producer tokenizer train``: a byte-level BPE for a corpus, with Hugging Face ``tokenizers``.

    python -m producer tokenizer train --corpus PATH --vocab-size N --out tokenizer.json
                                       [--text-field NAME] [--decode-errors strict|replace|skip-line]

The corpus is read as ``prepare`` reads it (files, folders, ``.jsonl`` and ``.parquet`` with ``--text-field``,
``.gz``, ``.zst``, ``--decode-errors``, a line longer than prepare's default ``--max-line-bytes`` split),
line by line; the summary line counts what was replaced or skipped. Progress: tokenizers' own
bar on a terminal, else a line every few seconds. The tokenizer has no special tokens of its own
(Linepack appends ``[MASK]``, ``[SEP]``, ``[PAD]`` after its vocabulary), its 256 byte tokens
cover any text, and ``--vocab-size`` is its vocabulary size exactly when the corpus offers that
many merges.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from producer import formats, sources
from producer.lines import CorpusError
from shared import settings
from shared.settings import setting
from shared.tokenizer import HFTokenizer


def _check_vocab_size(value: int) -> None:
    if not 257 <= value <= 1 << 20:
        raise ValueError(f"vocabulary size {value} is outside 257..{1 << 20} (256 byte tokens and at least one merge)")


@dataclass(frozen=True)
class TokenizerTrainSettings:
    corpus: str | None = setting(None, formats.CORPUS_HELP, metavar="PATH")
    vocab_size: int = setting(8192, "tokens in the vocabulary", metavar="N", check=_check_vocab_size)
    text_field: str | None = setting(None, formats.TEXT_FIELD_HELP, metavar="NAME")
    out: str | None = setting(None, "the tokenizers JSON file to write", metavar="FILE")
    decode_errors: str = sources.decode_errors_setting()


def add_command(subparsers: argparse._SubParsersAction) -> None:
    tokenizer = subparsers.add_parser("tokenizer", help="tokenizer tools", description="Tokenizer tools.")
    commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="train a byte-level BPE on a corpus",
                                description="Train a byte-level BPE tokenizer on a corpus (Hugging Face tokenizers).")
    settings.add_arguments(train, TokenizerTrainSettings, required=("corpus", "out"))
    train.set_defaults(handler=run_train, command_parser=train)


@dataclass
class DecodeCounts:
    """What decoding the corpus changed: byte sequences replaced, lines skipped (``--decode-errors``)."""

    replaced: int = 0
    skipped_lines: int = 0


def corpus_lines(options: TokenizerTrainSettings, counts: DecodeCounts) -> Iterator[str]:
    """The corpus's lines, each ending in ``\\n``; adds what decoding changed to ``counts``."""
    files = sources.list_sources(options.corpus, options.text_field)
    # On a terminal, tokenizers shows its own bar; in a log, a line every few seconds.
    progress = sources.progress_bar(sum(source.bytes for source in files), "tokenizer train", terminal_bar=False)
    for chunk in sources.chunks(files, sources.READ_CHUNK_BYTES, sources.DEFAULT_MAX_LINE_BYTES, progress):
        decoded = sources.chunk_text(chunk, options.text_field, options.decode_errors)
        counts.replaced += decoded.replaced
        counts.skipped_lines += decoded.skipped_lines
        yield from (line + "\n" for line in decoded.text.split("\n")[:-1])


def train(options: TokenizerTrainSettings, counts: DecodeCounts | None = None) -> HFTokenizer:
    """Trains the tokenizer and writes it to ``options.out``; returns it as Linepack loads it.
    ``counts`` receives what decoding the corpus replaced or skipped."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=options.vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=sys.stderr.isatty())
    backend.train_from_iterator(corpus_lines(options, DecodeCounts() if counts is None else counts), trainer)
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    backend.save(options.out)
    return HFTokenizer.from_file(options.out)


def run_train(args: argparse.Namespace) -> int:
    try:
        options = settings.from_namespace(TokenizerTrainSettings, args)
        counts = DecodeCounts()
        tokenizer = train(options, counts)
    except (ValueError, CorpusError) as error:
        args.command_parser.error(str(error))
    print(f"wrote {options.out}: {tokenizer.base_size} tokens ({tokenizer.vocab_size} ids with Linepack's specials); "
          f"decode errors ({options.decode_errors}): {counts.replaced} replaced, {counts.skipped_lines} lines skipped",
          file=sys.stderr)
    return 0
