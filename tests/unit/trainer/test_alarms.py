"""Alarms over fake numbers: when each one fires, clears, and remembers when it was raised."""

from __future__ import annotations

import dataclasses

from trainer.diagnostics.alarms import AlarmInputs, AlarmSettings, evaluate_alarms

SETTINGS = AlarmSettings(warmup_steps=100, floor_margin=0.1, no_context_margin=0.02, starved_seconds=30, reject_rate=0.05)


def states(inputs: AlarmInputs, previous=None, now: float = 1000.0):
    return evaluate_alarms(inputs, SETTINGS, previous or {}, now)


def test_healthy_run_raises_nothing_and_every_alarm_is_explained():
    alarms = states(AlarmInputs(step=500, val_loss=2.3, floor=3.07, no_context_gap=0.8, seconds_without_data=0.1, window_accepted=50))
    assert sorted(alarms) == ["context_blind", "meta_mismatch", "rejecting", "starved"]
    assert not any(alarm.active for alarm in alarms.values())
    for alarm in alarms.values():
        assert alarm.explanation and alarm.check and alarm.since_step is None and alarm.since_time is None
        assert set(dataclasses.asdict(alarm)) == {"name", "active", "since_step", "since_time", "explanation", "check"}


def test_context_blind_waits_for_warm_up_then_fires_near_the_floor():
    near_floor = dict(val_loss=3.05, floor=3.07)
    assert not states(AlarmInputs(step=99, **near_floor))["context_blind"].active
    alarm = states(AlarmInputs(step=100, **near_floor))["context_blind"]
    assert alarm.active and "3.050" in alarm.explanation and "floor 3.070" in alarm.explanation
    assert not states(AlarmInputs(step=100, val_loss=3.2, floor=3.07))["context_blind"].active  # 0.13 above: learning
    assert not states(AlarmInputs(step=100, val_loss=2.4, floor=3.07))["context_blind"].active


def test_context_blind_fires_when_hiding_context_costs_nothing():
    alarm = states(AlarmInputs(step=200, val_loss=2.4, floor=3.07, no_context_gap=0.01))["context_blind"]
    assert alarm.active and "+0.010" in alarm.explanation
    assert not states(AlarmInputs(step=200, val_loss=2.4, floor=3.07, no_context_gap=0.5))["context_blind"].active


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
