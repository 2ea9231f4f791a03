"""The trainer's diagnostics settings (``python -m trainer``'s ``diagnostics`` flags), declared once."""

from __future__ import annotations

from dataclasses import dataclass

from shared import settings
from shared.settings import at_least, in_range, setting
from trainer.diagnostics.alarms import AlarmSettings


@dataclass(frozen=True)
class DiagnosticsSettings:
    http_host: str = setting("127.0.0.1", "diagnostics bind address", metavar="HOST")
    http_port: int = setting(8000, "diagnostics port; 0 disables the server", metavar="PORT", check=in_range(0, 65535, name="port"))
    probe_interval: int | None = setting(None, "steps between attention probes, run at evals (none: every eval; 0 disables)",
                                         metavar="N", check=at_least(0))
    alarm_warmup_steps: int = setting(AlarmSettings.warmup_steps, "steps before context_blind may fire", metavar="N",
                                      check=at_least(0))

    def __post_init__(self) -> None:
        settings.check_fields(self)
