"""Tables, lowbit/peer ratios and the Pareto plot of a side-by-side run (``bench/compare.py``)."""
from __future__ import annotations

import os
from pathlib import Path

from common import write_section
from compare_cells import TOOL_NAMES, Cell

MIB = 1 << 20


def _f(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _calibration(r: dict, meta: dict) -> str:
    if r["tool"] == "fp32" or not r.get("calibrated"):
        return "none"
    return f"{meta.get('samples', '?')}×{meta.get('seq_len', '?')} pydoc"


def table(rows: list[tuple[Cell, dict]], meta: dict) -> list[str]:
    """One Markdown table: a row per cell, refusals and failures included with the tool's error."""
    ood = meta.get("ood", "prose")
    lines = [f"| tool | method | calibration | bits/weight | size MB | pydoc ppl | pydoc KL | {ood} ppl | {ood} KL "
             "| quantize s | peak RSS MiB | decode tok/s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cell, r in rows:
        name = TOOL_NAMES.get(cell.tool, cell.tool)
        if "error" in r:
            error = r["error"].replace("`", "'").replace("|", "/").replace("\n", " ")
            if len(error) > 160:  # the whole message stays in the cell's JSON
                error = error[:157].rstrip() + "..."
            lines.append(f"| {name} | {cell.method} | **failed**: {error} |" + " |" * 9)
            continue
        size = None if r.get("size_bytes") is None else r["size_bytes"] / 1e6
        method = cell.method if r.get("sparsity") is None else f"{cell.method} (measured sparsity {r['sparsity']:.4f})"
        lines.append(
            f"| {name} | {method} | {_calibration({**r, 'calibrated': cell.calibrated}, meta)} "
            f"| {_f(r.get('bpw'), '.3f')} | {_f(size, '.1f')} "
            f"| {r['pydoc']['ppl']:.3f} | {r['pydoc']['kl']:.4f} | {r['prose']['ppl']:.3f} | {r['prose']['kl']:.4f} "
            f"| {r['quantize_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['decode_tok_s']:.1f} |")
    return lines


def ratios(rows: list[tuple[Cell, dict]], results: dict) -> list[str]:
    """lowbit ÷ peer for each peer cell that ran and whose lowbit pair ran, from the same run."""
    lines = ["| peer | lowbit pair | pydoc ppl | prose ppl | prose KL | quantize s | peak RSS | decode tok/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    n = 0
    for cell, r in rows:
        if cell.pair is None or "error" in r or "error" in results.get(cell.pair, {"error": 1}):
            continue
        lb = results[cell.pair]

        def q(path: tuple[str, ...]) -> str:
            a, b = lb, r
            for k in path:
                a, b = a[k], b[k]
            return f"{a / b:.3f}" if b else "–"

        lines.append(f"| {TOOL_NAMES[cell.tool]} {cell.method} | {lb['method']} | {q(('pydoc', 'ppl'))} "
                     f"| {q(('prose', 'ppl'))} | {q(('prose', 'kl'))} | {q(('quantize_seconds',))} "
                     f"| {q(('peak_rss_mb',))} | {q(('decode_tok_s',))} |")
        n += 1
    return lines if n else []


def best_per_tool(rows: list[tuple[Cell, dict]], ood: str) -> list[str]:
    """Each tool's best run of a bit width by out-of-domain perplexity: where lowbit stands at a glance."""
    best: dict[str, tuple[Cell, dict]] = {}
    for cell, r in rows:
        if "error" not in r and (cell.tool not in best or r["prose"]["ppl"] < best[cell.tool][1]["prose"]["ppl"]):
            best[cell.tool] = (cell, r)
    lines = [f"| tool | its best method (by {ood} ppl) | bits/weight | {ood} ppl | pydoc ppl |", "|---|---|---:|---:|---:|"]
    for cell, r in sorted(best.values(), key=lambda cr: cr[1]["prose"]["ppl"]):
        lines.append(f"| {TOOL_NAMES.get(cell.tool, cell.tool)} | {cell.method} | {_f(r.get('bpw'), '.3f')} "
                     f"| {r['prose']['ppl']:.3f} | {r['pydoc']['ppl']:.3f} |")
    return lines


def pareto_plot(results: list[dict], fp32: dict | None, path: Path, title: str) -> Path:
    """bits/weight against perplexity, one panel per corpus, the lower-left frontier drawn; PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in results if "error" not in r and r["tool"] != "fp32" and r.get("bpw")]
    tools = sorted({r["tool"] for r in points}, key=lambda t: (t != "lowbit", t))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    markers = "o^sDvP*Xh"
    for ax, corpus in zip(axes, ("pydoc", "prose")):
        for i, tool in enumerate(tools):
            mine = [r for r in points if r["tool"] == tool]
            ax.scatter([r["bpw"] for r in mine], [r[corpus]["ppl"] for r in mine], label=TOOL_NAMES.get(tool, tool),
                       marker=markers[i % len(markers)], s=60 if tool == "lowbit" else 40, zorder=3)
        front, best = [], float("inf")
        for r in sorted(points, key=lambda r: (r["bpw"], r[corpus]["ppl"])):
            if r[corpus]["ppl"] < best:
                best = r[corpus]["ppl"]
                front.append((r["bpw"], best))
        if front:
            ax.step(*zip(*front), where="post", color="grey", lw=1, ls="--", label="Pareto frontier", zorder=2)
        if fp32:
            ax.axhline(fp32[corpus]["ppl"], color="black", lw=0.8, label="fp32")
        ax.set_yscale("log")
        plain = matplotlib.ticker.FormatStrFormatter("%.3g")  # 18.2, not 1.82×10¹
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("bits per weight (stored)")
        ax.set_ylabel(f"{corpus} perplexity (log scale)")
        ax.set_title(f"{title}: {corpus}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100, metadata={"Software": None})  # no version stamp: same numbers, same bytes
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(cells: list[Cell], results: dict, *, key: str, command: str, machine: str, markdown: Path,
                 plot_dir: Path, work_meta: dict, title: str | None = None) -> None:
    """The model's section of ``markdown``: a table and ratios per bit width, and the Pareto plot."""
    import torch

    fp32 = results.get(cells[0].key) if cells and cells[0].tool == "fp32" else None
    plot = pareto_plot(list(results.values()), fp32, plot_dir / f"compare-{key}.png", key)
    link = os.path.relpath(plot, markdown.parent)
    meta = work_meta
    begin, end = f"<!-- compare:{key}:begin -->", f"<!-- compare:{key}:end -->"
    lines = [begin, title or f"## Side by side on {key}: lowbit and the peer toolkits", "",
             f"Reproduce: `{command}` (cells cached in `bench/out/compare/{key}/cells/`; `--fresh` recomputes; "
             "peers need `bench/peers/setup.sh TOOL` first).",
             f"Every tool ran in its own environment on the same fp32 folder, and was scored by the same code "
             f"(`bench/peers/peer_eval.py`) on {meta.get('windows', '?')} windows of {meta.get('seq_len', '?')} tokens "
             f"of the pydoc evaluation half and of {meta.get('ood', '?')} (out of domain), against the same fp32 "
             f"log-probabilities. Calibrated methods used the same {meta.get('samples', '?')} pydoc windows. "
             "Quantize seconds: the tool's quantization call alone. Peak RSS: the runner's own high-water mark "
             "(VmHWM) after loading, quantizing and saving. Size: the tool's own saved folder. Decode: greedy, "
             f"{meta.get('decode_tokens', '?')} new tokens after a 32-token prompt, the live quantized model "
             f"(prefill included), median of 3 timed runs after a warm-up. Machine: {machine}, torch {torch.__version__}.", "",
             f"![bits per weight against perplexity]({link})", ""]
    by_table: dict[str, list[tuple[Cell, dict]]] = {}
    for cell in cells:
        if cell.tool != "fp32" and cell.key in results:
            by_table.setdefault(cell.table, []).append((cell, results[cell.key]))
    for bits, rows in by_table.items():
        head = [(cells[0], fp32)] if fp32 else []
        lines += [f"### {bits}", "", "Each tool's best:", ""] + best_per_tool(rows, meta.get("ood", "prose")) + [""]
        lines += ["Every run:", ""] + table(head + rows, meta) + [""]
        ratio = ratios(rows, results)
        if ratio:
            lines += [f"lowbit ÷ peer, {bits}, same run (below 1 is lowbit lower: better for perplexity, KL, "
                      "seconds and memory; above 1 is lowbit faster for decode):", ""] + ratio + [""]
    notes = [f"- {TOOL_NAMES.get(c.tool, c.tool)} {c.method}: {c.note}." for c in cells if c.note and c.key in results]
    if notes:
        lines += ["Notes:", ""] + notes + [""]
    lines.append(end)
    write_section(markdown, begin, end, lines)
