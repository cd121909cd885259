"""`lowbit quantize --method/--recipe`: bad recipes get one line, exit 2 and leave no output;
good ones run, and the two spellings of a recipe give the same bytes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "run"))
from cli_kill import files  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}

#: Each bad case in one interpreter (starting Python and torch per case would take minutes):
#: (name, argv after the model, recipe text or None, expected words in the one-line error).
BAD = [
    ("unknown method", ["--scheme", "uint4:g32", "--method", "obc"], None, "unknown method 'obc'"),
    ("unknown option", ["--scheme", "uint4:g32", "--method", "gptq", "--dampp", "1"], None, "no such option --dampp"),
    ("option of no stage", ["--scheme", "uint4:g32", "--recipe", "R"],
     "stages:\n  - method: rtn\n    damp: 0.1\n", "method rtn has no option 'damp'"),
    ("targets match nothing", ["--scheme", "uint4:g32", "--recipe", "R"],
     "stages:\n  - method: rtn\n    targets: nothing_here\n", "match no tensor"),
    ("scheme the method cannot produce", ["--scheme", "uint4:g32", "--method", "hqq"], None,
     "hqq refines a float zero"),
    ("pruning a method cannot make", ["--scheme", "s=channel:0.3", "--method", "wanda"], None,
     "channel sparsity removes whole input channels"),
    ("scale a method cannot learn", ["--scheme", "mxfp4", "--method", "lsq"], None,
     "cannot learn the scale of mxfp4"),
    ("part no stage produces", ["--scheme", "uint4:g32+s=50%", "--method", "rtn"], None,
     "no stage of rtn produces it"),
    ("yaml that does not parse", ["--scheme", "uint4:g32", "--recipe", "R"],
     "stages:\n  - method: rtn\n   targets: [mlp\n", "is not valid YAML at line"),
    ("recipe without stages", ["--scheme", "uint4:g32", "--recipe", "R"], "method: rtn\n", "non-empty list 'stages'"),
]

DRIVER = r"""
import contextlib, io, json, sys
from lowbit.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["lowbit", *argv]
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            code = e.code
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_bad_recipes_get_one_line_exit_2_and_no_output(tiny_llama_dir, tmp_path):
    runs = []
    for i, (_, argv, text, _) in enumerate(BAD):
        if text is not None:
            (tmp_path / f"r{i}.yaml").write_text(text)
            argv = [a if a != "R" else str(tmp_path / f"r{i}.yaml") for a in argv]
        runs.append(["quantize", str(tiny_llama_dir), *argv, "--out", str(tmp_path / f"out{i}"), "--samples", "2",
                     "--seq-len", "16"])
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], capture_output=True, text=True, env=ENV,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    for (name, _, _, words), (code, err), i in zip(BAD, json.loads(r.stdout.splitlines()[-1]), range(len(BAD))):
        lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln]
        assert code == 2, (name, err)
        assert len(lines) == 1 and words in lines[0], (name, err)
        assert not (tmp_path / f"out{i}").exists(), name
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f"out{i}")], name  # no temporary left


@pytest.mark.parametrize("method,recipe", [("hqq+gptq", "stages:\n  - method: hqq\n  - method: gptq\n    damp: 0.5\n")])
def test_method_shorthand_and_recipe_file_give_the_same_bytes(tiny_llama_dir, tmp_path, method, recipe):
    (tmp_path / "r.yaml").write_text(recipe)
    common = ["quantize", str(tiny_llama_dir), "--scheme", "uint4_fz:g32", "--samples", "4", "--seq-len", "32"]
    runs = [[*common, "--method", method, "--damp", "0.5", "--out", str(tmp_path / "a")],
            [*common, "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "b")]]
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], capture_output=True, text=True, env=ENV,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert [c for c, _ in json.loads(r.stdout.splitlines()[-1])] == [0, 0]
    names = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert names and names == sorted(p.name for p in (tmp_path / "b").glob("*.safetensors"))
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_folder_records_its_recipe_and_redoes_it(tiny_llama_dir, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    args = ["--scheme", "uint4_fz:g32", "--samples", "2", "--seq-len", "16"]
    r = subprocess.run([sys.executable, "-m", "lowbit", "quantize", str(tiny_llama_dir), "--out", str(first), *args,
                        "--method", "hqq+gptq", "--damp", "0.5", "--no-act-order"], capture_output=True, text=True,
                       env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    made_by = json.loads((first / "lowbit.json").read_text())["made_by"]
    assert len(made_by) == 1 and made_by[0]["recipe"]["stages"][0] == {"method": "hqq"}
    assert {"method": "gptq", "damp": 0.5, "act_order": False}.items() <= made_by[0]["recipe"]["stages"][1].items()
    assert len(made_by[0]["rules"]) == 14
    r = subprocess.run([sys.executable, "-m", "lowbit", "quantize", str(tiny_llama_dir), "--out", str(again), *args,
                        "--recipe", str(first)], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    assert files(first) == files(again)
    r = subprocess.run([sys.executable, "-m", "lowbit", "inspect", str(first)], capture_output=True, text=True, env=ENV)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("made by:"))
    assert line.startswith("made by: hqq + gptq ") and "damp=0.5" in line and "act_order=False" in line
