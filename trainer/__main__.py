"""``python -m trainer``: bind, wait for producers, self-test the mask, train.

Example (then start producers with ``python -m producer run --connect tcp://127.0.0.1:5555``)::

    python -m trainer --bind tcp://*:5555 --out-dir runs/demo --max-iters 1000

Data-parallel on N processes (rank r binds port 5555 + its local rank; docs/SCALING.md)::

    python -m torch.distributed.run --nproc-per-node=N -m trainer --bind tcp://*:5555 --out-dir runs/ddp

Every flag is also a ``LINEPACK_*`` environment variable (``--max-iters`` is ``LINEPACK_MAX_ITERS``);
a flag on the command line wins.

Exit status: 0 when training finished, 2 when it refused to start (the mask self-test
failed, the model does not cover the stream, ``--resume`` found no usable checkpoint, or
``--out-dir`` holds an earlier run's checkpoint or metrics and ``--resume`` was not given),
3 when no train batch arrived for ``--data-timeout`` seconds, 130 after SIGINT (Ctrl-C) and 143
after SIGTERM, which stop it before its next step with a checkpoint of the step reached.
There is deliberately no flag to skip the self-test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import signal
import sys

import torch
import zmq

from shared import settings
from shared.curve import CurveKeyError, CurveServer
from shared.recording import RecordingError
from trainer.data.config import DEFAULT_WAIT_TIMEOUT_S, StreamSettings
from trainer.data.consumer import DatasetConsumer
from trainer.data.orders import OrderSettings
from trainer.diagnostics.config import DiagnosticsSettings
from trainer.diagnostics.http import serve_diagnostics
from trainer.loop.checkpoint import CheckpointWriteError
from trainer.loop.config import TrainConfig
from trainer.loop.distributed import DEFAULT_DDP_DATA_TIMEOUT_S, init_distributed, rank_endpoint, rank_path
from trainer.loop.schedule import resolve_device
from trainer.loop.train import Trainer, log
from trainer.model.selftest import MaskSelfTestError
from trainer.model.transformer import ModelConfig
from trainer.runtime import logs
from trainer.runtime.fds import raise_open_file_limit
from trainer.runtime.run_lock import lock_run_folder

SETTINGS = ((StreamSettings, "stream"), (OrderSettings, "schedule"), (TrainConfig, "training loop"), (ModelConfig, "model"),
            (DiagnosticsSettings, "diagnostics"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n")[0])
    for cls, title in SETTINGS:
        settings.add_arguments(parser, cls, title=title, required=("out_dir",))
    return parser


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything ``python -m trainer`` was asked to do, parsed and checked."""

    stream: StreamSettings
    orders: OrderSettings
    train: TrainConfig
    model: ModelConfig
    diagnostics: DiagnosticsSettings
    curve: CurveServer | None


def parse_options(argv: list[str] | None = None) -> Options:
    """The options of ``argv``; a bad value or combination is a usage error (exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        stream = settings.from_namespace(StreamSettings, args)
        orders = settings.from_namespace(OrderSettings, args)
        train = settings.from_namespace(TrainConfig, args)
        model = settings.from_namespace(ModelConfig, args)
        diagnostics = settings.from_namespace(DiagnosticsSettings, args)
        curve = None
        if stream.curve_secret_key is not None:
            curve = CurveServer.from_files(stream.curve_secret_key, stream.curve_authorized_keys)
    except (ValueError, CurveKeyError) as error:
        parser.error(str(error))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    data_timeout = stream.data_timeout
    if data_timeout is None and distributed:
        data_timeout = DEFAULT_DDP_DATA_TIMEOUT_S
    train = dataclasses.replace(train, data_timeout=data_timeout or None)  # 0 = wait forever
    wait_timeout = stream.wait_timeout
    if wait_timeout is None:
        wait_timeout = DEFAULT_DDP_DATA_TIMEOUT_S if distributed else DEFAULT_WAIT_TIMEOUT_S
    stream = dataclasses.replace(stream, wait_timeout=wait_timeout or None)  # 0 = wait forever
    return Options(stream, orders, train, model, diagnostics, curve)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    if options.train.threads:
        torch.set_num_threads(options.train.threads)
    raise_open_file_limit()
    ranks, device = init_distributed(resolve_device(options.train.device), options.train.data_timeout)
    logs.configure(f"rank{ranks.rank} " if ranks.distributed else "")
    # docker stop / kill send SIGTERM: leave through SystemExit so the consumer closes and the recording is flushed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    config = dataclasses.replace(options.train, device=str(device))
    try:
        endpoint = rank_endpoint(options.stream.bind, ranks.local_rank)
    except ValueError as error:
        build_parser().error(str(error))
    if ranks.is_main:  # the main rank writes the run folder
        try:
            lock_run_folder(config.out_dir)
        except OSError as error:  # in use by another trainer, or a folder that cannot be made
            log.error("refusing to train: %s", error)
            return 2
    record = rank_path(options.stream.record, ranks)
    consumer = DatasetConsumer(endpoint, config.batch_size, device=device, record_path=record, curve=options.curve,
                               orders=options.orders, rank=ranks.rank, world=ranks.world_size)
    try:
        consumer.start()
    except (RecordingError, OSError, zmq.ZMQError) as error:  # a recording that is locked or cannot be made, a port in use
        log.error("refusing to train: %s", error)
        return 2
    with consumer, (serve_diagnostics(options.diagnostics, consumer, functools.partial(ranks.stream_stats, consumer))
                    if ranks.is_main else contextlib.nullcontext()) as diagnostics:
        trainer = Trainer(config, options.model, consumer, [diagnostics] if diagnostics else [], ranks=ranks)
        try:
            trainer.prepare(wait_timeout=options.stream.wait_timeout)
        except MaskSelfTestError as error:
            log.error("refusing to train: the mask self-test failed: %s", error)
            return 2
        except (ValueError, OSError, TimeoutError) as error:  # OSError: e.g. a run directory that cannot be made
            log.error("refusing to train: %s", error)
            return 2
        except KeyboardInterrupt:  # Ctrl-C before the first step: nothing trained, nothing to save
            log.info("stopped before training")
            return 130
        try:
            trainer.run()
        except TimeoutError as error:  # under torchrun, this rank's exit stops the other ranks too
            log.error("%s", error)
            return 3
        except CheckpointWriteError as error:
            log.error("stopping: %s", error)
            return 1
        except KeyboardInterrupt:  # Ctrl-C: the loop has written the step's checkpoint and the summary
            return 130
    ranks.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
