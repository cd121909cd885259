"""Hidden states between blocks: one tensor per calibration batch, in memory or on disk.

A ``Generation`` holds the hidden states that one block produced (the inputs of the next). It
keeps them in memory while the total stays under a byte budget; past it, or when a folder is
given for checkpoints, every batch is also written to ``folder/batch-NNNNN.safetensors``, and
batches beyond the budget are read back from disk when needed. A generation's folder is written
under a temporary name and renamed when complete, so a killed run never leaves half of one.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor


class Generation:
    """Per-batch hidden states ``(B, T, hidden)``, written once with ``append`` then ``finish``."""

    def __init__(self, folder: Path | None, budget_bytes: int) -> None:
        self.folder = folder
        self.budget = budget_bytes
        self.memory: list[Tensor | None] = []
        self.resident = 0
        self.count = 0
        if folder is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp.mkdir(parents=True)

    @property
    def _tmp(self) -> Path:
        assert self.folder is not None
        return self.folder.with_name(self.folder.name + ".tmp")

    def append(self, t: Tensor) -> None:
        t = t.detach().contiguous()
        keep = self.resident + t.numel() * t.element_size() <= self.budget
        if self.folder is not None:
            _save(t, self._tmp / _name(self.count))
        elif not keep:
            raise MemoryError("activations exceed the budget and no folder was given to spill them")
        self.memory.append(t if keep else None)
        self.resident += t.numel() * t.element_size() if keep else 0
        self.count += 1

    def finish(self) -> "Generation":
        """Make the on-disk copy complete (rename into place); returns self."""
        if self.folder is not None:
            _fsync_dir(self._tmp)
            shutil.rmtree(self.folder, ignore_errors=True)
            os.replace(self._tmp, self.folder)
        return self

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Tensor:
        t = self.memory[i]
        if t is not None:
            return t
        assert self.folder is not None
        return load_file(str(self.folder / _name(i)))["hidden"]

    @classmethod
    def load(cls, folder: Path, budget_bytes: int) -> "Generation":
        """Reopen a finished generation from disk (for ``--resume``), keeping what fits in memory."""
        gen = cls.__new__(cls)
        gen.folder, gen.budget, gen.memory, gen.resident = folder, budget_bytes, [], 0
        files = sorted(folder.glob("batch-*.safetensors"))
        gen.count = len(files)
        for i in range(gen.count):
            t = load_file(str(folder / _name(i)))["hidden"] if gen.resident < budget_bytes else None
            size = 0 if t is None else t.numel() * t.element_size()
            keep = t is not None and gen.resident + size <= budget_bytes
            gen.memory.append(t if keep else None)
            gen.resident += size if keep else 0
        return gen



def _name(i: int) -> str:
    return f"batch-{i:05d}.safetensors"


def _save(t: Tensor, path: Path) -> None:
    save_file({"hidden": t}, str(path))


def _fsync_dir(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()

