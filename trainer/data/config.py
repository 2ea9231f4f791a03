"""The trainer's stream settings (``python -m trainer``'s ``stream`` flags), declared once."""

from __future__ import annotations

from dataclasses import dataclass

from shared import settings
from shared.endpoints import check_endpoints
from shared.settings import at_least, setting

DEFAULT_WAIT_TIMEOUT_S = 600.0  # a trainer with no producer, or no val set, for this long gives up (exit 2)


@dataclass(frozen=True)
class StreamSettings:
    """Where the trainer listens, what it records, how long it waits, and CurveZMQ.

    ``wait_timeout`` None means :data:`DEFAULT_WAIT_TIMEOUT_S` (``DEFAULT_DDP_DATA_TIMEOUT_S``
    under torchrun), 0 forever; ``data_timeout`` None means forever in one process and
    ``DEFAULT_DDP_DATA_TIMEOUT_S`` under torchrun (one rank without data stalls all).
    """

    bind: str = setting("tcp://*:5555", "ZeroMQ endpoint the trainer binds; producers connect. Under torchrun each rank "
                                        "binds the port + its local rank, or its entry of a comma-separated list",
                        metavar="ADDR", check=check_endpoints)
    record: str | None = setting(None, "record every consumed message to FILE (replayable)", metavar="FILE")
    wait_timeout: float | None = setting(None, "give up (exit 2) after this many seconds without the stream meta or the "
                                               "whole val set; 0 = forever (none: 600 s; 300 s under torchrun)", metavar="S",
                                         check=at_least(0))
    data_timeout: float | None = setting(None, "stop (exit 3) after this many seconds without a train batch; 0 = forever "
                                               "(none: forever; 300 s under torchrun)", metavar="S", check=at_least(0))
    curve_secret_key: str | None = setting(None, "CurveZMQ: the trainer's NAME.key_secret file (with "
                                                 "--curve-authorized-keys; docs/SECURITY.md)", metavar="FILE")
    curve_authorized_keys: str | None = setting(None, "CurveZMQ: a producer's public .key file, or a directory of them: "
                                                      "only these may connect", metavar="PATH")

    def __post_init__(self) -> None:
        settings.check_fields(self)
        if (self.curve_secret_key is None) != (self.curve_authorized_keys is None):
            raise ValueError("--curve-secret-key and --curve-authorized-keys go together")
