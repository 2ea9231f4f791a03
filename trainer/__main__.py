"""``python -m trainer``: bind, wait for producers, self-test the mask, train.

Example (then start producers with ``python -m producer run --connect tcp://127.0.0.1:5555``)::

    python -m trainer --bind tcp://*:5555 --out-dir runs/demo --max-iters 1000

Exit status: 0 when training finished, 2 when it refused to start (the mask self-test
failed, the model does not cover the stream, or ``--resume`` found no usable checkpoint).
There is deliberately no flag to skip the self-test.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from trainer.consumer import DatasetConsumer
from trainer.http import add_http_arguments, serve_diagnostics
from trainer.selftest import MaskSelfTestError
from trainer.train import TrainConfig, Trainer, log, resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n")[0])
    stream = parser.add_argument_group("stream")
    stream.add_argument("--bind", default="tcp://*:5555", help="ZeroMQ endpoint the trainer binds; producers connect")
    stream.add_argument("--record", metavar="FILE", help="record every consumed message to FILE (replayable)")
    stream.add_argument("--wait-timeout", type=float, default=None, help="give up after this many seconds without meta/val set (default: wait forever)")

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    # docker stop / kill send SIGTERM: leave through SystemExit so the consumer closes and the recording is flushed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    config = TrainConfig(
        out_dir=args.out_dir,
        batch_size=args.batch_size,
        max_iters=args.max_iters,
        eval_interval=args.eval_interval,
        eval_batches=args.eval_batches,
        log_interval=args.log_interval,
        device=args.device,
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
    )
    model_args = dict(
        n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
        dropout=args.dropout, positions=args.positions, bias=args.bias,
    )
    with DatasetConsumer(args.bind, config.batch_size, device=resolve_device(args.device), record_path=args.record) as consumer, \
            serve_diagnostics(args, consumer) as diagnostics:
        trainer = Trainer(config, model_args, consumer, [diagnostics])
        try:
            trainer.prepare(wait_timeout=args.wait_timeout)
        except MaskSelfTestError as error:
            log.error("refusing to train: the mask self-test failed: %s", error)
            return 2
        except (ValueError, FileNotFoundError, TimeoutError) as error:
            log.error("refusing to train: %s", error)
            return 2
        trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
