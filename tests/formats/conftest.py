"""Shared setup for the format tests.

The tests work on small tensors (hundreds to tens of thousands of elements), where ATen's
OpenMP fan-out costs far more than it saves: on a busy 2-core machine every parallel kernel
(abs, round, bucketize, ...) was measured at ~11 ms instead of ~10 µs. Each module therefore
runs single-threaded and restores the previous thread count afterwards.
"""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    """Every test here runs on one thread (see ``single_thread`` in tests/conftest.py)."""
