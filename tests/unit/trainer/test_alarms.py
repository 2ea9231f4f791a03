"""Alarms over fake numbers: when each one fires, clears, and remembers when it was raised."""

from __future__ import annotations

import dataclasses

from trainer.diagnostics.alarms import CONTEXT_BLIND_ADVICE, AlarmInputs, AlarmSettings, WaitWindow, evaluate_alarms

SETTINGS = AlarmSettings(warmup_steps=100, floor_margin=0.1, no_context_margin=0.02, starved_seconds=30, reject_rate=0.05)


def states(inputs: AlarmInputs, previous=None, now: float = 1000.0):
    return evaluate_alarms(inputs, SETTINGS, previous or {}, now)


def test_healthy_run_raises_nothing_and_every_alarm_is_explained():
    alarms = states(AlarmInputs(step=500, val_loss=2.3, val_step=500, floor=3.07, no_context_gap=0.8, probe_step=500,
                                seconds_without_data=0.1, window_accepted=50, data_wait=0.01, data_wait_seconds=60))
    assert sorted(alarms) == ["context_blind", "data_bound", "head_of_line", "meta_mismatch", "rejecting",
                             "source_exhausted", "starved"]
    assert not any(alarm.active for alarm in alarms.values())
    for alarm in alarms.values():
        assert alarm.explanation and alarm.check and alarm.since_step is None and alarm.since_time is None
        assert set(dataclasses.asdict(alarm)) == {"name", "active", "since_step", "since_time", "explanation", "check"}


def test_context_blind_waits_for_warm_up_then_fires_near_the_floor():
    near_floor = dict(val_loss=3.05, floor=3.07)
    assert not states(AlarmInputs(step=99, val_step=99, **near_floor))["context_blind"].active
    alarm = states(AlarmInputs(step=100, val_step=100, **near_floor))["context_blind"]
    assert alarm.active and "3.050" in alarm.explanation and "floor 3.070" in alarm.explanation
    assert alarm.explanation.endswith(CONTEXT_BLIND_ADVICE), "it says what to do"
    assert not states(AlarmInputs(step=100, val_step=100, val_loss=3.2, floor=3.07))["context_blind"].active  # 0.13 above
    assert not states(AlarmInputs(step=100, val_step=100, val_loss=2.4, floor=3.07))["context_blind"].active


def test_context_blind_never_judges_a_measurement_from_before_the_warm_up():
    """At step 100 the last val loss may still be the untrained model's (step 0): near the floor, but stale."""
    stale = states(AlarmInputs(step=150, val_loss=3.05, val_step=0, floor=3.07, no_context_gap=0.0, probe_step=50))
    assert not stale["context_blind"].active and "waiting for a val loss measured at step 100" in stale["context_blind"].explanation
    fresh = states(AlarmInputs(step=150, val_loss=3.05, val_step=0, floor=3.07, no_context_gap=0.0, probe_step=150))
    assert fresh["context_blind"].active and "hiding all context" in fresh["context_blind"].explanation


def test_context_blind_fires_when_hiding_context_costs_nothing():
    alarm = states(AlarmInputs(step=200, val_loss=2.4, val_step=200, floor=3.07, no_context_gap=0.01, probe_step=200))
    assert alarm["context_blind"].active and "+0.010" in alarm["context_blind"].explanation
    healthy = AlarmInputs(step=200, val_loss=2.4, val_step=200, floor=3.07, no_context_gap=0.5, probe_step=200)
    assert not states(healthy)["context_blind"].active


def test_data_bound_fires_when_the_loop_mostly_waits_for_data():
    assert not states(AlarmInputs(data_wait=0.9, data_wait_seconds=10))["data_bound"].active, "too little of a window yet"
    assert not states(AlarmInputs(data_wait=0.2, data_wait_seconds=60))["data_bound"].active
    alarm = states(AlarmInputs(data_wait=0.8, data_wait_seconds=60))["data_bound"]
    assert alarm.active and "80%" in alarm.explanation and "add producers" in alarm.explanation


def test_the_wait_window_keeps_only_its_last_seconds():
    window = WaitWindow(window_seconds=10)
    assert window.fraction(0.0) == (None, 0.0)
    for t in range(20):
        window.add(float(t), step_s=1.0, wait_s=0.9 if t < 10 else 0.1)
    fraction, seconds = window.fraction(19.5)
    assert seconds == 10.0 and abs(fraction - 0.1) < 1e-9, "the slow first ten seconds are forgotten"


def test_starved_after_the_configured_silence():
    assert not states(AlarmInputs(seconds_without_data=29.0))["starved"].active
    alarm = states(AlarmInputs(seconds_without_data=31.0))["starved"]
    assert alarm.active and "31 s" in alarm.explanation
    assert not states(AlarmInputs())["starved"].active  # nothing known yet


def test_rejecting_compares_the_window_rate_with_the_threshold():
    low = AlarmInputs(window_accepted=96, window_rejected=4, window_rejected_by_reason={"dtype": 4})
    assert not states(low)["rejecting"].active
    high = AlarmInputs(window_accepted=90, window_rejected=10, window_rejected_by_reason={"dtype": 6, "shape": 4})
    alarm = states(high)["rejecting"]
    assert alarm.active and "10 of 100" in alarm.explanation and "dtype: 6" in alarm.explanation
    assert not states(AlarmInputs())["rejecting"].active


def test_meta_mismatch_fires_on_that_reason_only():
    assert not states(AlarmInputs(window_rejected=3, window_rejected_by_reason={"shape": 3}))["meta_mismatch"].active
    alarm = states(AlarmInputs(window_rejected=2, window_rejected_by_reason={"meta_mismatch": 2}))["meta_mismatch"]
    assert alarm.active and "2 messages" in alarm.explanation


def test_since_is_kept_while_active_and_cleared_when_it_stops():
    starving = AlarmInputs(step=10, seconds_without_data=40)
    first = states(starving, now=100.0)
    later = states(AlarmInputs(step=20, seconds_without_data=50), previous=first, now=110.0)
    assert (later["starved"].since_step, later["starved"].since_time) == (10, 100.0)
    cleared = states(AlarmInputs(step=30, seconds_without_data=1), previous=later, now=120.0)
    assert not cleared["starved"].active and cleared["starved"].since_step is None
    again = states(AlarmInputs(step=40, seconds_without_data=45), previous=cleared, now=130.0)
    assert (again["starved"].since_step, again["starved"].since_time) == (40, 130.0)


def test_head_of_line_fires_when_one_producer_holds_the_next_message():
    assert not states(AlarmInputs(head_wait=5.0, head_holder=None))["head_of_line"].active
    assert not states(AlarmInputs(head_wait=1.0, head_holder="p1"))["head_of_line"].active
    alarm = states(AlarmInputs(head_wait=3.5, head_holder="p1"))["head_of_line"]
    assert alarm.active and "'p1'" in alarm.explanation and "3.5 s" in alarm.explanation
