"""Shared by the CLI resume tests: a `lowbit` process killed (SIGKILL) right after its first block
is checkpointed, and a folder's files as bytes."""
from __future__ import annotations

from pathlib import Path

#: Run as ``python -c KILL_AFTER_FIRST_BLOCK quantize ...``: the CLI, killed once block 0 is marked done.
KILL_AFTER_FIRST_BLOCK = """
import os, signal, sys
from lowbit.engine import checkpoint
done = checkpoint.RunDir.mark_done
def mark_done(self, block):
    done(self, block)
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.RunDir.mark_done = mark_done
from lowbit.cli import main
sys.argv = ["lowbit", *sys.argv[1:]]
main()
"""


def files(folder: Path) -> dict[str, bytes]:
    """File name -> bytes of every file directly in ``folder``."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
