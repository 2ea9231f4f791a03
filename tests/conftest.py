"""Fixtures for every test."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The models of the in-process tests are tiny: one torch thread trains them as fast as two, and
    does not spin-wait against the other processes on a small machine (the child processes the
    integration tests start get OMP_NUM_THREADS=1 for the same reason)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def a_full_meta_budget(monkeypatch):
    """Each test starts with the live decoder's meta-parsing budget full (shared.wire.MetaBudget),
    whatever the tests before it parsed."""
    from shared import wire

    monkeypatch.setattr(wire, "LIVE_META_BUDGET", wire.MetaBudget(share=wire.LIVE_META_BUDGET.share,
                                                                   burst=wire.LIVE_META_BUDGET.burst))
