"""The trainer's diagnostics settings (``python -m trainer``'s ``diagnostics`` flags), declared once."""

from __future__ import annotations

from dataclasses import dataclass

from shared import settings
from shared.settings import setting
from trainer.diagnostics.alarms import AlarmSettings


def _port(value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"port {value} is outside 0..65535")


def _non_negative(value: int) -> None:
    if value < 0:
        raise ValueError(f"{value} is negative")


@dataclass(frozen=True)
class DiagnosticsSettings:
    http_host: str = setting("127.0.0.1", "diagnostics bind address", metavar="HOST")
    http_port: int = setting(8000, "diagnostics port; 0 disables the server", metavar="PORT", check=_port)
    probe_interval: int | None = setting(None, "steps between attention probes, run at evals (none: every eval; 0 disables)",
                                         metavar="N", check=_non_negative)
    alarm_warmup_steps: int = setting(AlarmSettings.warmup_steps, "steps before context_blind may fire", metavar="N",
                                      check=_non_negative)

    def __post_init__(self) -> None:
        settings.check_fields(self)
