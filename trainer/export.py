"""``python -m trainer.export``: a run's model as safetensors + config.json + the tokenizer file.

    python -m trainer.export --run DIR --out DIR2

Reads the run's checkpoint (``DIR/ckpt.pt``, or ``--run FILE``) and writes into ``DIR2`` the
folder ``trainer.model.exported`` describes: ``model.safetensors``, ``config.json`` and
``tokenizer.json``, with no pickle anywhere. ``python -m trainer.sample --run DIR2`` samples from
it exactly as from the run (same seed, same text); docs/API.md shows the few lines of plain
PyTorch that load it. Exit status 2, with one line, when the run holds no usable checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from trainer.loop.checkpoint import load_model
from trainer.model.exported import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, write_export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, metavar="DIR", help="a run directory (its ckpt.pt) or a checkpoint file")
    parser.add_argument("--out", required=True, metavar="DIR2", help="the folder to write (created; its three files are replaced)")
    options = parser.parse_args(argv)
    try:
        trained = load_model(options.run)
        write_export(options.out, trained.model, trained.meta, trained.step, trained.sample_length)
    except (ValueError, OSError) as error:
        print(f"export: {error}", file=sys.stderr)
        return 2
    print(f"export: {trained.source} (step {trained.step}) -> {options.out}/{{{WEIGHTS_NAME}, {CONFIG_NAME}, {TOKENIZER_NAME}}}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
