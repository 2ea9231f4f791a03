"""Alarms: pure functions that say, in one line, when training or its data stream is unhealthy.

Each check takes :class:`AlarmInputs` (numbers the diagnostics already hold) and
:class:`AlarmSettings` and returns ``(active, explanation)``. :func:`evaluate_alarms` runs all
of them and keeps the step and time each active alarm was first raised.

- ``context_blind``: after warm-up, the val loss is within ``floor_margin`` nats of the
  context-free floor, or the attention probe's no-context loss is within
  ``no_context_margin`` nats of its real-mask loss: the model is not using other positions.
  Only measurements taken after the warm-up count (not the untrained model's).
- ``starved``: no message received for ``starved_seconds``.
- ``data_bound``: the training loop spent at least ``data_wait_fraction`` of the recent window's
  step time waiting for data (data trickles in, but too slowly).
- ``rejecting``: more than ``reject_rate`` of the messages of the recent window were rejected.
- ``meta_mismatch``: messages of the recent window were rejected because their stream meta
  differs from the pinned one (another corpus, vocabulary, block size...).
- ``head_of_line``: the next train message the training loop needs has been ordered from one
  producer and not delivered for ``head_of_line_seconds``: that producer holds up the run (it
  is slow or stuck; its order goes to another producer after ``--reassign-s``).
- ``source_exhausted``: a source of a mixture that has ``max_epochs`` has given them all: the
  rows it would have had go to the other sources, so the achieved shares leave the weights.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from trainer.data.stats import StreamStats

# What a user should do when context_blind fires after a passed mask self-test (the mask is right,
# so the model has not learned to use its context yet). docs/PLATEAU.md measured what matters: the
# position embedding (rotary left the plateau within 150 steps at every block size; learned absolute
# positions stayed on it for 600 steps at block 256 and 512), then the number of steps; the peak lr,
# the warm-up, the init scale, QK-norm and the mask-ratio range did not move it.
CONTEXT_BLIND_ADVICE = ("the model is not using context: the mask self-test passed, so it has not learned to yet; "
                        "use --positions rotary (the default; learned positions can stay on this plateau for 600+ steps, "
                        "longer at a larger --block-size), then train longer; --lr, --warmup-iters, --init-std, --qk-norm "
                        "and --ratio-range did not shorten it (docs/PLATEAU.md)")


@dataclass(frozen=True)
class AlarmSettings:
    warmup_steps: int = 500
    floor_margin: float = 0.1  # nats
    no_context_margin: float = 0.02  # nats
    starved_seconds: float = 30.0
    reject_rate: float = 0.05  # fraction of the messages in the window
    window_seconds: float = 60.0
    data_wait_fraction: float = 0.5  # data_bound: of the step time in the window...
    data_wait_min_seconds: float = 30.0  # ...once the window holds at least this much step time
    head_of_line_seconds: float = 2.0


@dataclass(frozen=True)
class AlarmInputs:
    """What the checks look at; ``None`` = not known yet.

    Attributes:
        step: the training step.
        val_loss: the latest val loss (nats), measured at ``val_step``; floor: the context-free
            floor of the val split.
        no_context_gap: attention probe ``loss_no_context - loss_attn`` on the same positions,
            measured at ``probe_step``.
        data_wait: share of the step time of the recent window spent waiting for data, over
            ``data_wait_seconds`` seconds of steps.
        seconds_without_data: since the last message was received (or since start).
        window_accepted / window_rejected: messages accepted / rejected in the recent window.
        window_rejected_by_reason: reason -> rejected count in the recent window.
        head_wait, head_holder: how long the next train message needed has been late, and from whom.
        exhausted_sources: ``(name, max_epochs)`` of each mixture source that has given its ``max_epochs``.
    """

    step: int = 0
    val_loss: float | None = None
    val_step: int | None = None
    floor: float | None = None
    no_context_gap: float | None = None
    probe_step: int | None = None
    seconds_without_data: float | None = None
    data_wait: float | None = None
    data_wait_seconds: float = 0.0
    window_accepted: int = 0
    window_rejected: int = 0
    window_rejected_by_reason: dict[str, int] | None = None
    head_wait: float = 0.0  # seconds the next train message needed has been ordered and not delivered
    head_holder: str | None = None  # the producer it is ordered from
    exhausted_sources: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Alarm:
    name: str
    active: bool
    since_step: int | None
    since_time: float | None  # Unix seconds
    explanation: str
    check: str  # what to look at when it is active


def _fresh(measured_at: int | None, settings: AlarmSettings) -> bool:
    """A measurement an alarm may judge: taken after the warm-up (never one of the untrained model)."""
    return measured_at is not None and measured_at >= settings.warmup_steps


def context_blind(inputs: AlarmInputs, settings: AlarmSettings) -> tuple[bool, str]:
    if inputs.step < settings.warmup_steps:
        return False, f"warming up: checked from step {settings.warmup_steps} on"
    val_fresh = _fresh(inputs.val_step, settings) and inputs.val_loss is not None and inputs.floor is not None
    probe_fresh = _fresh(inputs.probe_step, settings) and inputs.no_context_gap is not None
    reasons = []
    if val_fresh and abs(inputs.val_loss - inputs.floor) <= settings.floor_margin:
        reasons.append(f"val loss {inputs.val_loss:.3f} is within {settings.floor_margin} nats of the floor {inputs.floor:.3f}")
    if probe_fresh and inputs.no_context_gap <= settings.no_context_margin:
        reasons.append(f"hiding all context costs only {inputs.no_context_gap:+.3f} nats")
    if reasons:
        return True, "; ".join(reasons) + ": " + CONTEXT_BLIND_ADVICE
    if not val_fresh:
        return False, f"waiting for a val loss measured at step {settings.warmup_steps} or later"
    return False, f"val loss {inputs.val_loss:.3f} vs floor {inputs.floor:.3f}"


def starved(inputs: AlarmInputs, settings: AlarmSettings) -> tuple[bool, str]:
    waited = inputs.seconds_without_data
    if waited is None:
        return False, "no stream statistics"
    if waited >= settings.starved_seconds:
        return True, f"no message received for {waited:.0f} s: the trainer is waiting for data"
    return False, f"last message {waited:.1f} s ago"


def rejecting(inputs: AlarmInputs, settings: AlarmSettings) -> tuple[bool, str]:
    total = inputs.window_accepted + inputs.window_rejected
    if total == 0:
        return False, "no messages in the window"
    rate = inputs.window_rejected / total
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted((inputs.window_rejected_by_reason or {}).items()) if count)
    text = f"{inputs.window_rejected} of {total} messages rejected ({rate:.1%}) in the last {settings.window_seconds:.0f} s"
    return rate > settings.reject_rate, text + (f" ({reasons})" if reasons else "")


def data_bound(inputs: AlarmInputs, settings: AlarmSettings) -> tuple[bool, str]:
    if inputs.data_wait is None or inputs.data_wait_seconds < settings.data_wait_min_seconds:
        return False, "not enough steps in the window yet"
    text = (f"the training loop waited for data {inputs.data_wait:.0%} of its last {inputs.data_wait_seconds:.0f} s "
            "of steps")
    if inputs.data_wait >= settings.data_wait_fraction:
        return True, text + ": the producers are too slow for it (add producers, or check their rate and the network)"
    return False, text


def meta_mismatch(inputs: AlarmInputs, settings: AlarmSettings) -> tuple[bool, str]:
    count = (inputs.window_rejected_by_reason or {}).get("meta_mismatch", 0)
    if count:
        return True, f"{count} messages rejected in the last {settings.window_seconds:.0f} s: their stream meta differs from the pinned one"
    return False, "every producer agrees with the pinned meta"


def head_of_line(inputs: AlarmInputs, settings: AlarmSettings) -> tuple[bool, str]:
    if inputs.head_holder is None or inputs.head_wait < settings.head_of_line_seconds:
        return False, "the next train message needed is not late"
    return True, (f"producer {inputs.head_holder!r} has held the next train message for {inputs.head_wait:.1f} s: "
                  "the trainer waits for it (it is slow or stuck; the order goes to another producer after --reassign-s)")


def source_exhausted(inputs: AlarmInputs, settings: AlarmSettings) -> tuple[bool, str]:
    if not inputs.exhausted_sources:
        return False, "no source of a mixture has given its max_epochs"
    names = ", ".join(f"{name!r} ({epochs} epochs)" for name, epochs in inputs.exhausted_sources)
    return True, (f"exhausted: {names}: the training loop has taken every epoch these sources may give, "
                  "so the other sources' shares grow past their weights")


CHECKS: tuple[tuple[str, Callable[[AlarmInputs, AlarmSettings], tuple[bool, str]], str], ...] = (
    ("context_blind", context_blind,
     "the trainer log's mask self-test line, the attention probe's no-context loss, then --positions (rotary) and the "
     "steps trained so far"),
    ("starved", starved, "that producers are running and connect to the trainer's endpoint (stream.producers)"),
    ("data_bound", data_bound, "throughput.data_wait_fraction, and each producer's rate (its status line, stream.producers)"),
    ("rejecting", rejecting, "the trainer log for rejection details and stream.rejected_by_reason"),
    ("meta_mismatch", meta_mismatch,
     "the trainer log line naming the differing field; every producer must use the same corpus and data flags"),
    ("head_of_line", head_of_line, "stream.head_holder's status line and load; stream.producers[...].orders_reassigned"),
    ("source_exhausted", source_exhausted,
     "sources[...].epochs_completed against max_epochs: raise max_epochs in the mixture, or add data to that source"),
)


def evaluate_alarms(inputs: AlarmInputs, settings: AlarmSettings, previous: dict[str, Alarm], now: float) -> dict[str, Alarm]:
    """Every alarm's state; an alarm that stays active keeps the step and time it was raised."""
    alarms = {}
    for name, check, what_to_check in CHECKS:
        active, explanation = check(inputs, settings)
        before = previous.get(name)
        if active and before is not None and before.active:
            since_step, since_time = before.since_step, before.since_time
        elif active:
            since_step, since_time = inputs.step, now
        else:
            since_step, since_time = None, None
        alarms[name] = Alarm(name, active, since_step, since_time, explanation, what_to_check)
    return alarms


class WaitWindow:
    """The steps of the last ``window_seconds``: their step time and their time waiting for data."""

    def __init__(self, window_seconds: float, max_steps: int = 1 << 16) -> None:
        self.window_seconds = window_seconds
        self._steps: deque[tuple[float, float, float]] = deque(maxlen=max_steps)  # (time, step s, wait s)

    def add(self, now: float, step_s: float, wait_s: float) -> None:
        self._steps.append((now, step_s, wait_s))

    def fraction(self, now: float) -> tuple[float | None, float]:
        """``(waited / step time, step time)`` over the window; None before any step."""
        while self._steps and self._steps[0][0] < now - self.window_seconds:
            self._steps.popleft()
        step_time = sum(step for _, step, _ in self._steps)
        if step_time <= 0:
            return None, 0.0
        return sum(wait for _, _, wait in self._steps) / step_time, step_time


class StreamWindow:
    """Messages accepted and rejected (by reason) over the last ``window_seconds``, from
    successive :class:`StreamStats` readings (cumulative counts); bounded memory."""

    def __init__(self, window_seconds: float, max_samples: int = 4096) -> None:
        self.window_seconds = window_seconds
        self._samples: deque[tuple[float, int, int, dict[str, int]]] = deque(maxlen=max_samples)

    def update(self, stream: StreamStats | None, now: float) -> tuple[int, int, dict[str, int]]:
        """``(accepted, rejected, rejected by reason)`` within the window ending ``now``."""
        if stream is None:
            return 0, 0, {}
        sample = (now, stream.accepted, stream.rejected_total, dict(stream.rejected))
        self._samples.append(sample)
        while len(self._samples) > 1 and self._samples[0][0] < now - self.window_seconds:
            self._samples.popleft()
        if len(self._samples) == 1:  # first look: everything so far counts
            return sample[1], sample[2], sample[3]
        _, accepted_then, rejected_then, reasons_then = self._samples[0]
        reasons = {reason: count - reasons_then.get(reason, 0) for reason, count in sample[3].items()}
        return sample[1] - accepted_then, sample[2] - rejected_then, reasons
