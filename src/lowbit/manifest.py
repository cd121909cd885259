"""The manifest of a saved lowbit folder: its versions, migration, and its copy in config.json.

Layout of ``lowbit.json`` at format version 2 (version 1 lacked ``masks``, ``roles``,
``lowrank`` and ``input``; ``migrate`` fills the difference):

.. code-block:: text

    {"format_version": 2, "lowbit_version": "0.1.0",
     "model": {"kind": "hf" | "module", "class": "LlamaForCausalLM", "dtype": "float32"},
     "quantized": {"<module>.<param>": {"spec": {...QuantSpec...}, "shape": [out, in],
                                         "layout": "rows", "dtype": "float32",
                                         "roles": ["lowrank_a", "lowrank_b", "mask"],  # extra roles, if any
                                         "lowrank": {"rank": 8, "dtype": "float16"},    # with lowrank_a/b
                                         "input": {...ActSpec...}},                    # input quantization
                   "<tied twin>": {"same_as": "<module>.<param>"}},
     "masks": {"<module>.<param>": {"shape": [out, in]}},   # float weights pruned in place
     "aliases": {"<state-dict key>": "<key holding the same tensor>"},
     "made_by": [{"recipe": {"stages": [{"method": "gptq", "damp": 1.0, ...}]},  # one per run
                  "rules": [{"pattern": "...", "scheme": {...}}, ...]}]}

``made_by`` records how lowbit made the folder, one entry per ``quantize`` run on the model
(``lowbit quantize --recipe FOLDER`` reads a single run's recipe back). Loading never needs it,
and a folder without it (an older one, or a model quantized by hand) loads the same.

config.json's ``quantization_config`` (what transformers' ``from_pretrained`` reads) holds the same
``format_version``, ``quantized`` and ``masks``; ``check_agree`` refuses a folder whose two copies
differ. Nothing here imports io or hf: both import this module.
"""
from __future__ import annotations

import copy
from typing import Any

from lowbit.errors import LowbitError
from lowbit.spec import SPEC_VERSION
from lowbit.version import __version__

MANIFEST = "lowbit.json"  # the file name in a saved folder
FORMAT_VERSION = 3
OLDEST_FORMAT = 1
QUANT_METHOD = "lowbit"


#: Where ``lowbit.quantize`` and the calibrated pipeline leave the runs' recipes on the model
#: (``model.__dict__``), for ``io.save`` to record as ``made_by``.
RECIPE_ATTR = "lowbit_made_by"


def record_recipe(model: Any, recipe: dict[str, Any], rules: list[dict[str, Any]]) -> None:
    """Add to ``model``'s record one run: its recipe (``Recipe.to_dict()``) and rules (``Rule.to_dict()``)."""
    runs = model.__dict__.setdefault(RECIPE_ATTR, [])
    runs.append({"recipe": copy.deepcopy(recipe), "rules": copy.deepcopy(rules)})


def restore_recipe(model: Any, manifest: dict[str, Any]) -> None:
    """Put a loaded folder's ``made_by`` back on ``model``, so saving it again keeps the record."""
    if manifest.get("made_by"):
        model.__dict__[RECIPE_ATTR] = manifest["made_by"]


def made_by_recipe(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """The recipe mapping of the single run that made a folder (``made_by``); refused otherwise."""
    runs = manifest.get("made_by", [])
    if len(runs) != 1:
        why = "has no record of how it was made (saved by an older lowbit, or quantized by hand)" if not runs \
            else f"was made by {len(runs)} quantize runs, so no single recipe redoes it"
        raise LowbitError(f"{where} {why}; give a recipe file (--recipe FILE.yaml) or --method")
    return copy.deepcopy(runs[0]["recipe"])


def migrate(manifest: dict[str, Any], where: str = "this folder") -> dict[str, Any]:
    """A manifest (or a ``quantization_config``) of any readable format version, at the current one.

    Refuses, naming the version needed, a folder written by a newer lowbit: a newer folder
    format or a newer spec version. The input is not modified.
    """
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < OLDEST_FORMAT:
        raise LowbitError(f"{where} has lowbit folder format {version!r}, which no lowbit reads; quantize the model again")
    if version > FORMAT_VERSION:
        raise LowbitError(_newer(where, manifest, f"folder format {version}",
                                 f"folder formats {OLDEST_FORMAT} to {FORMAT_VERSION}"))
    out = copy.deepcopy(manifest)
    for key, meta in out.get("quantized", {}).items():
        spec_version = meta.get("spec", {}).get("version", SPEC_VERSION)
        if isinstance(spec_version, int) and spec_version > SPEC_VERSION:
            raise LowbitError(_newer(where, manifest, f"spec version {spec_version} (for {key})",
                                     f"spec version {SPEC_VERSION}"))
    if version == 1:
        out = _v1_to_v2(out)
    out["format_version"] = FORMAT_VERSION  # 2 -> 3 adds ``kept`` (sparse tensors store kept codes only); older ones store all codes
    return out


def _v1_to_v2(m: dict[str, Any]) -> dict[str, Any]:
    """Version 1 stored only codes, scale, zero and global_scale, and no float masks.

    Its specs are read as they were written: a format dict without a field added later keeps
    the meaning it had (``lowbit.formats`` owns that default).
    """
    m["format_version"] = 2
    m.setdefault("masks", {})
    return m


def _newer(where: str, manifest: dict[str, Any], what: str, reads: str) -> str:
    by = manifest.get("lowbit_version", "a newer lowbit")
    return (f"{where} uses {what}, written by lowbit {by}; this lowbit {__version__} reads {reads}: "
            f"upgrade lowbit to {by} or newer (pip install -U lowbit)")


def quantization_config(manifest: dict[str, Any]) -> dict[str, Any]:
    """The ``quantization_config`` entry of a saved config.json, from a lowbit manifest."""
    from lowbit.schemes import describe
    from lowbit.spec import QuantSpec

    specs: dict[str, int] = {}
    for meta in manifest["quantized"].values():
        if "spec" in meta:
            name = describe(QuantSpec.from_dict(meta["spec"]))
            specs[name] = specs.get(name, 0) + 1
    qc = {"quant_method": QUANT_METHOD, "format_version": manifest["format_version"],
          "lowbit_version": manifest["lowbit_version"],
          "scheme": ", ".join(f"{k} ({n} tensors)" for k, n in sorted(specs.items())),
          "quantized": manifest["quantized"], "masks": manifest.get("masks", {})}
    if manifest.get("added_biases"):  # biases a method added (bias correction): the loader creates them
        qc["added_biases"] = manifest["added_biases"]
    return qc


def check_agree(manifest: dict[str, Any], qc: dict[str, Any], where: str = "this folder") -> None:
    """Refuse a folder whose lowbit.json and config.json's ``quantization_config`` differ.

    Both are migrated first, so a version-1 folder compares like a current one.
    """
    theirs = migrate(qc, f"{where}/config.json")
    for part in ("quantized", "masks"):
        mine, other = manifest.get(part, {}), theirs.get(part, {})
        if mine == other:
            continue
        differ = sorted(set(mine) ^ set(other)) or sorted(k for k in mine if mine[k] != other[k])
        raise LowbitError(f"{where}: lowbit.json and config.json's quantization_config disagree on {part} "
                          f"entry {differ[0]}; the folder was edited by hand: restore it or quantize again")
