"""The trainer side of the stream (SPEC §4): receive, validate, account, assemble batches.

``DatasetConsumer`` owns a ZeroMQ PULL socket (bound by default; producers connect) and a
receive thread. The thread decodes every message with ``shared.wire.decode``, pins the
stream meta on the first accepted message, keeps per-producer sequence accounting, stores
the fixed val set, packs train rows into batches of exactly ``batch_size`` rows, computes
their statistics (``trainer.batch_stats``: every batch's rows go into the cumulative
mask-ratio histogram; the full per-batch statistics at most every ``STATS_EVERY_S``) and puts
them on a bounded queue, still at the wire's dtypes; :meth:`DatasetConsumer.next_batch`
widens them in the caller's thread (on CUDA after the copy to the device). When the queue
is full the thread stops reading, the socket's small high-water mark fills and producers
block: memory stays bounded. The training thread calls :meth:`DatasetConsumer.next_batch`.

Example::

    with DatasetConsumer("tcp://*:5555", batch_size=32) as consumer:
        meta = consumer.wait_for_meta(timeout=60)
        consumer.wait_for_val_set(timeout=60)
        val = consumer.val_batches()
        batch = consumer.next_batch()   # {"x": (B, T) int64, "y": ..., "attention_mask": ..., "mask_ratio": (B,) float32}
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zmq

from shared.curve import CurveGuard, CurveServer, configure_server
from shared.meta import StreamMeta
from shared.recording import RecordingWriter
from shared.wire import WireError, WireMessage, decode
from trainer.batch_stats import MaskRatioHistogram, batch_statistics, mask_ratio_counts

log = logging.getLogger(__name__)

RECEIVE_HWM = 4  # messages buffered per connected producer before it blocks
# ZeroMQ drops the connection of a peer that sends a bigger frame, before buffering it. The
# largest tensor frame of a real stream is rows_per_message x block_size x 2 bytes (2 MiB at
# 1024 x 1024); 64 MiB leaves room for any sensible configuration.
MAX_FRAME_BYTES = 64 << 20
POLL_SECONDS = 0.1  # the receive thread wakes this often to notice close() and starvation
# Batch statistics are for people and dashboards: computed for every batch while batches come
# slower than this, else for the first batch after each such interval (bounded cost at any rate).
STATS_EVERY_S = 0.05
# Rejection reasons of the consumer itself, next to shared.wire.REASONS.
META_MISMATCH = "meta_mismatch"
TENSOR_SET = "tensor_set"
# The trainer's dtypes; on CUDA applied after the host-to-device copy.
WIDE_DTYPES = {"x": torch.int64, "y": torch.int64, "attention_mask": torch.int64, "mask_ratio": torch.float32, "stage": torch.int64}
WIDE_NUMPY = {"x": np.int64, "y": np.int64, "attention_mask": np.int64, "mask_ratio": np.float32, "stage": np.int64}
# Pinned host buffers at the wire width (uint16 ids travel as int16 bits, see _host_tensor).
TORCH_OF_NUMPY = {np.dtype(np.int16): torch.int16, np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32}


@dataclass
class _ProducerState:
    first_seq: int
    last_seq: int
    last_seen: float
    messages: int = 0
    train: int = 0
    val: int = 0
    gaps: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    consumed: int = 0  # train messages whose first row went into a handed-out batch
    dropped: int = 0  # train messages read past while waiting for the val set (see wait_for_val_set)
    missing: set[int] = field(default_factory=set)


class ProducerTable:
    """Sequence accounting per producer id.

    ``gaps`` counts sequence numbers between a producer's first and last seen message
    that never arrived; a late arrival fills its gap again and counts as ``out_of_order``;
    a number seen twice counts as a ``duplicate``. The first message seen from a producer
    starts its count (a trainer that joins late has not lost the earlier messages).
    Only the newest :attr:`WINDOW` numbers are remembered as fillable.
    """

    WINDOW = 1 << 16

    def __init__(self) -> None:
        self._states: dict[str, _ProducerState] = {}

    def record(self, producer_id: str, seq: int, split: str, now: float) -> None:
        state = self._states.get(producer_id)
        if state is None:
            state = self._states[producer_id] = _ProducerState(first_seq=seq, last_seq=seq, last_seen=now)
        elif seq > state.last_seq:
            state.gaps += seq - state.last_seq - 1
            state.missing.update(range(max(state.last_seq + 1, seq - self.WINDOW), seq))
            state.last_seq = seq
        elif seq < state.first_seq:
            state.gaps += state.first_seq - seq - 1
            state.missing.update(range(max(seq + 1, state.first_seq - self.WINDOW), state.first_seq))
            state.first_seq = seq
            state.out_of_order += 1
        elif seq in state.missing:
            state.missing.discard(seq)
            state.gaps -= 1
            state.out_of_order += 1
        else:
            state.duplicates += 1
        if len(state.missing) > self.WINDOW:
            state.missing = {s for s in state.missing if s > state.last_seq - self.WINDOW}
        state.messages += 1
        state.last_seen = now
        if split == "val":
            state.val += 1
        else:
            state.train += 1

    def add(self, producer_id: str, name: str) -> None:
        """Counts one more ``consumed`` or ``dropped`` message of a producer already recorded."""
        state = self._states[producer_id]
        setattr(state, name, getattr(state, name) + 1)

    def total(self, name: str) -> int:
        return sum(getattr(state, name) for state in self._states.values())

    def to_dict(self, now: float) -> dict[str, dict[str, Any]]:
        return {
            producer_id: {
                "messages": s.messages,
                "train": s.train,
                "val": s.val,
                "first_seq": s.first_seq,
                "last_seq": s.last_seq,
                "gaps": s.gaps,
                "duplicates": s.duplicates,
                "out_of_order": s.out_of_order,
                "consumed": s.consumed,
                "dropped": s.dropped,
                "seconds_since_last": round(now - s.last_seen, 3),
            }
            for producer_id, s in self._states.items()
        }


class BatchAssembler:
    """Packs the rows of train messages, in arrival order, into batches of exactly ``batch_size`` rows.

    A message may be split across batches. Each finished batch comes with the tags of the
    messages whose first row is in it (the consumer's tags are ``(producer id, frames)``,
    the frames only when it records).
    """

    def __init__(self, batch_size: int, templates: dict[str, np.ndarray]) -> None:
        self.batch_size = batch_size
        self._templates = {name: (array.dtype, array.shape[1:]) for name, array in templates.items()}
        self._new_batch()

    def _new_batch(self) -> None:
        self._arrays = {name: np.empty((self.batch_size, *shape), dtype) for name, (dtype, shape) in self._templates.items()}
        self._filled = 0
        self._tags: list[Any] = []

    def add(self, tensors: dict[str, np.ndarray], tag: Any) -> list[tuple[dict[str, np.ndarray], list[Any]]]:
        """Copies the rows of ``tensors`` in; returns the batches this completed.

        A message of exactly ``batch_size`` rows that starts a batch becomes that batch
        as it is, without a copy (its arrays are read-only views of the received frames).
        """
        rows = tensors["x"].shape[0]
        if self._filled == 0 and rows == self.batch_size:
            return [({name: tensors[name] for name in self._arrays}, [tag])]
        self._tags.append(tag)
        finished = []
        start = 0
        while start < rows:
            take = min(rows - start, self.batch_size - self._filled)
            for name, array in self._arrays.items():
                array[self._filled : self._filled + take] = tensors[name][start : start + take]
            self._filled += take
            start += take
            if self._filled == self.batch_size:
                finished.append((self._arrays, self._tags))
                self._new_batch()
        return finished


@dataclass
class _ReadyBatch:
    host: dict[str, np.ndarray | torch.Tensor]  # see DatasetConsumer._host_tensor
    stats: dict[str, Any] | None  # None when skipped (see STATS_EVERY_S)
    ratio_counts: np.ndarray
    new_messages: list[tuple[str, Any]]  # per message starting in this batch: (producer id, its frames when recording, else None)


class DatasetConsumer:
    """Receives a Linepack stream and hands out training batches; see the module docstring.

    Args:
        endpoint: ZeroMQ endpoint, e.g. ``tcp://*:5555`` (``tcp://127.0.0.1:*`` picks a free
            port; :attr:`endpoint` then holds the real one after :meth:`start`).
        batch_size: rows per training batch (independent of the producers' rows per message).
        device: where :meth:`next_batch` puts tensors (``cpu``, ``cuda``, ``cuda:1``...).
        bind: bind (default; producers connect) or connect (producers bind).
        queue_batches: assembled batches kept ready; the back-pressure bound.
        record_path: when set, every message handed out is written there (SPEC §5): a train
            message when its first row goes into a handed-out batch, each val message once,
            in the order the val indices are first accepted. Replaying the file into a fresh
            consumer with the same ``batch_size`` gives the same batches in the same order.
        starved_after_s: seconds without any message before the consumer says it is waiting.
        max_frame_bytes: a peer that sends a larger frame is disconnected by ZeroMQ unread
            (that frame is never buffered; ZeroMQ does not limit the number of frames of one
            message, so this bounds single frames, not a hostile peer, see docs/SECURITY.md).
        curve: when set, the socket is a CurveZMQ server that accepts only the producers whose
            public keys it lists (``shared.curve``); others never get a message through.
    """

    def __init__(
        self,
        endpoint: str,
        batch_size: int,
        *,
        device: str | torch.device = "cpu",
        bind: bool = True,
        queue_batches: int = 8,
        record_path: str | None = None,
        starved_after_s: float = 5.0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        curve: CurveServer | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.endpoint = endpoint
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.bind = bind
        self.record_path = record_path
        self.starved_after_s = starved_after_s
        self.max_frame_bytes = max_frame_bytes
        self.meta: StreamMeta | None = None
        self.last_batch_stats: dict[str, Any] | None = None  # of the latest handed-out batch that has them (STATS_EVERY_S)
        self.cumulative_mask_ratio = MaskRatioHistogram()

        self._queue: queue.Queue[_ReadyBatch] = queue.Queue(maxsize=queue_batches)
        self._ready: collections.deque[_ReadyBatch] = collections.deque()  # assembled, waiting for queue space
        self._lock = threading.Lock()  # guards the counters and the table, read by stats()
        self._record_lock = threading.Lock()
        self._stopping = threading.Event()
        self._meta_pinned = threading.Event()
        self._val_complete = threading.Event()
        self._val_waiters = 0
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._context: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._recorder: RecordingWriter | None = None
        self.curve = curve
        self.curve_guard: CurveGuard | None = None  # counts accepted / refused Curve clients
        self._assembler: BatchAssembler | None = None
        self._tensor_names: tuple[str, ...] = ()
        self._val: dict[int, dict[str, np.ndarray]] = {}
        self._val_batches: list[dict[str, torch.Tensor]] | None = None
        self._table = ProducerTable()
        self._rejected: collections.Counter[str] = collections.Counter()
        self._rejected_by_producer: dict[str, collections.Counter[str]] = {}
        self._received = 0
        self._accepted = 0
        self._consumed_messages = 0
        self._consumed_batches = 0
        self._dropped_train = 0
        self._started_at = time.monotonic()
        self._last_message_at: float | None = None
        self._stats_at = float("-inf")  # when batch statistics were last computed
        self._starved = False

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> "DatasetConsumer":
        """Binds (or connects) the socket and starts the receive thread; returns self."""
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self._socket.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            if self.curve is not None:
                self.curve_guard = configure_server(self._socket, self.curve)
            if self.bind:
                self._socket.bind(self.endpoint)
                self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self._socket.connect(self.endpoint)
        except zmq.ZMQError:
            self.close()
            raise
        if self.record_path is not None:
            self._recorder = RecordingWriter(self.record_path, {"recorded_by": "trainer.consumer", "batch_size": self.batch_size})
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._receive_loop, name="linepack-consumer", daemon=True)
        self._thread.start()
        log.info("consumer %s %s, batch_size %d", "bound to" if self.bind else "connected to", self.endpoint, self.batch_size)
        return self

    def close(self) -> None:
        """Stops the receive thread, closes the socket and flushes the recording. Idempotent."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self.curve_guard is not None:
            self.curve_guard.stop()
        if self._context is not None:
            self._context.term()
            self._context = None
        with self._record_lock:
            if self._recorder is not None:
                self._recorder.close()

    def __enter__(self) -> "DatasetConsumer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the training thread's side --------------------------------------------------

    def wait_for_meta(self, timeout: float | None = None) -> StreamMeta:
        """The pinned stream meta, once the first message is accepted; raises TimeoutError."""
        if not self._meta_pinned.wait(timeout):
            raise TimeoutError(f"no valid message arrived on {self.endpoint} within {timeout} s")
        return self.meta

    def wait_for_val_set(self, timeout: float | None = None) -> bool:
        """Waits until every val message has arrived; True if it has.

        While someone waits here and the batch queue is full, the receive thread keeps
        reading and drops train messages (counted as ``dropped_train``) so that the val
        messages behind them can arrive: the trainer is not consuming train batches then.
        """
        with self._lock:
            self._val_waiters += 1
        try:
            return self._val_complete.wait(timeout)
        finally:
            with self._lock:
                self._val_waiters -= 1

    def next_batch(self, split: str = "train", timeout: float | None = None) -> dict[str, torch.Tensor]:
        """The next train batch: ``x``, ``y``, ``attention_mask`` int64 (B, T), ``mask_ratio``
        float32 (B,), ``stage`` int64 (B,) when the stream has stages, on :attr:`device`.

        Blocks until a batch is ready: forever when ``timeout`` is None (the consumer logs
        that it waits for producers), else raises TimeoutError after ``timeout`` seconds.
        Val batches come from :meth:`val_batches`.
        """
        if split != "train":
            raise ValueError(f"next_batch serves the train split; the fixed val set comes from val_batches(), not {split!r}")
        if self._stopping.is_set():
            raise RuntimeError("the consumer is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = POLL_SECONDS * 5 if deadline is None else max(0.0, min(deadline - time.monotonic(), POLL_SECONDS * 5))
            try:
                ready = self._queue.get(timeout=wait)
                break
            except queue.Empty:
                if self._thread_error is not None:
                    raise RuntimeError("the consumer's receive thread failed") from self._thread_error
                if self._stopping.is_set():
                    raise RuntimeError("the consumer is closed")
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"no train batch within {timeout} s on {self.endpoint} "
                        f"(received {self._received} messages, starved={self._starved})"
                    )
        if self._recorder is not None:
            with self._record_lock:
                for _, frames in ready.new_messages:
                    self._recorder.write(frames)
        with self._lock:
            self._consumed_messages += len(ready.new_messages)
            for producer_id, _ in ready.new_messages:
                self._table.add(producer_id, "consumed")
            self._consumed_batches += 1
        if ready.stats is not None:
            self.last_batch_stats = ready.stats
        self.cumulative_mask_ratio.add_counts(ready.ratio_counts)
        return self._to_device(ready.host)

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        """The fixed val set in val_index order, in batches of ``batch_size`` rows (the last may
        be smaller), as :meth:`next_batch` dicts. Raises RuntimeError before the set is complete."""
        if not self._val_complete.is_set():
            raise RuntimeError(f"the val set is incomplete ({len(self._val)} of {self.meta.val_messages if self.meta else '?'} messages)")
        if self._val_batches is None and not self._val:
            self._val_batches = []
        if self._val_batches is None:
            rows = {name: np.concatenate([self._val[i][name] for i in sorted(self._val)]) for name in self._tensor_names}
            total = len(rows["x"])
            self._val_batches = [
                self._to_device({name: self._host_tensor(name, array[start : start + self.batch_size]) for name, array in rows.items()})
                for start in range(0, total, self.batch_size)
            ]
        return self._val_batches

    def stats(self) -> dict[str, Any]:
        """Stream accounting as a JSON-able dict (SPEC §6 ``stream``); safe from any thread."""
        now = time.monotonic()
        with self._lock:
            return {
                "received": self._received,
                "accepted": self._accepted,
                "rejected": dict(self._rejected),
                "rejected_by_producer": {producer: dict(reasons) for producer, reasons in self._rejected_by_producer.items()},
                "rejected_total": sum(self._rejected.values()),
                "consumed_messages": self._consumed_messages,
                "consumed_batches": self._consumed_batches,
                "dropped_train": self._dropped_train,
                "gaps": self._table.total("gaps"),
                "duplicates": self._table.total("duplicates"),
                "out_of_order": self._table.total("out_of_order"),
                "producers": self._table.to_dict(now),
                "starved": self._starved,
                "seconds_since_last_message": None if self._last_message_at is None else round(now - self._last_message_at, 3),
                "queue_depth": self._queue.qsize(),
                "val_messages_seen": len(self._val),
                "val_messages_total": None if self.meta is None else self.meta.val_messages,
                "meta_digest": None if self.meta is None else self.meta.digest,
            }

    # ---- host/device conversion ------------------------------------------------------

    def _host_tensor(self, name: str, array: np.ndarray) -> np.ndarray | torch.Tensor:
        """The host side of a tensor, made in the receive thread, still at the wire width.

        CPU device: the numpy array itself (possibly a read-only view of the received frame).
        CUDA device: a copy in pinned memory; uint16 ids go as int16 bits, which read as the
        same values because every id is below vocab_size <= 32767 (shared.vocab.MAX_VOCAB_SIZE,
        checked by decode).
        """
        if self.device.type != "cuda":
            return array
        if array.dtype == np.uint16:
            array = array.view(np.int16)
        pinned = torch.empty(array.shape, dtype=TORCH_OF_NUMPY[array.dtype], pin_memory=True)
        pinned.numpy()[...] = array
        return pinned

    def _to_device(self, host: dict[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
        """Moves the host tensors to the device, then widens them to :data:`WIDE_DTYPES`.

        Runs in the caller's thread. On CPU the widening is numpy's ``astype`` (a copy, so the
        result never aliases a received frame; torch's own CPU conversion spawns intra-op
        threads, which a busy host makes slow); on CUDA it happens on the device after a
        ``non_blocking`` copy from pinned memory.
        """
        if self.device.type != "cuda":
            return {name: torch.from_numpy(array.astype(WIDE_NUMPY[name])) for name, array in host.items()}
        return {name: tensor.to(self.device, non_blocking=True).to(WIDE_DTYPES[name]) for name, tensor in host.items()}

    # ---- the receive thread ----------------------------------------------------------

    def _receive_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                if not self._move_ready_to_queue():
                    continue
                if not poller.poll(POLL_SECONDS * 1000):
                    self._check_starved()
                    continue
                self._handle(self._socket.recv_multipart(copy=False))
        except BaseException as error:  # reported to the training thread by next_batch
            self._thread_error = error
            log.exception("the consumer's receive thread failed")

    def _val_wanted(self) -> bool:
        return self._val_waiters > 0 and not self._val_complete.is_set()

    def _move_ready_to_queue(self) -> bool:
        """Queues assembled batches; False while the queue is full and reading must pause."""
        while self._ready:
            keep_reading = self._val_wanted()
            try:
                self._queue.put(self._ready[0], block=not keep_reading, timeout=POLL_SECONDS)
            except queue.Full:
                return keep_reading
            self._ready.popleft()
        return True

    def _check_starved(self) -> None:
        now = time.monotonic()
        silent = now - (self._last_message_at or self._started_at)
        if not self._starved and silent > self.starved_after_s:
            with self._lock:
                self._starved = True
            log.warning("waiting for producers: nothing received on %s for %.1f s", self.endpoint, silent)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        now = time.monotonic()
        with self._lock:
            self._received += 1
            if self._starved:
                self._starved = False
                log.warning("producers are back: a message arrived after %.1f s", now - (self._last_message_at or self._started_at))
            self._last_message_at = now
        try:
            message = decode(frames)
        except WireError as error:
            self._reject(error.reason, error.detail, error.producer_id)
            return
        if self.meta is None:
            self._pin(message)
        elif message.meta is not self.meta and message.meta.digest != self.meta.digest:
            differences = self.meta.differences(message.meta)
            field_name, mine, theirs = differences[0]
            also = f" (also differs: {', '.join(name for name, _, _ in differences[1:])})" if len(differences) > 1 else ""
            self._reject(
                META_MISMATCH,
                f"producer {message.producer_id!r}: field {field_name} is {theirs!r:.200}, the pinned stream has {mine!r:.200}{also}",
                message.producer_id,
            )
            return
        if tuple(sorted(message.tensors)) != self._tensor_names:
            self._reject(
                TENSOR_SET,
                f"producer {message.producer_id!r} sent tensors {sorted(message.tensors)}, the stream has {list(self._tensor_names)}",
                message.producer_id,
            )
            return
        with self._lock:
            self._accepted += 1
            self._table.record(message.producer_id, message.seq, message.split, now)
        if message.split == "val":
            self._accept_val(message)
        else:
            self._accept_train(message)

    def _reject(self, reason: str, detail: str, producer_id: str | None = None) -> None:
        """Counts a rejected message by reason, and by producer when its header was readable."""
        with self._lock:
            self._rejected[reason] += 1
            count = self._rejected[reason]
            if producer_id is not None:
                self._rejected_by_producer.setdefault(producer_id, collections.Counter())[reason] += 1
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th... of each reason
            log.warning("rejected message (%s, #%d): %s", reason, count, detail)

    def _pin(self, message: WireMessage) -> None:
        self.meta = message.meta
        self._tensor_names = tuple(sorted(message.tensors))
        self._assembler = BatchAssembler(self.batch_size, {name: message.tensors[name] for name in self._tensor_names})
        log.info(
            "pinned stream %s: block_size %d, vocab_size %d, packing %s, %d val messages",
            self.meta.digest, self.meta.block_size, self.meta.vocab_size, self.meta.packing, self.meta.val_messages,
        )
        self._meta_pinned.set()
        if self.meta.val_messages == 0:
            self._val_complete.set()

    def _accept_val(self, message: WireMessage) -> None:
        if message.val_index in self._val:
            return
        if self._recorder is not None:
            with self._record_lock:
                self._recorder.write(message.frames)
        self._val[message.val_index] = {name: np.array(message.tensors[name]) for name in self._tensor_names}
        if len(self._val) == self.meta.val_messages:
            log.info("val set complete: %d messages", len(self._val))
            self._val_complete.set()

    def _accept_train(self, message: WireMessage) -> None:
        if self._ready:  # the queue is full and a val waiter needs us to read on (see wait_for_val_set)
            with self._lock:
                self._dropped_train += 1
                self._table.add(message.producer_id, "dropped")
            return
        tag = (message.producer_id, message.frames if self._recorder is not None else None)
        for arrays, tags in self._assembler.add(message.tensors, tag):
            now = time.monotonic()
            stats = None
            if now - self._stats_at >= STATS_EVERY_S:
                self._stats_at = now
                stats = batch_statistics(arrays["x"], arrays["y"], arrays["attention_mask"], arrays["mask_ratio"], self.meta.mask_id, self.meta.ignore_index)
            self._ready.append(
                _ReadyBatch(
                    host={name: self._host_tensor(name, array) for name, array in arrays.items()},
                    stats=stats,
                    ratio_counts=mask_ratio_counts(arrays["mask_ratio"]),
                    new_messages=tags,
                )
            )
