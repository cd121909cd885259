"""Calibration data for layer-by-layer calibration (GPTQ and friends).

Nothing here imports transformers or datasets at import time; tokenizers and models are
passed in, and ``datasets`` is imported only to read a ``save_to_disk`` folder.

    >>> from lowbit.calib import calibration_windows, describe_calib
    >>> x = calibration_windows(tokenizer, "pydoc:0.5,self:0.5", n_samples=128, seq_len=512, model=model)
    >>> x.shape, x.dtype                      # (torch.Size([128, 512]), torch.int64)
    >>> str(describe_calib("pydoc:0.5,self:0.5", 128, 512))
    'pydoc 64 + self 64 = 128 x 512 = 65,536 tokens'

Spec syntax and the source kinds: ``lowbit.calib.spec``; the LLM-QAT self-generation and its
guessed details: ``lowbit.calib.selfgen``; the on-disk cache: ``lowbit.calib.cache``.
"""
from __future__ import annotations

from lowbit.calib.selfgen import self_generate
from lowbit.calib.spec import CalibSource, allocate, calib_source, parse_calib
from lowbit.calib.windows import CalibSummary, calibration_windows, describe_calib, sample_windows

__all__ = [
    "CalibSource",
    "CalibSummary",
    "allocate",
    "calib_source",
    "calibration_windows",
    "describe_calib",
    "parse_calib",
    "sample_windows",
    "self_generate",
]
