"""On-disk cache for self-generated calibration tokens: safetensors files, written atomically.

Files live in ``$LOWBIT_CACHE/selfgen/`` when ``LOWBIT_CACHE`` is set, else in
``$XDG_CACHE_HOME/lowbit/selfgen/`` (``~/.cache/lowbit/selfgen/``). Each file holds one
``tokens`` tensor (int64, ``(n_samples, seq_len)``) and is named by a SHA-256 of everything that
decides the tokens: a fingerprint of the model's weights and config, the candidate first
tokens, seed, count, length and the generation settings. Never pickle.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)
CONFIG_NOISE = ("_name_or_path", "transformers_version", "_commit_hash")


def cache_dir() -> Path:
    """Where self-generated samples are cached (see the module docstring); not created here."""
    root = os.environ.get("LOWBIT_CACHE")
    if root:
        return Path(root).expanduser() / "selfgen"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "lowbit" / "selfgen"


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) of the model's config and of every state-dict entry's name, dtype, shape and bytes.

    Reads every weight once (about 0.3 s per GB on a laptop CPU); any change to any weight
    or to the config gives a different fingerprint; the checkpoint's path does not count.
    """
    h = hashlib.sha256(config_text(model).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def config_text(model: nn.Module) -> str:
    """The model's Hugging Face config as sorted JSON (path and version left out), else its class name."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return type(model).__qualname__
    d = {k: v for k, v in config.to_dict().items() if k not in CONFIG_NOISE}
    return json.dumps(d, sort_keys=True, default=str)


def cache_path(key: dict[str, Any]) -> Path:
    """The cache file for a JSON-serialisable ``key``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"{digest[:32]}.safetensors"


def load_tokens(path: Path, shape: tuple[int, int]) -> Tensor | None:
    """The cached ``tokens`` (int64, ``shape``) at ``path``; ``None`` when absent or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        tokens = load_file(str(path))["tokens"]
    except (OSError, SafetensorError, KeyError) as e:
        log.warning("ignoring unreadable calibration cache %s (%s); generating again", path, e)
        return None
    if tokens.dtype != torch.long or tuple(tokens.shape) != shape:
        log.warning("ignoring calibration cache %s: %s %s, expected int64 %s", path, tokens.dtype,
                    tuple(tokens.shape), shape)
        return None
    return tokens


def save_tokens(path: Path, tokens: Tensor, key: dict[str, Any]) -> None:
    """Write ``tokens`` to ``path`` atomically (temp file in the same folder, then ``os.replace``)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({"tokens": tokens.contiguous()}, tmp, metadata={"key": json.dumps(key, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
