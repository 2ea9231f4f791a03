"""``python -m producer COMMAND ...``: every module in :data:`COMMAND_MODULES` adds its own
subcommands with ``add_command(subparsers)``; each sets ``handler`` (a function of the parsed
arguments that returns the exit status). A corpus that becomes unusable while a command runs
(a prepared folder changed under it) ends it with one line and exit status 2."""

from __future__ import annotations

import argparse
import sys

import producer.prepare
import producer.record
import producer.replay
import producer.service
import producer.tokenizer_cli
from producer.lines import CorpusError

COMMAND_MODULES = [producer.prepare, producer.tokenizer_cli, producer.record, producer.service, producer.replay]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m producer", description="Linepack producer commands.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_command(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CorpusError as error:
        print(f"python -m producer {args.command}: stopping: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
