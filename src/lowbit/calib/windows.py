"""Calibration windows: ``n_samples`` token windows of ``seq_len`` from a mix of sources, seeded."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lowbit.calib.folder import read_folder
from lowbit.calib.jsonl import read_jsonl
from lowbit.calib.spec import CalibSource, allocate, calib_source, check_sources, parse_calib
from lowbit.calib.text import pydoc_calibration_text, read_text
from lowbit.errors import LowbitError

DOC_SEPARATOR = "\n\n"
Sources = str | Sequence[CalibSource | str | os.PathLike]


@dataclass(frozen=True)
class CalibSummary:
    """What ``calibration_windows`` returns for these arguments: samples per source label, in order."""

    counts: dict[str, int]
    n_samples: int
    seq_len: int

    @property
    def tokens(self) -> int:
        return self.n_samples * self.seq_len

    def __str__(self) -> str:
        parts = " + ".join(f"{label} {n}" for label, n in self.counts.items())
        return f"{parts} = {self.n_samples} x {self.seq_len} = {self.tokens:,} tokens"


def resolve_sources(source_spec: Sources, allow_self: bool = True) -> tuple[CalibSource, ...]:
    """A spec string (``parse_calib``) or a list of ``CalibSource`` / one-entry spec strings, checked."""
    if isinstance(source_spec, str):
        return parse_calib(source_spec, allow_self=allow_self)
    sources = tuple(_one_source(s) for s in source_spec)
    check_sources(sources, allow_self=allow_self)
    return sources


def _one_source(item: CalibSource | str | os.PathLike) -> CalibSource:
    if isinstance(item, CalibSource):
        return item
    if isinstance(item, str):
        sources = parse_calib(item)
        if len(sources) > 1:
            raise LowbitError(f"list item {item!r} holds {len(sources)} sources; give one per item")
        return sources[0]
    return calib_source(item)


def describe_calib(source_spec: Sources, n_samples: int, seq_len: int) -> CalibSummary:
    """Samples per source and total tokens of ``calibration_windows`` with the same arguments.

    Reads no text: the counts follow from the spec and ``n_samples`` alone. ``str()`` of the
    result reads ``pydoc 64 + data.txt 64 = 128 x 512 = 65,536 tokens``.
    """
    sources = resolve_sources(source_spec)
    counts = allocate(sources, n_samples)
    return CalibSummary({s.label: n for s, n in zip(sources, counts)}, n_samples, seq_len)


def calibration_windows(tokenizer: Any, source_spec: Sources, n_samples: int, seq_len: int, seed: int = 0,
                        model: Any = None, *, progress: bool = True) -> Tensor:
    """``n_samples`` calibration windows of ``seq_len`` tokens drawn from ``source_spec``.

    Args:
        tokenizer: a Hugging Face tokenizer, or any callable
            ``tokenizer(text, add_special_tokens=False, verbose=False) -> {"input_ids": list[int]}``.
        source_spec: a spec string (syntax in ``lowbit.calib.spec``), or a list of ``CalibSource``
            or one-entry spec strings.
        seq_len: tokens per window, >= 2.
        seed: the same arguments and seed give identical windows.
        model: needed for the ``self`` source only (``lowbit.calib.selfgen``).

    Returns:
        ``torch.long`` tensor ``(n_samples, seq_len)`` on the CPU. Rows come grouped by source
        in spec order (``describe_calib`` gives the counts), in random order within a source.
        A text source is tokenized once (documents joined with a blank line, no special tokens);
        its windows do not overlap when it has at least ``count * seq_len`` tokens.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise LowbitError(f"seq_len {seq_len!r} must be an integer >= 2")
    sources = resolve_sources(source_spec, allow_self=model is not None)
    parts = [source_windows(tokenizer, s, n, seq_len, sub_seed(seed, s.label), model, progress)
             for s, n in zip(sources, allocate(sources, n_samples)) if n > 0]
    return torch.cat(parts)  # (n_samples, seq_len)


def source_windows(tokenizer: Any, source: CalibSource, n: int, seq_len: int, seed: int, model: Any = None,
                   progress: bool = True) -> Tensor:
    """``n`` windows (int64 ``(n, seq_len)``) from one source, seeded by ``seed``."""
    if source.kind == "self":
        from lowbit.calib.selfgen import self_generate

        return self_generate(model, tokenizer, n, seq_len, seed, progress=progress)
    ids = tokenizer(source_text(source), add_special_tokens=False, verbose=False)["input_ids"]
    return sample_windows(torch.tensor(ids, dtype=torch.long), n, seq_len, torch.Generator().manual_seed(seed),
                          source.label)


def source_text(source: CalibSource) -> str:
    """The whole text of a non-``self`` source, documents joined with a blank line."""
    if source.kind == "pydoc":
        return pydoc_calibration_text()
    if source.kind == "text":
        return read_text(source.path)
    texts = read_jsonl(source.path, source.key) if source.kind == "jsonl" else read_folder(source.path, source.key)
    return DOC_SEPARATOR.join(texts)


def sample_windows(ids: Tensor, n: int, seq_len: int, generator: torch.Generator, label: str = "the text") -> Tensor:
    """``n`` random windows of ``seq_len`` tokens from ``ids`` (int64 ``(T,)``) -> int64 ``(n, seq_len)``.

    With ``T >= n * seq_len`` the windows do not overlap: the ``T - n * seq_len`` spare tokens
    are split into ``n + 1`` random gaps (sorted uniform draws), then the windows are shuffled.
    Otherwise starts are distinct when ``T - seq_len + 1 >= n`` and drawn with replacement
    past that. ``T`` must be at least ``seq_len + 1``.
    """
    n_tokens = ids.numel()
    if n_tokens < seq_len + 1:
        fit = f"use seq_len <= {n_tokens - 1}" if n_tokens >= 3 else "use a longer text"
        raise LowbitError(f"calibration source {label} has {n_tokens} tokens, fewer than seq_len + 1 = "
                          f"{seq_len + 1}; {fit}, or add text")
    starts = window_starts(n_tokens, n, seq_len, generator)  # (n,)
    return ids[starts[:, None] + torch.arange(seq_len)]  # (n, seq_len)


def window_starts(n_tokens: int, n: int, seq_len: int, generator: torch.Generator) -> Tensor:
    """Start offsets (int64 ``(n,)``) in ``[0, n_tokens - seq_len]``; see ``sample_windows``."""
    spare = n_tokens - n * seq_len
    if spare >= 0:
        gaps = torch.randint(spare + 1, (n,), generator=generator).sort().values  # (n,)
        starts = gaps + torch.arange(n) * seq_len
        return starts[torch.randperm(n, generator=generator)]
    n_starts = n_tokens - seq_len + 1
    if n_starts >= n:
        return torch.randperm(n_starts, generator=generator)[:n]
    return torch.randint(n_starts, (n,), generator=generator)


def sub_seed(seed: int, label: str) -> int:
    """A 63-bit seed for one source, from the run's ``seed`` and the source's label (stable across runs)."""
    digest = hashlib.sha256(f"{seed}|{label}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
