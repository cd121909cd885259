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
