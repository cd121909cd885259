"""Atomic output for exporters: write beside the target, fsync, rename into place.

A failed or killed export leaves the previous output (or nothing) behind, never half a file.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lowbit.errors import LowbitError


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise LowbitError(f"{out} already exists; choose another --out or pass --overwrite")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LowbitError(f"cannot create {out.parent} ({e.strerror}); choose a folder you can write") from None


@contextmanager
def atomic_file(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it is fsynced and renamed to ``out``."""
    out = Path(out)
    _check_target(out, overwrite)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success its files are fsynced and it replaces ``out``."""
    from lowbit.io import _finish, _replace

    out = Path(out)
    _check_target(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        _finish(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
