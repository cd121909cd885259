"""Text to evaluate on, and the token windows cut from it.

The built-in corpus is the standard library's ``pydoc_data.topics.topics``: 79 help topics
(about 465k characters of English prose and Python code) that ship with every CPython, so
evaluation needs no download. ``split_pydoc`` halves it deterministically: documents sorted by
key, even positions calibrate, odd positions evaluate, so calibration never sees test text.

Two topics may share one text (``"else"`` and ``"if"`` do in CPython 3.11); such duplicates are
kept once, under their first key, otherwise one copy would land in each half. The topics
change between Python versions, so the halves are fixed per interpreter version.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError

DOC_SEPARATOR = "\n\n"


def pydoc_documents() -> list[str]:
    """The pydoc topic texts in sorted key order, each distinct text once (at its first key)."""
    from pydoc_data.topics import topics

    return list(dict.fromkeys(topics[k] for k in sorted(topics)))


def pydoc_text() -> str:
    """All pydoc topic documents in sorted key order, joined with a blank line."""
    return DOC_SEPARATOR.join(pydoc_documents())


def split_pydoc() -> tuple[str, str]:
    """Split the pydoc topics into ``(calibration_half, evaluation_half)``.

    Documents are sorted by key (duplicates dropped, see ``pydoc_documents``); even positions
    (0, 2, ...) form the calibration half, odd positions the evaluation half; each half is
    joined with ``"\\n\\n"``. The halves share no document and together hold every
    document exactly once.
    """
    docs = pydoc_documents()
    return DOC_SEPARATOR.join(docs[0::2]), DOC_SEPARATOR.join(docs[1::2])


def read_utf8(path: str | Path, label: str, alternative: str = "") -> str:
    """The contents of a UTF-8 text file; ``label`` ("corpus", "calibration") names it in errors.

    Raises ``LowbitError`` naming the path when it is missing, not a regular file, not UTF-8
    or empty; ``alternative`` is appended to the advice for a missing file.
    """
    p = Path(path)
    if not p.exists():
        raise LowbitError(f"{label} file {str(p)!r} does not exist; pass the path of a UTF-8 text file{alternative}")
    if not p.is_file():
        raise LowbitError(f"{label} path {str(p)!r} is not a regular file; pass the path of a "
                          "UTF-8 text file (a directory of files is not supported)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"{label} file {str(p)!r} is not UTF-8 text (undecodable byte at offset "
                          f"{e.start}); convert it, e.g. `iconv -t UTF-8 {p} > {label}.txt`") from e
    if not text.strip():
        raise LowbitError(f"{label} file {str(p)!r} is empty; pass a file with text in it")
    return text


def load_text(path: str | Path) -> str:
    """Read a user evaluation corpus: a UTF-8 text file (errors as ``read_utf8``)."""
    return read_utf8(path, "corpus", ", or leave --corpus out to use the built-in pydoc evaluation text")


def eval_text(corpus: str | Path | None) -> str:
    """The evaluation text: the pydoc evaluation half for ``None``, else the file at ``corpus``."""
    if corpus is None:
        return split_pydoc()[1]
    return load_text(corpus)


def token_windows(tokenizer: Any, text: str, seq_len: int, n_windows: int | None = None) -> torch.Tensor:
    """Cut ``text`` into non-overlapping windows of exactly ``seq_len`` tokens.

    The whole text is tokenized once, with no special tokens added, and windows are taken
    from the start; the trailing partial window is dropped.

    Args:
        tokenizer: a Hugging Face tokenizer, or any callable
            ``tokenizer(text, add_special_tokens=False, verbose=False) -> {"input_ids": list[int]}``.
        text: the corpus.
        seq_len: tokens per window, >= 2 (one token of context, one predicted).
        n_windows: keep only the first ``n_windows`` windows; ``None`` keeps every full window.

    Returns:
        ``torch.long`` tensor ``(n, seq_len)`` with ``n = min(n_windows, n_tokens // seq_len)``.
    """
    if seq_len < 2:
        raise LowbitError(f"seq_len {seq_len} is too short; use at least 2 tokens per window")
    if n_windows is not None and n_windows < 1:
        raise LowbitError(f"n_windows {n_windows} must be a positive integer, or None for all windows")
    # verbose=False: the text is longer than the model's context on purpose; we window it below.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n_full = len(ids) // seq_len
    if n_full < 1:
        fix = f"lower --seq-len to at most {len(ids)}" if len(ids) >= 2 else "use a longer corpus"
        raise LowbitError(f"the text has {len(ids)} tokens, fewer than one window of seq_len "
                          f"{seq_len}; {fix}")
    n = n_full if n_windows is None else min(n_windows, n_full)
    flat = torch.tensor(ids[: n * seq_len], dtype=torch.long)
    return flat.view(n, seq_len)  # (n, seq_len)
