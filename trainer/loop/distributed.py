"""Data-parallel training across processes and hosts on PyTorch's own engine (``torchrun`` + DDP).

``torchrun --nproc-per-node=N -m trainer ...`` starts N trainer processes (ranks). Each rank:

- joins the process group from torchrun's environment (``RANK``, ``LOCAL_RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL when it trains on CUDA (device
  ``cuda:LOCAL_RANK``), gloo on CPU;
- binds its own consumer endpoint (:func:`rank_endpoint`: the base port + the local rank, or the
  local rank's entry of a comma-separated list), so producers spread messages over the ranks
  and each orders its own share of the schedule (``trainer.data.orders``: k = rank, rank + W, ...);
- trains a ``DistributedDataParallel`` copy of the model (:meth:`Ranks.wrap`): gradients are
  averaged over the ranks in ``backward``, so the parameters stay identical on every rank.

Only rank 0 evaluates, checkpoints, writes ``metrics.jsonl`` and serves diagnostics. At log steps
every rank sends its consumer's ``stats()`` to rank 0 (:meth:`Ranks.gather_stream_stats`: a
small dict of numbers and strings as JSON bytes, never pickled), and rank 0's ``/diagnostics`` shows
their totals and a per-rank list (:meth:`Ranks.stream_stats`, ``trainer.data.stats.merge_stream_stats``).

A single process (no torchrun) gets ``Ranks()``: rank 0 of 1, where every collective is a no-op.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.data.source import BatchSource
from trainer.data.stats import StreamStats, merge_stream_stats

# Seconds a rank waits for its next train batch under DDP before it gives up (--data-timeout).
# The other ranks are then blocked in a collective; the stopped rank's exit ends the whole run.
DEFAULT_DDP_DATA_TIMEOUT_S = 300.0
# Collectives (gradient all-reduce, stats gather) wait this long for a slow rank: longer than
# an evaluation on rank 0 and than the data timeout, so a rank without data reports itself first.
MIN_COLLECTIVE_TIMEOUT_S = 1800.0
class Ranks:
    """This process's place in the process group, and the few collectives the trainer uses.

    ``Ranks()`` is the single-process case: rank 0 of 1, no process group, every method cheap.
    Rank 0 keeps the last stream stats gathered from every rank for :meth:`stream_stats`.
    """

    def __init__(self, rank: int = 0, local_rank: int = 0, world_size: int = 1, object_group: Any = None) -> None:
        self.rank = rank
        self.local_rank = local_rank
        self.world_size = world_size
        self.object_group = object_group  # gloo group for Python objects (the default group on CPU)
        self._gathered: list[StreamStats] = []  # rank 0: every rank's stats at the last gather
        self._gathered_at = time.monotonic()  # when that was

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in ``DistributedDataParallel`` (which copies rank 0's parameters to every
        rank now and averages gradients in ``backward``); ``model`` itself in one process."""
        if not self.distributed:
            return model
        device = next(model.parameters()).device
        device_ids = [device] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def mean_(self, value: torch.Tensor) -> torch.Tensor:
        """Replaces ``value`` (on the training device) by its mean over the ranks; a collective."""
        if self.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (small, JSON-able) in rank order on rank 0, None elsewhere; a collective.

        The objects travel as JSON bytes in uint8 tensors over the gloo group, not through
        ``gather_object``, which pickles: nothing a peer sends is ever unpickled.
        """
        if not self.distributed:
            return [obj]
        payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(lengths, torch.tensor([payload.numel()], dtype=torch.int64), group=self.object_group)
        longest = int(max(length.item() for length in lengths))
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: payload.numel()] = payload
        buffers = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)] if self.is_main else None
        dist.gather(padded, buffers, dst=0, group=self.object_group)
        if not self.is_main:
            return None
        return [json.loads(bytes(buffer[: int(length.item())].numpy())) for buffer, length in zip(buffers, lengths)]

    def gather_stream_stats(self, source: BatchSource, step: int) -> None:
        """Sends this rank's ``source.stats()`` to rank 0, which keeps them; a collective."""
        if not self.distributed:
            return
        stats = dataclasses.replace(source.stats(), rank=self.rank, endpoint=source.endpoint, as_of_step=step)
        gathered = self.gather(stats.to_dict())
        if gathered is not None:
            self._gathered = [StreamStats.from_dict(entry) for entry in gathered]
            self._gathered_at = time.monotonic()

    def stream_stats(self, source: BatchSource) -> StreamStats:
        """``source.stats()`` in one process. Under DDP on rank 0: the totals over every rank
        (:func:`~trainer.data.stats.merge_stream_stats`) with a ``ranks`` list: rank 0's numbers
        live, the others' as of the last gather (``as_of_step``). Thread-safe: the HTTP threads call it."""
        own = source.stats()
        if not self.distributed:
            return own
        own = dataclasses.replace(own, rank=self.rank, endpoint=source.endpoint, as_of_step=None)
        # Another rank's silence has grown since it was gathered (it may be the rank stalling everyone).
        age = time.monotonic() - self._gathered_at
        others = [
            dataclasses.replace(stats, seconds_since_last_message=None if stats.seconds_since_last_message is None
                                else round(stats.seconds_since_last_message + age, 3))
            for stats in self._gathered if stats.rank != self.rank
        ]
        return merge_stream_stats([own, *others])

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: torch.device, data_timeout_s: float | None) -> tuple[Ranks, torch.device]:
    """Joins the process group torchrun describes in the environment; ``(Ranks(), device)``
    without torchrun (or with one process). On CUDA each rank trains on ``cuda:LOCAL_RANK``
    with NCCL, on CPU with gloo. Python objects always travel over a gloo group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=max(MIN_COLLECTIVE_TIMEOUT_S, 2 * (data_timeout_s or 0.0)))
    dist.init_process_group(backend, timeout=timeout)
    object_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    return Ranks(rank, local_rank, world_size, object_group), device


def rank_endpoint(bind: str, local_rank: int) -> str:
    """The endpoint the rank with ``local_rank`` binds.

    ``bind`` is either one endpoint, whose port is the base (``tcp://*:5555`` -> local rank 1
    binds ``tcp://*:5556``), or a comma-separated list with one endpoint per local rank.
    """
    endpoints = [part.strip() for part in bind.split(",") if part.strip()]
    if len(endpoints) > 1:
        if local_rank >= len(endpoints):
            raise ValueError(f"--bind lists {len(endpoints)} endpoints, local rank {local_rank} has none")
        return endpoints[local_rank]
    if not endpoints:
        raise ValueError("--bind is empty")
    if local_rank == 0:
        return endpoints[0]
    match = re.fullmatch(r"(tcp://.+):(\d+)", endpoints[0])
    if match is None:
        raise ValueError(
            f"--bind {endpoints[0]!r}: local rank {local_rank} adds itself to a tcp://HOST:PORT base port; "
            "otherwise list one endpoint per local rank, comma-separated")
    return f"{match.group(1)}:{int(match.group(2)) + local_rank}"


def rank_path(path: str | None, ranks: Ranks) -> str | None:
    """``run.lpr`` -> ``run.rank1.lpr`` under DDP (each rank records its own messages)."""
    if path is None or not ranks.distributed:
        return path
    original = Path(path)
    return str(original.with_name(f"{original.stem}.rank{ranks.rank}{original.suffix}"))


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer's name and bytes: equal on every rank when DDP
    kept them in sync (bit for bit)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
