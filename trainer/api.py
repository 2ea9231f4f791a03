"""The public API for your own model and loop (docs/API.md): ``from trainer.api import Stream``.

A facade over the library (it imports ``trainer.data`` and ``trainer.diagnostics``, nothing
imports it): :class:`Stream`, its :class:`StreamInfo` and :class:`StreamDataset`, the
:class:`~trainer.diagnostics.reporter.Reporter` for diagnostics, and :func:`load_model` (a
trained Linepack model from a run or an export).

:class:`Stream` wraps :class:`~trainer.data.consumer.DatasetConsumer`: iterate it for dict
batches on a device; ``hf_names=True`` gives Hugging Face's names (``input_ids``, ``labels`` with
-100 where not supervised, ``attention_mask``); :meth:`Stream.val_batches` is the fixed val set;
:meth:`Stream.state_dict` / :meth:`Stream.load_state_dict` are the stream position (the
:class:`~trainer.data.orders.Cursor`), so a checkpoint that holds it resumes the data exactly;
:attr:`Stream.info` is what the stream knows (:class:`StreamInfo`). :meth:`Stream.dataset` is a
``torch.utils.data.IterableDataset`` for ``DataLoader(dataset, batch_size=None)`` and Hugging
Face's ``Trainer``; :meth:`Stream.serve_diagnostics` serves the trainer's ``/diagnostics``,
``/metrics`` and page for a loop that is not Linepack's (``trainer.diagnostics.reporter``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset

from shared.curve import CurveServer
from shared.meta import StreamMeta
from shared.tokenizer import Tokenizer
from trainer.data.consumer import DatasetConsumer
from trainer.data.orders import Cursor
from trainer.data.source import Batch
from trainer.data.stats import StreamStats
from trainer.diagnostics.floor import context_free_floor
from trainer.diagnostics.reporter import Reporter
from trainer.loop.checkpoint import load_model
from trainer.model.exported import TrainedModel

__all__ = ["Stream", "StreamInfo", "StreamDataset", "Reporter", "load_model", "TrainedModel", "hf_batch", "HF_IGNORE_INDEX"]

HF_IGNORE_INDEX = -100  # what Hugging Face's losses skip


@dataclass(frozen=True)
class StreamInfo:
    """What a stream knows, pinned by its first producer.

    ``vocab_size`` counts every id (the tokenizer's, then ``[MASK]``, ``[SEP]``, ``[PAD]``);
    ``block_size`` is T, the tokens per row; ``tokenizer`` decodes ids (``tokenizer.decode(ids)``);
    ``context_free_floor`` is the lowest val loss (nats per supervised token) of a model that
    sees only each position's own input token (``trainer.diagnostics.floor``): a model that uses
    its context ends under it. ``meta`` is the whole :class:`~shared.meta.StreamMeta`.
    """

    meta: StreamMeta
    vocab_size: int
    block_size: int
    mask_id: int
    sep_id: int
    pad_id: int
    ignore_index: int
    tokenizer: Tokenizer
    context_free_floor: float

    @classmethod
    def of(cls, meta: StreamMeta) -> StreamInfo:
        return cls(meta, meta.vocab_size, meta.block_size, meta.mask_id, meta.sep_id, meta.pad_id, meta.ignore_index,
                   meta.tokens, context_free_floor(meta, "val"))


def hf_batch(batch: Batch, ignore_index: int) -> Batch:
    """``batch`` under Hugging Face's names: ``input_ids`` (x), ``labels`` (y with -100 where not
    supervised), ``attention_mask``; every other tensor (``mask_ratio``, ``stage``, ``source``) keeps its name."""
    renamed = {"input_ids": batch["x"], "labels": batch["y"].masked_fill(batch["y"] == ignore_index, HF_IGNORE_INDEX),
               "attention_mask": batch["attention_mask"]}
    return {**renamed, **{name: tensor for name, tensor in batch.items() if name not in ("x", "y", "attention_mask")}}


class Stream:
    """A Linepack stream for your own model and loop.

    Args:
        endpoint: the ZeroMQ address; bound (producers ``--connect`` to it) unless ``bind=False``
            (then producers ``--bind`` and this connects).
        batch_size: rows per batch (B).
        device: where batches go (``cpu``, ``cuda``...).
        hf_names: batches under Hugging Face's names (:func:`hf_batch`).
        curve_secret_key, curve_authorized_keys: CurveZMQ key files (``python -m shared.curve
            keygen``): then only the producers listed are accepted, encrypted.
        wait_timeout: seconds to wait for the stream meta and the val set (None: forever).
        record_path: record every message handed out (``producer replay`` plays it back).

    Batches: ``x``, ``y``, ``attention_mask`` int64 (B, T), ``mask_ratio`` float32 (B,), ``stage``
    int64 (B,) for stage streams. ``y`` is the original token where supervised, else
    ``info.ignore_index``; ``attention_mask`` is 1 for real tokens, 0 for padding.
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", batch_size: int = 32, *, device: str | torch.device = "cpu",
                 bind: bool = True, hf_names: bool = False, curve_secret_key: str | None = None,
                 curve_authorized_keys: str | None = None, wait_timeout: float | None = 600.0,
                 record_path: str | None = None) -> None:
        curve = None
        if (curve_secret_key is None) != (curve_authorized_keys is None):
            raise ValueError("CurveZMQ needs both curve_secret_key and curve_authorized_keys")
        if curve_secret_key is not None:
            curve = CurveServer.from_files(curve_secret_key, curve_authorized_keys)
        self.consumer = DatasetConsumer(endpoint, batch_size, device=device, bind=bind, curve=curve, record_path=record_path)
        self.hf_names = hf_names
        self.wait_timeout = wait_timeout
        self.batches = 0  # handed out by next()
        self.tokens = 0  # B * T of those batches
        self.wait_seconds = 0.0  # spent blocked in next() for them
        self._info: StreamInfo | None = None
        self._started = False

    # ---- lifecycle --------------------------------------------------------------------

    def start(self) -> Stream:
        """Binds (or connects) and starts receiving; iterating or :attr:`info` starts it too."""
        if not self._started:
            self.consumer.start()
            self._started = True
        return self

    def close(self) -> None:
        """Stops receiving and closes the socket (and the recording). Idempotent."""
        self.consumer.close()

    def __enter__(self) -> Stream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        """The real address (after :meth:`start`; a ``:*`` port is resolved)."""
        return self.consumer.endpoint

    # ---- what the stream knows ----------------------------------------------------------

    @property
    def info(self) -> StreamInfo:
        """The stream's :class:`StreamInfo`; waits for the first producer (TimeoutError after ``wait_timeout``)."""
        if self._info is None:
            self.start()
            self._info = StreamInfo.of(self.consumer.wait_for_meta(self.wait_timeout))
        return self._info

    def stats(self) -> StreamStats:
        """The stream's accounting (messages, producers, schedule), as ``/diagnostics`` shows it."""
        return self.consumer.stats()

    # ---- batches ----------------------------------------------------------------------

    def _named(self, batch: Batch) -> Batch:
        return hf_batch(batch, self.info.ignore_index) if self.hf_names else batch

    def next(self, timeout: float | None = None) -> Batch:
        """The next train batch (blocks; TimeoutError after ``timeout`` seconds when given)."""
        self.info  # noqa: B018 - the meta first: a batch is only named with it
        started = time.perf_counter()
        batch = self.consumer.next_batch("train", timeout=timeout)
        self.wait_seconds += time.perf_counter() - started
        self.batches += 1
        self.tokens += batch["x"].numel()
        return self._named(batch)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next()

    def val_batches(self) -> list[Batch]:
        """The fixed val set (the same rows for every run of this stream), in batches of
        ``batch_size`` rows (the last may be smaller); waits for it up to ``wait_timeout``."""
        self.info  # noqa: B018
        if not self.consumer.wait_for_val_set(self.wait_timeout):
            stats = self.stats()
            raise TimeoutError(f"the val set is incomplete after {self.wait_timeout} s "
                               f"({stats.val_messages_seen} of {stats.val_messages_total} messages)")
        return [self._named(batch) for batch in self.consumer.val_batches()]

    # ---- the position -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The stream position after the last batch handed out: save it with your checkpoint."""
        return {"cursor": self.consumer.cursor.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at a saved position (before the first batch): the next batch is the one that
        followed it in the run that saved it."""
        self.consumer.seek(Cursor.from_dict(state["cursor"]))

    # ---- wrappers ----------------------------------------------------------------------

    def dataset(self, rows: bool = False) -> StreamDataset:
        """An ``IterableDataset`` of this stream's batches (``DataLoader(..., batch_size=None)``),
        or with ``rows`` of its rows one by one (for a loader that batches, like HF ``Trainer``)."""
        return StreamDataset(self, rows)

    def serve_diagnostics(self, port: int = 8000, host: str = "127.0.0.1", warmup_steps: int = 500) -> Reporter:
        """Serve ``/diagnostics``, ``/metrics`` and the page for this stream (``port`` 0: any free
        port, :attr:`Reporter.port`); returns the :class:`Reporter` your loop reports its losses to."""
        return Reporter(self.consumer, self.meter, self.info.meta, port=port, host=host, warmup_steps=warmup_steps)

    def meter(self) -> tuple[int, float]:
        """Tokens handed out (B * T per batch) and seconds spent blocked in :meth:`next`, so far."""
        return self.tokens, self.wait_seconds


class StreamDataset(IterableDataset):
    """The stream's train batches as an ``IterableDataset``: each item is a whole batch, so give
    ``DataLoader`` ``batch_size=None`` (and ``num_workers=0``: the stream is one socket); with
    ``rows``, each item is one row (the batch's tensors at one index), in the stream's order."""

    def __init__(self, stream: Stream, rows: bool = False) -> None:
        self.stream = stream
        self.rows = rows

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.stream:
            if not self.rows:
                yield batch
                continue
            for index in range(len(batch["attention_mask"])):
                yield {name: tensor[index] for name, tensor in batch.items()}
