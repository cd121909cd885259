"""The prepared rounding table (``formats/nearest.py``): its two paths agree.

``NearestTable`` rounds by a binary search over the bounds (small inputs, float64 inputs) or by
the 16-bit bucket look-up (large float32 inputs). The scan references in ``test_reference``
check the rounding rule on both paths; here the paths are compared with each other, and with
the float64 path, on the bit patterns where they could part: the two ends of every bucket, the
neighbours of every bound, ±0, ±inf, NaN payloads sharing a bucket with ±inf, random patterns.
"""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.formats import all_formats
from lowbit.formats.base import nearest_code
from lowbit.formats.nearest import NearestTable

FORMATS = all_formats()


def float32_of_bits(bits: torch.Tensor) -> torch.Tensor:
    """int64 bit patterns (taken mod 2^32) -> float32."""
    bits = bits % 2**32
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def hard_inputs(table: NearestTable, seed: int = 0) -> torch.Tensor:
    """(N,) float32: bucket ends, bound neighbours, NaN payloads next to ±inf, random patterns."""
    first = torch.arange(2**16, dtype=torch.int64) << 16
    bound = table.bound32.view(torch.int32).to(torch.int64)
    payloads = torch.arange(1, 2**16, 97, dtype=torch.int64)
    bits = torch.cat([
        first, first + 0xFFFF, first + 0x8000,
        *(bound + d for d in range(-2, 3)),
        0x7F800000 + payloads, 0xFF800000 + payloads,
        torch.randint(0, 2**32, (2**16,), generator=torch.Generator().manual_seed(seed)),
    ])
    return float32_of_bits(bits)


@pytest.mark.parametrize("name", list(FORMATS))
def test_bucket_lookup_equals_search(name):
    table = NearestTable.build(FORMATS[name].values())
    x = hard_inputs(table)
    search = table.by_search(x)
    assert torch.equal(table(x.double(), search.dtype), search)  # float64 bounds, same codes
    if table.buckets is not None:
        assert torch.equal(table.by_bucket(x), search)
        assert torch.equal(table(x), search.long())  # large input: the look-up


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_round_like_float32(dtype):
    fmt = FORMATS["fp4_e2m1"]
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1)).to(dtype) * 4
    assert torch.equal(fmt.nearest(x), fmt.nearest(x.float()))
    assert torch.equal(fmt.nearest(x[:100]), fmt.nearest(x[:100].float()))


def test_nearest_code_cache_follows_the_table():
    x = torch.tensor([0.4, 0.6, 1.2])
    a = torch.tensor([0.0, 1.0, math.nan, 2.0], dtype=torch.float64)
    b = torch.tensor([0.0, 0.5, math.nan, 2.0], dtype=torch.float64)
    assert nearest_code(x, a).tolist() == [0, 1, 1]
    assert nearest_code(x, b).tolist() == [1, 1, 1]
    assert nearest_code(x, a).tolist() == [0, 1, 1]
