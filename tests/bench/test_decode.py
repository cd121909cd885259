"""Smoke test of bench/decode.py on a tiny random Llama: the worker, the cells and the report."""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))


def test_decode_cells_and_report(tiny_llama_dir, tmp_path):
    import decode

    import lowbit
    from lowbit.hf.load import load_model

    loaded = load_model(tiny_llama_dir)
    lowbit.quantize(loaded.model, "int4:g32", progress=False)
    q = tmp_path / "q"
    lowbit.save(loaded.model, q, tokenizer=loaded.tokenizer)
    prompt = [1, 2, 3, 4]
    rows = [decode.run_cell("tiny", "fp32", tiny_llama_dir, prompt, 4, 1),
            decode.run_cell("tiny", "lowbit int4 g128", q, prompt, 4, 1)]
    for row in rows:
        assert "error" not in row, row
        assert row["tokens"] == 4 and row["tok_s"] > 0 and row["tensor_mb"] > 0
    assert rows[1]["kernels"] == {"int4": 14}
    assert 3.9 < decode.bits_per_weight(q) < 4.6  # 4-bit codes plus an fp16 scale per 32
    lines = decode.report({"tiny": rows}, 4)
    table = [line for line in lines if line.startswith("| lowbit int4 g128")]
    assert table and "int4 14" in table[0]
    assert lines[0] == "<!-- decode:begin -->" and lines[-1] == "<!-- decode:end -->"
    png = decode.speed_plot({"tiny": rows}, tmp_path / "decode.png")
    assert png.stat().st_size > 1000
