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
