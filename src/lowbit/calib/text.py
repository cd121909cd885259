"""Plain-text calibration sources: a UTF-8 file, and the calibration half of the pydoc corpus.

The pydoc halves of ``split_pydoc`` share no document, but they do share text: some topics
quote others (``"compound"`` holds the ``if``, ``while``, ``try`` and ``with`` sections), so
about a quarter of the calibration half's paragraphs also appear in the evaluation half.
``pydoc_calibration_text`` drops those paragraphs, so no run of ``SHARED_RUN`` characters of
calibration text occurs in the evaluation text.
"""
from __future__ import annotations

import bisect
import functools
from pathlib import Path


SHARED_RUN = 64  # characters; about 16 tokens of a typical BPE


def read_text(path: str | Path) -> str:
    """The contents of a UTF-8 text file (``.txt``, ``.md`` or any other name); errors as ``read_utf8``."""
    from lowbit.eval.corpus import read_utf8

    return read_utf8(path, "calibration")


@functools.lru_cache(maxsize=1)
def pydoc_calibration_text() -> str:
    """The calibration half ``split_pydoc()[0]`` minus its paragraphs shared with the evaluation half.

    Never reads anything but the calibration half; the evaluation half is only compared
    against. About 73% of the calibration half's characters remain (CPython 3.11); computed
    once per process (about 0.5 s).
    """
    from lowbit.eval.corpus import DOC_SEPARATOR, split_pydoc

    cal, ev = split_pydoc()
    return drop_shared_paragraphs(cal, ev, SHARED_RUN, DOC_SEPARATOR)


def drop_shared_paragraphs(text: str, other: str, run: int = SHARED_RUN, sep: str = "\n\n") -> str:
    """``text`` without each paragraph (split on ``sep``) that shares ``run`` characters with ``other``.

    The kept paragraphs are joined with ``sep`` and checked again until no run of ``run``
    characters of the result occurs in ``other`` (dropping a paragraph joins its neighbours,
    which can form a new shared run; a run across a join drops both sides).
    """
    seen = {other[i : i + run] for i in range(len(other) - run + 1)}
    paras = text.split(sep)
    while True:
        joined = sep.join(paras)
        hits = [i for i in range(len(joined) - run + 1) if joined[i : i + run] in seen]
        if not hits:
            return joined
        starts, pos = [], 0
        for p in paras:
            starts.append(pos)
            pos += len(p) + len(sep)
        drop = set()
        for i in hits:  # paragraphs overlapping joined[i : i + run]
            drop.update(range(bisect.bisect_right(starts, i) - 1, bisect.bisect_right(starts, i + run - 1)))
        paras = [p for k, p in enumerate(paras) if k not in drop]
