"""The chart series of the live page (``GET /history``): bounded, one point per log step and per eval."""

from __future__ import annotations

from collections import deque
from typing import Any

HISTORY_LENGTH = 2000  # points per series kept for the page


class History:
    """Train points (per log step) and eval points (per evaluation), each at most ``length`` long."""

    def __init__(self, length: int = HISTORY_LENGTH) -> None:
        self.train: deque[dict[str, Any]] = deque(maxlen=length)
        self.eval: deque[dict[str, Any]] = deque(maxlen=length)

    def columns(self) -> dict[str, dict[str, list]]:
        """``{"train": {key: [values]}, "eval": {...}}``: one list per key, None where a point lacks it."""
        return {"train": _columns(self.train), "eval": _columns(self.eval)}


def _columns(points: deque[dict[str, Any]]) -> dict[str, list]:
    keys = sorted({key for point in points for key in point})
    return {key: [point.get(key) for point in points] for key in keys}
