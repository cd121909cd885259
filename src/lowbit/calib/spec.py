"""Calibration source specs: parse ``"data.txt:64,pydoc:64"`` and allocate sample counts.

Syntax (entries separated by commas, whitespace around them ignored)::

    SPEC   := ENTRY ("," ENTRY)*
    ENTRY  := SOURCE [ "#" KEY ] [ ":" WEIGHT ]
    SOURCE := "pydoc" | "self" | PATH
    WEIGHT := COUNT | FRACTION       COUNT: a whole number >= 1 ("64")
                                     FRACTION: a number with a decimal point in (0, 1] ("0.5", ".25")

| source  | text                                                                            |
|---------|---------------------------------------------------------------------------------|
| pydoc   | the calibration half of the built-in pydoc corpus (``split_pydoc()[0]``)         |
| self    | text sampled from the model itself (LLM-QAT); needs ``model=``                   |
| x.jsonl | one JSON object per line, text under ``KEY`` (default ``"text"``)                |
| folder  | a ``datasets.save_to_disk`` folder, else every .txt/.md/.jsonl file in it, sorted |
| PATH    | any other file: UTF-8 text                                                       |

Weights are all counts or all fractions, never both. Entries without a weight share what is
left equally: ``"pydoc"`` takes every sample, ``"pydoc,self"`` half each, ``"data.txt:64,pydoc"``
64 from the file and the rest from pydoc. Counts must add up to ``n_samples`` (or leave room for
the unweighted entries); fractions must add up to 1 (or to less, when some entry has no weight).
Fractions become counts by the largest-remainder rule, ties going to the earlier entry, so
``allocate`` is deterministic. A path holding ``,`` cannot be written in a spec; pass a list of
``CalibSource`` (see ``calib_source``) instead.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError

NAMES = ("pydoc", "self")
KINDS = ("pydoc", "self", "text", "jsonl", "folder")
EXAMPLES = "e.g. 'pydoc', 'data.txt:64,pydoc:64' or 'pydoc:0.5,self:0.5'"
EPS = 1e-6
_COUNT = re.compile(r"\d+")
_FRACTION = re.compile(r"\d*\.\d+|\d+\.\d*")

Weight = int | float | None  # int: a count; float: a fraction; None: share the rest


@dataclass(frozen=True)
class CalibSource:
    """One calibration source.

    ``kind`` is one of ``KINDS``; ``path`` is set for ``text``/``jsonl``/``folder`` and ``None``
    for ``pydoc``/``self``; ``key`` names the text field of JSONL records and dataset rows;
    ``weight`` is a count (int >= 1), a fraction (float in (0, 1]) or ``None``.
    """

    kind: str
    path: Path | None = None
    key: str = "text"
    weight: Weight = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LowbitError(f"calibration source kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if (self.path is None) != (self.kind in NAMES):
            need = "no path" if self.kind in NAMES else "a path"
            raise LowbitError(f"calibration source {self.kind!r} takes {need}, got path={self.path!r}")
        if not self.key:
            raise LowbitError(f"calibration source {self.label} has an empty text key; use e.g. 'text'")
        check_weight(self.weight, self.label)

    @property
    def label(self) -> str:
        """How the source is named in messages and summaries: ``pydoc``, ``self`` or the path (``#key``)."""
        name = self.kind if self.path is None else str(self.path)
        return name if self.key == "text" else f"{name}#{self.key}"


def check_weight(weight: Weight, label: str) -> None:
    """Raise ``LowbitError`` unless ``weight`` is None, an int >= 1 or a float in (0, 1]."""
    if weight is None:
        return
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise LowbitError(f"weight {weight!r} of {label} is not a number; give a count (64) or a fraction (0.5)")
    if isinstance(weight, int) and weight < 1:
        raise LowbitError(f"count {weight} of {label} must be at least 1; drop the source instead")
    if isinstance(weight, float) and not 0.0 < weight <= 1.0:
        raise LowbitError(f"fraction {weight} of {label} is outside (0, 1]; give a count as a whole "
                          "number (64) or a fraction with a decimal point (0.5)")


def calib_source(source: str | os.PathLike, weight: Weight = None, key: str = "text") -> CalibSource:
    """A ``CalibSource`` for ``"pydoc"``, ``"self"`` or a path; the path must exist.

    A folder is kind ``folder``, a ``.jsonl`` file ``jsonl``, any other file ``text``.
    """
    name = os.fspath(source)
    if name in NAMES:
        return CalibSource(name, None, key, weight)
    path = Path(name).expanduser()
    if not path.exists():
        if os.sep not in name and "/" not in name and not path.suffix:
            raise LowbitError(f"calibration source {name!r} is unknown; use pydoc, self, or the path of "
                              f"a text file, a .jsonl file or a folder ({EXAMPLES})")
        raise LowbitError(f"calibration file {str(path)!r} does not exist; pass the path of a text "
                          "file, a .jsonl file or a folder, or use pydoc")
    kind = "folder" if path.is_dir() else "jsonl" if path.suffix.lower() == ".jsonl" else "text"
    return CalibSource(kind, path, key, weight)


def parse_calib(spec: str, *, allow_self: bool = True) -> tuple[CalibSource, ...]:
    """Parse a calibration spec (syntax in the module docstring) into sources, checked.

    Pass ``allow_self=False`` when no model is at hand, so ``self`` fails here with a clear
    message. Raises ``LowbitError`` for bad syntax, an unknown source, a missing path,
    a bad or mixed weight, fractions that do not add up, or a source listed twice.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise LowbitError(f"calibration spec {spec!r} is empty; {EXAMPLES}")
    entries = [e.strip() for e in spec.split(",")]
    for i, entry in enumerate(entries):
        if not entry:
            raise LowbitError(f"calibration spec {spec!r} has an empty entry at position {i + 1}; "
                              f"separate sources with single commas, {EXAMPLES}")
    sources = tuple(parse_entry(e) for e in entries)
    check_sources(sources, allow_self=allow_self)
    return sources


def parse_entry(entry: str) -> CalibSource:
    """One ``SOURCE[#KEY][:WEIGHT]`` entry; an existing path that contains ``:`` or ``#`` wins."""
    name, weight = entry, None
    head, sep, tail = entry.rpartition(":")
    if sep and not Path(entry).expanduser().exists():
        if _COUNT.fullmatch(tail):
            name, weight = head, int(tail)
        elif _FRACTION.fullmatch(tail):
            name, weight = head, float(tail)
        elif head in NAMES or Path(head.partition("#")[0]).expanduser().exists():
            raise LowbitError(f"weight {tail!r} in calibration entry {entry!r} is not a count (64) "
                              "or a fraction (0.5)")
    key = "text"
    base, sep, field = name.rpartition("#")
    if sep and not Path(name).expanduser().exists():
        if not field or not base:
            raise LowbitError(f"calibration entry {entry!r} has an empty name around '#'; write PATH#KEY")
        name, key = base, field
    if not name.strip():
        raise LowbitError(f"calibration entry {entry!r} has no source before ':'; {EXAMPLES}")
    return calib_source(name.strip(), weight, key)


def check_sources(sources: Sequence[CalibSource], allow_self: bool = True) -> None:
    """Check a list of sources as a whole: not empty, no duplicates, one weight kind, fractions add up."""
    if not sources:
        raise LowbitError(f"no calibration sources given; {EXAMPLES}")
    labels = [s.label for s in sources]
    for label in labels:
        if labels.count(label) > 1:
            raise LowbitError(f"calibration source {label} is listed twice; list it once with the combined weight")
    if not allow_self and "self" in labels:
        raise LowbitError("calibration source 'self' samples text from the model, but no model was given; "
                          "pass model=..., or use pydoc or a file instead")
    counts = [s.weight for s in sources if isinstance(s.weight, int)]
    fractions = [s.weight for s in sources if isinstance(s.weight, float)]
    if counts and fractions:
        raise LowbitError(f"calibration weights mix counts ({counts[0]}) and fractions ({fractions[0]}); "
                          "use whole numbers for every source, or fractions for every source")
    _check_fractions(sources, sum(fractions))


def _check_fractions(sources: Sequence[CalibSource], total: float) -> None:
    if not any(isinstance(s.weight, float) for s in sources):
        return
    rest = [s.label for s in sources if s.weight is None]
    if total > 1 + EPS:
        raise LowbitError(f"calibration fractions sum to {total:g}, more than 1; make them add up to 1")
    if not rest and abs(total - 1) > EPS:
        raise LowbitError(f"calibration fractions sum to {total:g}, not 1; make them add up to 1, or "
                          "leave one source without a weight to take the rest")
    if rest and total > 1 - EPS:
        raise LowbitError(f"calibration fractions already sum to 1, leaving nothing for {', '.join(rest)}")


def allocate(sources: Sequence[CalibSource], n_samples: int) -> list[int]:
    """Samples per source (same order), adding up to exactly ``n_samples``; deterministic.

    Counts are taken as they are; unweighted sources split what is left equally (earlier
    sources get the odd ones); fractions go through the largest-remainder rule.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise LowbitError(f"n_samples {n_samples!r} must be a positive integer")
    check_sources(sources)
    if any(isinstance(s.weight, int) for s in sources):
        return _allocate_counts(sources, n_samples)
    given = sum(s.weight for s in sources if s.weight is not None)
    n_rest = sum(s.weight is None for s in sources)
    share = (1.0 - given) / n_rest if n_rest else 0.0
    return largest_remainder([share if s.weight is None else s.weight for s in sources], n_samples)


def _allocate_counts(sources: Sequence[CalibSource], n_samples: int) -> list[int]:
    fixed = sum(s.weight for s in sources if s.weight is not None)
    rest = [s.label for s in sources if s.weight is None]
    if not rest and fixed != n_samples:
        raise LowbitError(f"calibration counts sum to {fixed} but n_samples is {n_samples}; make them "
                          "add up to n_samples, or leave one source without a count to take the rest")
    if rest and n_samples - fixed < len(rest):
        raise LowbitError(f"calibration counts sum to {fixed}, leaving {n_samples - fixed} of n_samples "
                          f"{n_samples} for {', '.join(rest)}; lower the counts or raise n_samples")
    left = n_samples - fixed
    shares = iter([left // len(rest) + (i < left % len(rest)) for i in range(len(rest))] if rest else [])
    return [s.weight if s.weight is not None else next(shares) for s in sources]


def largest_remainder(weights: Sequence[float], n: int) -> list[int]:
    """Integers proportional to ``weights`` that add up to ``n`` (Hamilton's method, ties to earlier)."""
    total = sum(weights)
    quotas = [w / total * n for w in weights]
    counts = [int(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts
