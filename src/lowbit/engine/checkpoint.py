"""The working folder of a calibration run: a checkpoint after every block, for ``--resume``.

Layout of ``<out>.partial/``::

    state.json              fingerprint of the run's inputs, number of finished blocks, and the
                            batch size it started with (a resume keeps it: ``started_batch``)
    block-0007.safetensors  the quantized tensors of block 7 (QuantizedTensor parts)
    block-0007.json         their metadata and the block's solver report
    acts-0007/              hidden states after block 7, one file per batch (activations.py)

Every file is written under a temporary name and renamed into place, and ``state.json`` moves
forward only after the block's files are complete, so a run killed at any instant (even with
``kill -9``) resumes from its last finished block. A resumed run loads exactly the bytes an
uninterrupted run would have kept in memory, so its output is byte-identical.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lowbit.errors import LowbitError

STATE = "state.json"


def fingerprint(*parts: Any) -> str:
    """A short hash of the run's inputs (JSON-serialisable parts and tensors' bytes)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            h.update(part.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class RunDir:
    """A run's checkpoint folder. ``done`` is the number of finished blocks."""

    def __init__(self, path: Path, fingerprint: str, resume: bool, batch: int | None = None) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.batch = batch
        self.done = 0
        if self.path.exists() and not resume:
            raise LowbitError(f"{self.path} holds an unfinished run; pass --resume to continue it, "
                              "or delete that folder to start over")
        if resume and (self.path / STATE).is_file():
            state = _read_json(self.path / STATE)
            if state.get("fingerprint") != fingerprint:
                raise LowbitError(f"{self.path} was started with a different model, plan, method or calibration "
                                  "data; resume with the same arguments, or delete that folder to start over")
            self.done = int(state["done"])
            self.batch = state.get("batch", batch)
        else:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
            self._write_state()

    def acts(self, block: int) -> Path:
        """Hidden states the quantized block ``block`` produced."""
        return self.path / f"acts-{block:04d}"

    def fp_acts(self, block: int) -> Path:
        """Hidden states the float block ``block`` produced (kept for stages with float targets)."""
        return self.path / f"fp-acts-{block:04d}"

    def save_block(self, block: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        stem = self.path / f"block-{block:04d}"
        _atomic(stem.with_suffix(".safetensors"),
                lambda p: save_file({k: t.contiguous() for k, t in tensors.items()}, str(p)))
        _atomic(stem.with_suffix(".json"), lambda p: p.write_text(json.dumps(meta, indent=1, sort_keys=True)))

    def load_block(self, block: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return read_block(self.path, block)

    def mark_done(self, block: int) -> None:
        """Record block ``block`` as finished, then drop the hidden states it no longer needs."""
        self.done = block + 1
        self._write_state()
        old = [self.acts(block - 1), self.fp_acts(block - 1)] if block > 0 else [self.path / "acts-input"]
        for folder in old:
            shutil.rmtree(folder, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _write_state(self) -> None:
        state = {"fingerprint": self.fingerprint, "done": self.done, "batch": self.batch}
        _atomic(self.path / STATE, lambda p: p.write_text(json.dumps(state, sort_keys=True)))


def started_batch(path: Path) -> int | None:
    """The batch size (windows per batch) of the unfinished run in ``path``; None if there is none."""
    state = Path(path) / STATE
    if not state.is_file():
        return None
    batch = _read_json(state).get("batch")
    return int(batch) if batch else None


def read_block(folder: Path, block: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The quantized tensors and metadata that block ``block`` left in the checkpoint ``folder``."""
    stem = Path(folder) / f"block-{block:04d}"
    return load_file(str(stem.with_suffix(".safetensors"))), _read_json(stem.with_suffix(".json"))


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"{path} is unreadable ({e}); delete {path.parent} to start over") from None
