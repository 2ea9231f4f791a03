"""``python -m trainer``: bind, wait for producers, self-test the mask, train.

Example (then start producers with ``python -m producer run --connect tcp://127.0.0.1:5555``)::

    python -m trainer --bind tcp://*:5555 --out-dir runs/demo --max-iters 1000

Data-parallel on N processes (rank r binds port 5555 + its local rank; docs/SCALING.md)::

    python -m torch.distributed.run --nproc-per-node=N -m trainer --bind tcp://*:5555 --out-dir runs/ddp

Exit status: 0 when training finished, 2 when it refused to start (the mask self-test
failed, the model does not cover the stream, or ``--resume`` found no usable checkpoint),
3 when no train batch arrived for ``--data-timeout`` seconds.
There is deliberately no flag to skip the self-test.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys

import torch

from shared.curve import CurveKeyError, CurveServer
from trainer.checkpoint import CheckpointWriteError
from trainer.consumer import DatasetConsumer
from trainer.distributed import DEFAULT_DDP_DATA_TIMEOUT_S, init_distributed, rank_endpoint, rank_path
from trainer.http import add_http_arguments, serve_diagnostics
from trainer.selftest import MaskSelfTestError
from trainer.train import TrainConfig, Trainer, log, resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n")[0])
    stream = parser.add_argument_group("stream")
    stream.add_argument("--bind", default="tcp://*:5555",
                        help="ZeroMQ endpoint the trainer binds; producers connect. Under torchrun each rank binds "
                             "the port + its local rank, or its entry of a comma-separated list")
    stream.add_argument("--record", metavar="FILE", help="record every consumed message to FILE (replayable)")
    stream.add_argument("--wait-timeout", type=float, default=None,
                        help="give up (exit 2) after this many seconds without meta/val set (default: wait forever; "
                             f"{DEFAULT_DDP_DATA_TIMEOUT_S:.0f} s under torchrun, where one rank without data stalls all)")
    stream.add_argument("--data-timeout", type=float, default=None,
                        help="stop (exit 3) after this many seconds without a train batch; 0 = wait forever "
                             f"(default: forever in one process, {DEFAULT_DDP_DATA_TIMEOUT_S:.0f} s under torchrun)")
    stream.add_argument("--curve-secret-key", metavar="FILE", help="CurveZMQ: the trainer's NAME.key_secret file (with --curve-authorized-keys; docs/SECURITY.md)")
    stream.add_argument("--curve-authorized-keys", metavar="PATH", help="CurveZMQ: a producer's public .key file, or a directory of them: only these may connect")

    loop = parser.add_argument_group("training loop")
    loop.add_argument("--out-dir", required=True, help="checkpoint and metrics.jsonl go here")
    loop.add_argument("--batch-size", type=int, default=32)
    loop.add_argument("--max-iters", type=int, default=1000)
    loop.add_argument("--eval-interval", type=int, default=100)
    loop.add_argument("--eval-batches", type=int, default=0, help="first N val batches; 0 = the whole val set")
    loop.add_argument("--log-interval", type=int, default=10)
    loop.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    loop.add_argument("--seed", type=int, default=0)
    loop.add_argument("--lr", type=float, default=1e-3)
    loop.add_argument("--min-lr", type=float, default=1e-4)
    loop.add_argument("--warmup-iters", type=int, default=100)
    loop.add_argument("--lr-decay-iters", type=int, default=0, help="0 = max-iters")
    loop.add_argument("--grad-clip", type=float, default=1.0, help="0 = no clipping")
    loop.add_argument("--weight-decay", type=float, default=0.1)
    loop.add_argument("--loss-weighting", choices=("none", "inverse-t"), default="none")
    loop.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    loop.add_argument("--threads", type=int, default=0, metavar="N",
                      help="torch CPU threads; 0 = torch's default (one per core). Leave cores to producers "
                           "that share the machine: oversubscribed CPU steps slow down many times over")
    loop.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")

    model = parser.add_argument_group("model")
    model.add_argument("--n-layer", type=int, default=4)
    model.add_argument("--n-head", type=int, default=4)
    model.add_argument("--n-embd", type=int, default=128)
    model.add_argument("--dropout", type=float, default=0.0)
    model.add_argument("--positions", choices=("learned", "rotary"), default="learned")
    model.add_argument("--no-bias", dest="bias", action="store_false", help="no biases in Linear and LayerNorm")
    add_http_arguments(parser)
    return parser


def curve_server(parser: argparse.ArgumentParser, args: argparse.Namespace) -> CurveServer | None:
    """The Curve keys named by ``--curve-secret-key`` / ``--curve-authorized-keys``; None when neither is given."""
    if args.curve_secret_key is None and args.curve_authorized_keys is None:
        return None
    if args.curve_secret_key is None or args.curve_authorized_keys is None:
        parser.error("--curve-secret-key and --curve-authorized-keys go together")
    try:
        return CurveServer.from_files(args.curve_secret_key, args.curve_authorized_keys)
    except CurveKeyError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    curve = curve_server(parser, args)
    data_timeout = args.data_timeout or None
    if args.data_timeout is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        data_timeout = DEFAULT_DDP_DATA_TIMEOUT_S
    if args.threads < 0:
        parser.error("--threads must be 0 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    ranks, device = init_distributed(resolve_device(args.device), data_timeout)
    prefix = f"rank{ranks.rank} " if ranks.distributed else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {prefix}%(name)s %(message)s", stream=sys.stdout)
    # docker stop / kill send SIGTERM: leave through SystemExit so the consumer closes and the recording is flushed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    config = TrainConfig(
        out_dir=args.out_dir,
        batch_size=args.batch_size,
        max_iters=args.max_iters,
        eval_interval=args.eval_interval,
        eval_batches=args.eval_batches,
        log_interval=args.log_interval,
        device=str(device),
        seed=args.seed,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_iters=args.warmup_iters,
        lr_decay_iters=args.lr_decay_iters,
        grad_clip=args.grad_clip,
        weight_decay=args.weight_decay,
        loss_weighting=args.loss_weighting,
        compile=args.compile,
        resume=args.resume,
        data_timeout=data_timeout,
    )
    model_args = dict(
        n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
        dropout=args.dropout, positions=args.positions, bias=args.bias,
    )
    try:
        endpoint = rank_endpoint(args.bind, ranks.local_rank)
    except ValueError as error:
        parser.error(str(error))
    with DatasetConsumer(endpoint, config.batch_size, device=device, record_path=rank_path(args.record, ranks), curve=curve) as consumer, \
            (serve_diagnostics(args, consumer, functools.partial(ranks.stream_stats, consumer)) if ranks.is_main
             else contextlib.nullcontext()) as diagnostics:
        trainer = Trainer(config, model_args, consumer, [diagnostics] if diagnostics else [], ranks=ranks)
        try:
            trainer.prepare(wait_timeout=args.wait_timeout if args.wait_timeout is not None or not ranks.distributed
                            else DEFAULT_DDP_DATA_TIMEOUT_S)
        except MaskSelfTestError as error:
            log.error("refusing to train: the mask self-test failed: %s", error)
            return 2
        except (ValueError, OSError, TimeoutError) as error:  # OSError: e.g. a run directory that cannot be made
            log.error("refusing to train: %s", error)
            return 2
        try:
            trainer.run()
        except TimeoutError as error:  # under torchrun, this rank's exit stops the other ranks too
            log.error("%s", error)
            return 3
        except CheckpointWriteError as error:
            log.error("stopping: %s", error)
            return 1
    ranks.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
