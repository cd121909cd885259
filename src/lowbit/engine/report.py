"""What a run did, stage by stage, for the summary table and the saved report."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageReport:
    """One stage: its method and options, tensors targeted and done, seconds, block-solve numbers."""

    method: str
    options: dict[str, Any]
    targeted: int
    done: int = 0
    seconds: float = 0.0
    blocks: list[dict[str, Any]] = field(default_factory=list)

    def row(self) -> tuple[str, str]:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return (f"{self.method}" + (f" ({opts})" if opts else ""),
                f"{self.done} of {self.targeted} layers, {self.seconds:.1f} s")


@dataclass
class RunReport:
    """What a run did: per stage, per layer (key, method, loss, damp, tokens, seconds), fallbacks."""

    blocks: int = 0
    stages: list[StageReport] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # "<key>: why it was rounded to nearest"
    resumed_from: int = 0
    seconds: float = 0.0

    def rows(self) -> list[tuple[str, str]]:
        """Summary lines: blocks, each stage, raised dampening, fallbacks."""
        rows = [("blocks", str(self.blocks))] if self.blocks else []
        rows.append(("layers solved", str(len({r["key"] for r in self.layers}))))
        rows += [("stage " + str(i + 1), ": ".join(s.row())) for i, s in enumerate(self.stages)]
        if self.resumed_from:
            rows.append(("resumed at block", str(self.resumed_from)))
        raised = [r["key"] for r in self.layers if r.get("damp_raised")]
        if raised:
            rows.append(("dampening raised", f"{len(raised)} layers, e.g. {', '.join(raised[:3])}"))
        rows += [("fallback", f) for f in self.fallbacks]
        return rows
