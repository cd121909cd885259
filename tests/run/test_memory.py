"""Quantizing lets go of the float weights: the Parameter dies, and pages a checkpoint mapping
held for it leave the process (``lowbit.memory``), unless something else still reads them."""
from __future__ import annotations

import gc
import mmap
import sys
import weakref

import pytest
import torch
from torch import Tensor, nn

import lowbit
from lowbit.memory import release_dead

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise are Linux's")
ROWS, COLS = 256, 1024  # 1 MiB of float32 per weight


def _mapped_model(tmp_path, n: int = 3) -> tuple[nn.Sequential, Tensor]:
    """Linear layers whose weights have their own storages inside one private mapping of a file,
    as transformers loads safetensors, plus a tensor after them that keeps the mapping alive (the
    role of the embeddings, which stay float)."""
    path = tmp_path / "weights.bin"
    torch.manual_seed(0)
    path.write_bytes(torch.randn((n + 1) * ROWS * COLS).numpy().tobytes())
    with open(path, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
    size = ROWS * COLS

    def tensor(i: int) -> Tensor:
        return torch.frombuffer(mapped, dtype=torch.float32, count=size, offset=i * size * 4)

    model = nn.Sequential(*[nn.Linear(COLS, ROWS, bias=False) for _ in range(n)])
    for i, layer in enumerate(model):
        layer.weight = nn.Parameter(tensor(i).view(ROWS, COLS), requires_grad=False)
    return model, tensor(n)


def _mapping_rss_kib(addr: int) -> int:
    """Resident KiB of the mapping that contains ``addr`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError("no mapping holds that address")


def test_quantizing_frees_the_float_parameter():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    before = [weakref.ref(m.weight) for m in model]
    lowbit.quantize(model, "w4g32", progress=False)
    gc.collect()
    assert all(r() is None for r in before)
    assert all(not isinstance(m.weight, nn.Parameter) for m in model)


@linux
def test_quantizing_drops_the_pages_of_mapped_weights(tmp_path):
    model, keep = _mapped_model(tmp_path)
    addr = keep.data_ptr()
    expected = [lin.weight.detach().clone() for lin in model]  # reads every page, as the quantizer will
    assert _mapping_rss_kib(addr) >= 3 * ROWS * COLS * 4 // 1024
    lowbit.quantize(model, "w4g64", progress=False)
    gc.collect()
    release_dead()
    assert _mapping_rss_kib(addr) <= 4 * mmap.PAGESIZE // 1024  # the pages shared with neighbours at most
    ref = nn.Sequential(*[nn.Linear(COLS, ROWS, bias=False) for _ in expected])
    for lin, w in zip(ref, expected):
        lin.weight = nn.Parameter(w)
    lowbit.quantize(ref, "w4g64", progress=False)
    for a, b in zip(model, ref):
        assert torch.equal(a.weight, b.weight)  # same dequantized weights as from anonymous memory


@linux
def test_a_weight_still_viewed_keeps_its_pages_and_values(tmp_path):
    model, keep = _mapped_model(tmp_path, n=1)
    addr = keep.data_ptr()
    with torch.no_grad():
        model[0].weight[:, :4].mul_(3.0)  # a private copy of the first pages, as a float stage would write
    view = model[0].weight.detach()
    expected = view.clone()
    lowbit.quantize(model, "w4g64", progress=False)
    gc.collect()
    release_dead()
    assert _mapping_rss_kib(addr) >= ROWS * COLS * 4 // 1024
    assert torch.equal(view, expected)
