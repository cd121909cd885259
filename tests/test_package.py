"""Package-level promises: a light import, a public API, one CLI entry point."""
from __future__ import annotations

import subprocess
import sys


def test_import_lowbit_does_not_import_transformers():
    code = (
        "import sys, lowbit, lowbit.formats, lowbit.quantizer, lowbit.io, lowbit.eval, lowbit.cli\n"
        "lowbit.quantize, lowbit.save, lowbit.load, lowbit.parse_scheme\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_three_lines_of_python(tmp_path):
    import torch
    from torch import nn

    import lowbit

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(3, 64)
    lowbit.quantize(model, "w4g32", progress=False)
    lowbit.save(model, tmp_path / "m")
    fresh = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    assert torch.equal(lowbit.load(tmp_path / "m", model=fresh, packed=False)(x), model(x))


def test_python_dash_m_lowbit_is_the_cli():
    r = subprocess.run([sys.executable, "-m", "lowbit", "methods"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "gptq" in r.stdout and "wanda" in r.stdout
