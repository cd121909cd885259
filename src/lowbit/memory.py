"""Give memory back to the operating system: the pages of dropped checkpoint weights, freed heap.

Two things keep a quantization run's resident memory above what it holds:

* **Mapped checkpoints.** transformers loads a safetensors checkpoint as views into one private
  mapping of the whole file. A page of it becomes resident when a weight is first read and
  stays counted until the mapping goes away, which happens only when the last tensor from the
  file dies. Quantizing reads every targeted weight and then drops it, but the embeddings and
  norms keep the mapping alive, so the dropped weights' pages stay resident beside their
  replacements (SmolLM2-135M: about 400 MiB, the float size of every quantized layer).
  ``release_when_dead(t)`` arranges that, once the tensor object ``t`` is garbage and no other
  tensor shares its storage, the next ``release_dead()`` drops the pages lying wholly inside its
  bytes with ``madvise(MADV_DONTNEED)`` — only when they belong to a private file mapping, where
  that forgets clean copies of the file, or private copies nobody can read any more. Anonymous
  memory is left to the allocator, which frees it with the storage.
* **A fragmented heap.** glibc returns freed memory to the system only from the top of its heap;
  per-layer temporaries freed below the buffers a run keeps stay resident (SmolLM2-135M,
  round-to-nearest: about 110 MiB by the end). ``trim_heap()`` calls ``malloc_trim(0)``, which
  releases free pages anywhere in the heap; ``HeapTrimmer`` calls it after every ``every`` bytes
  of solved weights, bounding the waste at the cost of a few milliseconds a call.

Linux only (glibc for the heap); elsewhere both are no-ops.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
import weakref

import torch
from torch import Tensor

MADV_DONTNEED = 4  #: Linux's value (asm-generic/mman-common.h)
_LINUX = sys.platform.startswith("linux")
_libc = None
_dead: list[torch.UntypedStorage] = []  #: storages of dead tensors, not yet released


def release_when_dead(t: Tensor) -> None:
    """When ``t`` is garbage, drop its pages if they are a private file mapping's and nothing else
    uses its storage; tensors in anonymous memory are left alone (and not held a moment longer).

    The pages go at the next ``release_dead()`` (called by ``nn.reference.attach``, by the
    runs' heap trims and after each block of a calibrated run), not while ``t`` is collected:
    the dying tensor still holds its storage at that moment.
    """
    if not _LINUX or t.device.type != "cpu":
        return
    pages = _whole_pages(t.untyped_storage())
    if pages is not None and _private_file_mapping(*pages):
        weakref.finalize(t, _dead.append, t.untyped_storage()).atexit = False


def release_dead() -> None:
    """Drop the file-backed pages of every storage whose tensor died since the last call."""
    while _dead:
        storage = _dead.pop()
        pages = _whole_pages(storage)
        if pages is not None and torch._C._storage_Use_Count(storage._cdata) == 1:  # no other tensor views them
            _call("madvise", pages[0], pages[1] - pages[0], MADV_DONTNEED)  # a failure leaves them resident


def _whole_pages(storage: torch.UntypedStorage) -> tuple[int, int] | None:
    """[first, last) of the whole pages inside the storage's bytes, None when there are none."""
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    return (first, last) if last > first else None


def trim_heap() -> None:
    """``release_dead()``, then give freed heap memory back to the system (glibc's ``malloc_trim``)."""
    release_dead()
    if _LINUX:
        _call("malloc_trim", 0)


class HeapTrimmer:
    """``trim_heap()`` once at least ``every`` bytes of weights were solved since the last trim."""

    def __init__(self, every: int = 16 << 20) -> None:
        self.every, self.pending = every, 0

    def solved(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.every:
            trim_heap()
            self.pending = 0


def _private_file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies inside one private mapping of a regular file (/proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= start < hi:
                    path = fields[5] if len(fields) > 5 else ""
                    return end <= hi and fields[1][3] == "p" and int(fields[4]) != 0 and path.startswith("/")
    except (OSError, ValueError, IndexError):
        pass
    return False


def _call(name: str, *args: int) -> None:
    """Call a libc function with integer arguments; a libc without it (musl, macOS) is ignored."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c"))
        fn = getattr(_libc, name)
    except (OSError, AttributeError, TypeError):
        return
    fn(*(ctypes.c_size_t(a) for a in args))
