"""A recipe is an ordered list of stages; a stage is one method with its options.

Three ways to write one:

* Python: ``Recipe((Stage(make("smoothquant", alpha=0.5)), Stage(make("rtn"))))``;
* ``--method a+b``: one stage per method, the CLI's method options going to every stage
  whose method has them (``from_methods``);
* ``--recipe FILE.yaml`` (``load_recipe``)::

      stages:
        - method: wanda
          scheme: s=50%            # optional: this stage's scheme (else the run's --scheme)
          targets: mlp             # optional: a regex searched in tensor names
        - method: gptq
          damp: 0.1                # any option of the method, by its field name

A stage's ``scheme`` replaces the run's scheme for the tensors it targets; ``targets`` narrows
the run's plan (tensors the plan leaves alone stay alone unless the stage gives a scheme).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.manifest import MANIFEST, made_by_recipe
from lowbit.modifiers import make, modifier_class
from lowbit.modifiers.base import Modifier, option_fields
from lowbit.scheme import TensorScheme


@dataclass(frozen=True)
class Stage:
    """One method, the tensors it acts on (``targets`` regex; None: all) and its scheme override."""

    modifier: Modifier
    targets: str | None = None
    scheme: TensorScheme | None = None

    def __post_init__(self) -> None:
        if self.targets is not None:
            try:
                re.compile(self.targets)
            except re.error as e:
                raise LowbitError(f"stage {self.modifier.name}: targets {self.targets!r} is not a regex: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        from lowbit.schemes import describe_scheme

        d: dict[str, Any] = {"method": self.modifier.name, **self.modifier.options()}
        if self.targets is not None:
            d["targets"] = self.targets
        if self.scheme is not None:
            d["scheme"] = describe_scheme(self.scheme)
        return d


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise LowbitError("a recipe needs at least one stage")

    @property
    def needs_data(self) -> bool:
        return any(s.modifier.needs_data for s in self.stages)

    @property
    def float_targets(self) -> bool:
        return any(s.modifier.float_targets for s in self.stages)

    @property
    def batch_windows(self) -> int:
        """Calibration windows per forward when the run does not say: the smallest a stage asks
        for (``Modifier.batch_windows``, e.g. signround's per-step batch), else 8."""
        asked = [s.modifier.batch_windows for s in self.stages if s.modifier.batch_windows]
        return min(asked) if asked else 8

    @property
    def name(self) -> str:
        return "+".join(s.modifier.name for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def of(cls, method: "Recipe | Modifier | str") -> "Recipe":
        """A recipe from a recipe, one modifier, or a method string ``a+b``."""
        if isinstance(method, Recipe):
            return method
        if isinstance(method, Modifier):
            return cls((Stage(method),))
        return from_methods(method, {})


def from_methods(text: str, options: dict[str, Any]) -> Recipe:
    """``a+b`` -> one stage per method; each option goes to every stage whose method has it."""
    names = [n.strip() for n in text.split("+")]
    if any(not n for n in names):
        raise LowbitError(f"--method {text!r} has an empty part; write methods joined by +, e.g. smoothquant+rtn")
    classes = [modifier_class(n) for n in names]
    used = set()
    stages = []
    for name, cls in zip(names, classes):
        fields = {f.name for f in option_fields(cls)}
        mine = {k: v for k, v in options.items() if k in fields}
        used |= set(mine)
        stages.append(Stage(make(name, **mine)))
    unused = sorted(set(options) - used)
    if unused:
        raise LowbitError(f"option {', '.join(unused)} belongs to none of the methods {text!r}; "
                          f"see `lowbit methods` for each method's options")
    return Recipe(tuple(stages))


def from_dict(d: Any, where: str = "recipe") -> Recipe:
    """A recipe from its mapping form (``{"stages": [{"method": ..., ...}, ...]}``)."""
    from lowbit.schemes import parse_tensor_scheme

    if not isinstance(d, dict) or not isinstance(d.get("stages"), list) or not d["stages"]:
        raise LowbitError(f"{where}: a recipe is a mapping with a non-empty list 'stages'")
    extra = sorted(set(d) - {"stages"})
    if extra:
        raise LowbitError(f"{where}: unknown key {', '.join(extra)}; a recipe has only 'stages'")
    stages = []
    for i, raw in enumerate(d["stages"]):
        if not isinstance(raw, dict) or not isinstance(raw.get("method"), str):
            raise LowbitError(f"{where}: stage {i + 1} must be a mapping with a 'method' name")
        raw = dict(raw)
        name = raw.pop("method")
        targets = raw.pop("targets", None)
        scheme = raw.pop("scheme", None)
        scheme = parse_tensor_scheme(str(scheme)) if scheme is not None else None
        stages.append(Stage(make(name, **raw), None if targets is None else str(targets), scheme))
    return Recipe(tuple(stages))


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML (or JSON) recipe file, or the recipe a lowbit folder records it was made by;
    errors name the file and what is wrong."""
    import yaml

    path = Path(path)
    if path.is_dir() and not (path / MANIFEST).is_file():
        raise LowbitError(f"{path} is a folder without {MANIFEST}; give a recipe file (.yaml) or a folder "
                          "saved by lowbit")
    if path.is_dir():
        from lowbit.io import read_manifest

        manifest = read_manifest(path)
        return from_dict(made_by_recipe(manifest, str(path)), where=f"the recipe recorded in {path / MANIFEST}")
    if not path.is_file():
        raise LowbitError(f"recipe file {path} does not exist")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise LowbitError(f"recipe {path} is not valid YAML{line}: {getattr(e, 'problem', e)}") from None
    return from_dict(d, where=f"recipe {path}")
