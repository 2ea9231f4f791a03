"""Rows of messages into batches of exactly ``batch_size`` rows, and the fixed val set.

:class:`BatchAssembler` packs train rows in arrival order; :class:`ValSet` keeps the first
copy of each val message and reassembles the set in ``val_index`` order
(:func:`val_set_batches`, also used for a recorded val set). Both work on numpy arrays at
the wire's dtypes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]


class BatchAssembler:
    """Packs the rows of train messages, in arrival order, into batches of exactly ``batch_size`` rows.

    A message may be split across batches. Each finished batch comes with the tags of the
    messages whose first row is in it (the consumer's tags are ``(producer id, frames)``,
    the frames only when it records). ``templates`` gives each array's dtype and row shape.
    """

    def __init__(self, batch_size: int, templates: Mapping[str, np.ndarray]) -> None:
        self.batch_size = batch_size
        self._templates = {name: (array.dtype, array.shape[1:]) for name, array in templates.items()}
        self._new_batch()

    def _new_batch(self) -> None:
        self._arrays = {name: np.empty((self.batch_size, *shape), dtype) for name, (dtype, shape) in self._templates.items()}
        self._filled = 0
        self._tags: list[Any] = []

    def add(self, arrays: Mapping[str, np.ndarray], tag: Any) -> list[tuple[Arrays, list[Any]]]:
        """Copies the rows of ``arrays`` in; returns the batches this completed.

        A message of exactly ``batch_size`` rows that starts a batch becomes that batch
        as it is, without a copy (its arrays are read-only views of the received frames).
        """
        rows = len(next(iter(arrays.values())))
        if self._filled == 0 and rows == self.batch_size:
            return [({name: arrays[name] for name in self._arrays}, [tag])]
        self._tags.append(tag)
        finished = []
        start = 0
        while start < rows:
            take = min(rows - start, self.batch_size - self._filled)
            for name, array in self._arrays.items():
                array[self._filled : self._filled + take] = arrays[name][start : start + take]
            self._filled += take
            start += take
            if self._filled == self.batch_size:
                finished.append((self._arrays, self._tags))
                self._new_batch()
        return finished


def val_set_batches(messages: Mapping[int, Mapping[str, np.ndarray]], names: tuple[str, ...], batch_size: int) -> list[Arrays]:
    """The val set's rows in ``val_index`` order, cut into batches of ``batch_size`` rows (the
    last may be smaller): ``messages`` maps each val_index to its arrays."""
    if not messages:
        return []
    rows = {name: np.concatenate([messages[index][name] for index in sorted(messages)]) for name in names}
    total = len(rows[names[0]])
    return [{name: array[start : start + batch_size] for name, array in rows.items()} for start in range(0, total, batch_size)]


class ValSet:
    """The fixed val set as it arrives: the first copy of each ``val_index`` (copied out of its frames)."""

    def __init__(self, expected: int, names: tuple[str, ...]) -> None:
        self.expected = expected
        self.names = names
        self.messages: dict[int, Arrays] = {}

    def add(self, val_index: int, tensors: Mapping[str, np.ndarray]) -> bool:
        """Keeps the message unless its index is already there; True if it was new."""
        if val_index in self.messages:
            return False
        self.messages[val_index] = {name: np.array(tensors[name]) for name in self.names}
        return True

    @property
    def complete(self) -> bool:
        return len(self.messages) >= self.expected

    def batches(self, batch_size: int) -> list[Arrays]:
        return val_set_batches(self.messages, self.names, batch_size)
