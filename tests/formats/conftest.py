"""Shared setup for the format tests.

The tests work on small tensors (hundreds to tens of thousands of elements), where ATen's
OpenMP fan-out costs far more than it saves: on a busy 2-core machine every parallel kernel
(abs, round, bucketize, ...) was measured at ~11 ms instead of ~10 µs. Each module therefore
runs single-threaded and restores the previous thread count afterwards.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
