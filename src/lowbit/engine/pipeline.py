"""A calibrated quantization run from a model source to a saved folder (``lowbit quantize --method gptq``).

Load (streamed from safetensors when possible) → calibration windows → plan → forecast and
``--max-memory`` check → ``engine.runner.calibrate`` with a checkpoint folder ``<out>.partial`` → save
(shard by shard when streamed) → remove the checkpoint folder.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.models.blocks import find_blocks
from lowbit.engine.checkpoint import RunDir, fingerprint, started_batch
from lowbit.errors import LowbitError
from lowbit.manifest import record_recipe
from lowbit.engine.forecast import Shape, fit, measure_flops, parse_bytes, peak_rss_bytes, rss_bytes
from lowbit.models.targets import default_plan, resolve_schemes
from lowbit.modifiers.base import BlockWork
from lowbit.qtensor import matrix_shape
from lowbit.engine.restore import restore_block
from lowbit.engine.runner import RunReport, Streaming, calibrate
from lowbit.recipe.recipe import Recipe
from lowbit.scheme import TensorScheme
from lowbit.version import __version__


@dataclass
class CalibratedRun:
    """Arguments of a calibrated run, as the CLI collects them."""

    source: str
    scheme: TensorScheme
    out: Path
    recipe: Recipe
    calib: str = "pydoc"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    batch_size: int | None = None  # None: the recipe's own (``Recipe.batch_windows``)
    resume: bool = False
    max_memory: str | None = None
    overwrite: bool = False
    allow_pickle: bool = False
    act_budget: int = 1 << 30
    progress: bool = True


def run_calibrated(args: CalibratedRun, say=print) -> dict[str, Any]:
    """Do the run; returns the numbers for the summary (seconds, peak RSS, forecast, report)."""
    from lowbit.calib import calibration_windows, parse_calib

    max_bytes = parse_bytes(args.max_memory) if args.max_memory else None
    if args.out.exists() and not args.overwrite:
        raise LowbitError(f"output folder {args.out} already exists; choose another --out or pass --overwrite")
    model, tokenizer, streamed, identity = _open(args)
    t0 = time.perf_counter()  # the run's seconds leave out loading the model, as for data-free methods
    if tokenizer is None:
        raise LowbitError(f"{args.source} has no tokenizer, so calibration text cannot be tokenized")
    if streamed is not None and any(src.kind == "self" for src in parse_calib(args.calib)):
        raise LowbitError("self-generated calibration text needs the whole model in memory, but this run "
                          "streams its weights; pass --calib pydoc or a text file")
    windows = calibration_windows(tokenizer, args.calib, args.samples, args.seq_len, seed=args.seed, model=model)
    plan = default_plan(model, args.scheme)
    shape = _shape(model, plan, streamed, args, windows)
    forecast, act_budget, batch = fit(shape, max_bytes, args.act_budget, measure_flops(), streamed is not None)
    say(forecast.describe())
    workdir = args.out.with_name(args.out.name + ".partial")
    started = started_batch(workdir) if args.resume else None
    if started is not None and started != batch:  # memory use moved since the run began
        say(f"resuming with the batch of {started} windows this run started with (the forecast now picks {batch})")
        batch = started
    batches = list(windows.split(batch))
    # the batching is part of the run: a resume that split the windows differently would not match
    run_id = fingerprint(identity, args.scheme.to_dict(), args.recipe.to_dict(), windows, batch, __version__)
    stream = Streaming(streamed.load, streamed.release) if streamed else None
    report = calibrate(model, plan, args.recipe, batches, workdir=workdir, resume=args.resume, fingerprint=run_id,
                       streaming=stream, act_budget=act_budget, progress=args.progress)
    record_recipe(model, args.recipe.to_dict(), [r.to_dict() for r in plan])
    _save(model, tokenizer, streamed, workdir, args)
    RunDir(workdir, run_id, resume=True).remove()
    return {"seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes(), "forecast": forecast,
            "report": report, "streamed": streamed is not None, "windows": tuple(windows.shape), "model": model,
            "tokenizer": tokenizer}


def _open(args: CalibratedRun) -> tuple[nn.Module, Any, Any, Any]:
    """(model, tokenizer, streamed or None, identity for the fingerprint)."""
    from lowbit.hf.load import load_model

    path = Path(args.source).expanduser()
    in_memory = any(stage.modifier.reads_all_weights for stage in args.recipe.stages)  # e.g. allocation=rd
    if path.is_dir() and (path / "config.json").is_file() and not (path / "lowbit.json").exists() \
            and any(path.glob("*.safetensors")) and not in_memory:
        from lowbit.hf.lazy import open_streamed

        streamed = open_streamed(path)
        if streamed is not None:
            return streamed.model, streamed.tokenizer, streamed, streamed.source.identity()
    loaded = load_model(args.source, allow_pickle=args.allow_pickle)
    identity = fingerprint(*[p for _, p in sorted(loaded.model.state_dict().items())])
    return loaded.model, loaded.tokenizer, None, identity


def _shape(model: nn.Module, plan: list, streamed: Any, args: CalibratedRun, windows: torch.Tensor) -> Shape:
    found = find_blocks(model)
    prefix = f"{found[0]}.0." if found else ""
    modules = dict(model.named_modules())
    layers = tuple(matrix_shape(tuple(getattr(modules[t.module_name], t.param).shape), t.layout)
                   for t, _ in resolve_schemes(model, plan) if t.key.startswith(prefix))
    block = found[1][0] if found else model
    params = sum(p.numel() for p in block.parameters())
    block_bytes = streamed.block_bytes() if streamed else sum(p.numel() * p.element_size() for p in block.parameters())
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or max((c for _, c in layers), default=1))
    n_blocks = len(found[1]) if found else 1
    batch_tokens = min(args.batch_size or args.recipe.batch_windows, windows.shape[0]) * windows.shape[1]
    work = BlockWork(layers, windows.numel(), batch_tokens)
    # a later stage that corrects a quantized weight (LoRC, bias correction) gets its float32 copy,
    # kept for one block at a time; counted for every layer of the block (errs high)
    keeps = any(s.modifier.refines or s.modifier.float_weights for s in args.recipe.stages)
    kept = 4 * sum(r * c for r, c in layers) if keeps else 0
    return Shape(resident_bytes=rss_bytes(), block_bytes=block_bytes, block_params=params, blocks=n_blocks,
                 layers=layers, hidden=hidden, intermediate=max((r for r, _ in layers), default=hidden),
                 tokens=windows.numel(), seq_len=windows.shape[1], batch_tokens=batch_tokens,
                 streamed_bytes=block_bytes * n_blocks * 2 if streamed else 0,
                 method_bytes=max(s.modifier.memory(work) for s in args.recipe.stages),
                 method_flops=sum(s.modifier.flops(work) for s in args.recipe.stages),
                 float_generation=args.recipe.float_targets, kept_bytes=kept)


def _save(model: nn.Module, tokenizer: Any, streamed: Any, workdir: Path, args: CalibratedRun) -> None:
    from lowbit.io import save

    if streamed is None:
        save(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
        return
    from lowbit.hf.lazy import save_chunks

    chunks = save_chunks(streamed, lambda i, block: restore_block(model, workdir, i))
    save(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite, chunks=chunks)
