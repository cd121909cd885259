"""bench/ table helpers: published-figure arithmetic and row keeping across partial reruns."""
from __future__ import annotations

import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))


def test_published_shares_match_hand_computation():
    import published_gptq as pub

    # LLaMA-7B, 4 bit: RTN 6.29, GPTQ 6.09, FP16 5.68 -> ln(6.29/6.09) / ln(6.29/5.68)
    assert math.isclose(pub.ppl_share(5.68, 6.29, 6.09), 0.032313 / 0.102009, rel_tol=1e-3)
    assert pub.ppl_share(5.0, 6.0, 5.0) == 1.0 and pub.ppl_share(5.0, 6.0, 6.0) == 0.0
    assert math.isclose(pub.acc_share(63.30, 62.36, 62.32), -0.04 / 0.94)
    assert pub.acc_share(65.15, 65.26, 64.91) is None  # RTN above full precision: no gap to close
    text = "\n".join(pub.lines())
    assert "| median share | | -4% |" in text  # GPTQ at W4G128 in auto-round's comparison


def test_gptq_table_keeps_rows_of_cells_it_did_not_rerun(tmp_path):
    import gptq

    cmd = "python3 bench/gptq.py --windows 16 --seq-len 512 --samples 32"
    md = tmp_path / "B.md"
    md.write_text("\n".join([
        "# Benchmarks", gptq.MARK_BEGIN, f"Reproduce: `{cmd}` (cells cached).", "",
        "| cell | calibration | bits/weight |", "|---|---|---:|",
        "| w4g64-asym/rtn | — | 4.312 |", "| w4g64-asym/gptq | pydoc 32×512 | 4.312 |", "", gptq.MARK_END, "tail"]))
    kept = gptq._kept_rows(md, cmd)
    assert kept == {"w4g64-asym/rtn": "| w4g64-asym/rtn | — | 4.312 |",
                    "w4g64-asym/gptq": "| w4g64-asym/gptq | pydoc 32×512 | 4.312 |"}
    assert gptq._kept_rows(md, cmd.replace("16", "64")) == {}  # other settings: rows are not comparable
    assert gptq._kept_rows(tmp_path / "missing.md", cmd) == {}


def test_paired_table_replaces_a_rerun_in_place_and_keeps_the_rest(tmp_path):
    import json

    import gptq_paired

    def stats(ppl):
        return {"windows": 4, "ppl": {"fp32": 10.0, "rtn": 12.0, "gptq": ppl}, "kl": {"rtn": 0.3, "gptq": 0.2},
                "gptq_minus_rtn_logppl": -0.01, "se": 0.001, "gap_closed": 0.5, "gap_closed_se": 0.01}

    result = {"scheme": "w4g128-asym", "samples": 2, "seq_len": 8, "calib": "pydoc", "damp": 1.0,
              "pydoc": stats(11.0), "prose": stats(11.5)}
    (tmp_path / "a.json").write_text(json.dumps(result))
    md = tmp_path / "B.md"
    gptq_paired.write_markdown([tmp_path / "a.json"], md)
    first = md.read_text()
    assert "| 11.00 |" in first and "| 11.50 |" in first
    # another run's rows (its json gone) stay, and a rerun of the first replaces its rows in place
    other = "| w3g128-asym | self 2×8, damp 1 | pydoc | 4 | 10.00 | 30.00 | 20.00 | x | x | x | x |"
    md.write_text(first.replace(gptq_paired.MARK_END, other + "\n" + gptq_paired.MARK_END))
    result["pydoc"] = stats(10.5)
    (tmp_path / "a.json").write_text(json.dumps(result))
    gptq_paired.write_markdown([tmp_path / "a.json"], md)
    rows = [line for line in md.read_text().splitlines() if line.startswith("| w")]
    assert len(rows) == 3 and rows[2] == other
    assert "| 10.50 |" in rows[0] and "| 11.50 |" in rows[1] and "11.00" not in md.read_text()
