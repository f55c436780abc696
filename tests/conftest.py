"""Shared fixtures for the test suite."""

from __future__ import annotations

import pytest

import millstream as ms


@pytest.fixture(scope="session", autouse=True)
def millstream_session():
    """One engine session (two workers, no progress bars) for the whole test run."""
    ms.init(parallelism=2, progress=False)
    yield
    ms.shutdown()
