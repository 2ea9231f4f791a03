"""Fixtures of the tests that start real processes: whatever a test leaves running is killed."""

from __future__ import annotations

import pytest

from helpers.processes import Children, Cluster


@pytest.fixture
def children():
    group = Children()
    yield group
    group.close()


@pytest.fixture
def cluster(tmp_path):
    group = Cluster(tmp_path)
    yield group
    group.close()
