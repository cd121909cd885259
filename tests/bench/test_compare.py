"""Smoke test of the side-by-side harness (bench/compare.py) on a tiny random model, lowbit's RTN only."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))


@pytest.fixture(scope="module")
def ood_text(tmp_path_factory):
    from lowbit.eval.corpus import split_pydoc

    path = tmp_path_factory.mktemp("ood") / "ood.txt"
    path.write_text(split_pydoc()[0][-20000:], encoding="utf-8")  # any other text will do for the smoke test
    return path


def _run(tiny_llama_dir, tmp_path, ood_text, *extra):
    import compare

    out, md, plots = tmp_path / "out", tmp_path / "BENCH.md", tmp_path / "plots"
    compare.main(["--model", str(tiny_llama_dir), "--tools", "lowbit", "--bits", "4,8", "--only", "lowbit:rtn-w4g64*",
                  "--windows", "2", "--seq-len", "32", "--samples", "2", "--decode-tokens", "4",
                  "--ood", str(ood_text), "--out-dir", str(out), "--markdown", str(md), "--plot-dir", str(plots),
                  *extra])
    return out / tiny_llama_dir.name, md, plots / f"compare-{tiny_llama_dir.name}.png"


@pytest.fixture(scope="module")
def finished(tiny_llama_dir, tmp_path_factory, ood_text):
    """One harness run shared by the tests: (tmp folder, model root, markdown, plot)."""
    tmp = tmp_path_factory.mktemp("compare")
    return (tmp, *_run(tiny_llama_dir, tmp, ood_text))


def test_harness_writes_table_and_plot(tiny_llama_dir, finished):
    _, root, md, png = finished
    text = md.read_text()
    assert f"<!-- compare:{tiny_llama_dir.name}:begin -->" in text and "### 4-bit" in text
    assert "### 8-bit" not in text  # --only kept the w4g64 RTN cells
    best_part, runs_part = text.split("Every run:")
    rows = [ln for ln in runs_part.splitlines() if ln.startswith("| lowbit |") or ln.startswith("| fp32")]
    assert [r.split("|")[2].strip() for r in rows] == ["fp32", "RTN w4g64 sym", "RTN w4g64 asym", "RTN w4g64 float zero",
                                                     "RTN w4g64 signed scale"]
    # "Each tool's best": lowbit's row is its run with the lowest out-of-domain perplexity
    best = [ln.split("|") for ln in best_part.splitlines() if ln.startswith("| lowbit |")]
    assert len(best) == 1
    by_ood = {r.split("|")[2].strip(): float(r.split("|")[8]) for r in rows[1:]}
    assert best[0][2].strip() == min(by_ood, key=by_ood.get)
    assert float(best[0][4]) == pytest.approx(min(by_ood.values()), abs=1e-3)
    for row in rows:  # every numeric column filled: ppl, KL, seconds, RSS, decode speed
        cols = [c.strip() for c in row.strip("|").split("|")]
        assert len(cols) == 12 and "–" not in cols[5:], row
        assert "ood.txt ppl" in text and float(cols[5]) > 1.0 and float(cols[11]) > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.relative_to(md.parent)})" in text

    cells = sorted((root / "cells").glob("*.json"))
    assert len(cells) == 5
    results = [json.loads(p.read_text()) for p in cells]
    fp32 = next(r for r in results if r["tool"] == "fp32")
    assert fp32["pydoc"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference against itself
    for r in results:
        if r["tool"] == "lowbit":
            assert r["prose"]["kl"] > 0 and r["bpw"] < 5 and r["decode_tokens"] == 4
            assert r["windows_sha256"] == fp32["windows_sha256"]  # every tool saw the same windows


def test_harness_resumes_finished_cells(tiny_llama_dir, finished, ood_text, monkeypatch):
    tmp, root, _, _ = finished
    before = {p: p.read_bytes() for p in (root / "cells").glob("*.json")}
    import compare

    def fail(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(compare, "run_cell", fail)
    _run(tiny_llama_dir, tmp, ood_text)
    assert {p: p.read_bytes() for p in (root / "cells").glob("*.json")} == before


def test_missing_peer_is_recorded(tiny_llama_dir, tmp_path, ood_text, monkeypatch):
    import compare

    monkeypatch.setattr(compare, "VENVS", tmp_path / "no-venvs")
    out, md = tmp_path / "out", tmp_path / "BENCH.md"
    compare.main(["--model", str(tiny_llama_dir), "--tools", "hqq", "--bits", "4", "--windows", "2", "--seq-len", "32",
                  "--samples", "2", "--decode-tokens", "4", "--ood", str(ood_text), "--out-dir", str(out),
                  "--markdown", str(md), "--plot-dir", str(tmp_path / "plots")])
    assert "| HQQ | 4-bit g64 | **failed**: not installed: run bench/peers/setup.sh hqq |" in md.read_text()


def _cell(folder: Path, key: str, nll: dict[str, list[float]], sha: str = "s") -> None:
    body = {c: {"window_nll": v, "tokens": 10 * len(v), "ppl": 1.0, "kl": 0.0} for c, v in nll.items()}
    (folder / (key.replace(":", "__", 1) + "-w4-l32-n2-d4.json")).write_text(
        json.dumps({"key": key, "windows_sha256": {"pydoc": sha}, **body}))


def test_compare_paired_against_a_hand_computed_interval(tmp_path, capsys):
    """A − B per token on 4 windows of 10 tokens: differences 0.1, 0.2, 0.3, 0.2 (pydoc), mean 0.2,
    sd 0.0816, t(0.975, 3) = 3.182: 0.2 ± 0.1299, B better; prose differs by 0 ± 0: level."""
    import compare_paired

    _cell(tmp_path, "lowbit:a", {"pydoc": [11.0, 12.0, 13.0, 12.0], "prose": [5.0, 5.0, 5.0, 5.0]})
    _cell(tmp_path, "peer:b", {"pydoc": [10.0, 10.0, 10.0, 10.0], "prose": [5.0, 5.0, 5.0, 5.0]})
    compare_paired.main(["lowbit:a", "peer:b", "--cells-dir", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("pydoc: log ppl A − B +0.2000 ± 0.1299 (95%, 4 windows)") and out[0].endswith("B better")
    assert out[1].endswith("level")
    _cell(tmp_path, "peer:c", {"pydoc": [1.0] * 4, "prose": [1.0] * 4}, sha="other")
    with pytest.raises(SystemExit, match="different windows"):
        compare_paired.main(["lowbit:a", "peer:c", "--cells-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="no finished cell 'peer:x'.*finished: lowbit:a, peer:b, peer:c"):
        compare_paired.main(["lowbit:a", "peer:x", "--cells-dir", str(tmp_path)])
