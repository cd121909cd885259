"""The shared inputs of one side-by-side run: model folder, windows and fp32 reference log-probs.

Prepared once per (model, windows, seq_len, samples, decode tokens) in lowbit's environment and
read by every tool's runner through ``bench/peers/peer_eval.py``; see that module for the
layout. Every file is written to a temporary name and renamed into place, so an interrupted
preparation is redone, never half-used.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from common import hf_folder
from lowbit.calib import calibration_windows
from lowbit.eval import eval_text, token_windows
from lowbit.eval.perplexity import next_token_logprobs
from lowbit.hf.load import load_model

PROMPT_TOKENS = 32  #: decode prompt: the first tokens of the first pydoc evaluation window


def model_key(model: str) -> str:
    """A folder-safe name for a model given by short name or path."""
    return Path(model).name if ("/" in model or os.sep in model) else model


def work_dir(root: Path, windows: int, seq_len: int, samples: int, decode_tokens: int) -> Path:
    return root / f"work-w{windows}-l{seq_len}-n{samples}-d{decode_tokens}"


def prepare(model: str, root: Path, windows: int, seq_len: int, samples: int, decode_tokens: int,
            ood_text: str, ood_name: str) -> Path:
    """Write (or reuse) the work folder for ``model``; returns its path.

    ``root/hf`` gets the fp32 Hugging Face folder every tool loads. The evaluation windows are
    the first ``windows`` windows of ``seq_len`` tokens of the pydoc evaluation half and of
    ``ood_text``; calibration takes ``samples`` seeded windows of the pydoc calibration half.
    """
    work = work_dir(root, windows, seq_len, samples, decode_tokens)
    if (work / "work.json").exists():
        return work
    folder = hf_folder(model, root / "hf")
    loaded = load_model(str(folder))
    tok, fp32 = loaded.tokenizer, loaded.model.eval()
    ids = {"pydoc": token_windows(tok, eval_text(None), seq_len, windows),
           "prose": token_windows(tok, ood_text, seq_len, windows),
           "calib": calibration_windows(tok, "pydoc", samples, seq_len, progress=False)}
    ids["prompt"] = ids["pydoc"][:1, :min(PROMPT_TOKENS, seq_len)].clone()
    tmp = work.with_name(work.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ids.items()}, str(tmp / "windows.safetensors"))
    ref = {}
    with torch.inference_mode():
        for corpus in ("pydoc", "prose"):
            for i, w in enumerate(ids[corpus]):
                ref[f"{corpus}.{i}"] = next_token_logprobs(fp32, w[None])[0].contiguous()  # (L-1, V) float32
    save_file(ref, str(tmp / "reference.safetensors"))
    meta = {"model": model, "folder": str(folder), "windows": windows, "seq_len": seq_len, "samples": samples,
            "decode_tokens": decode_tokens, "ood": ood_name,
            "shapes": {k: list(v.shape) for k, v in ids.items()}}
    (tmp / "work.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    tmp.rename(work)
    return work
