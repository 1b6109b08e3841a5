"""PNG charts of a benchmark, drawn with matplotlib's object API (no pyplot global state).

matplotlib is an optional dependency (the `bench` extra) and is imported only here.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from tandem.bench.config import BenchError
from tandem.bench.records import RequestRecord
from tandem.bench.runner import BenchResult
from tandem.bench.stats import Summary

MISSING = ("--plot needs matplotlib, which is not installed: "
           "pip install 'tandem[bench]' (or pip install matplotlib)")
FIGSIZE = (7, 4.5)  # inches; at 120 dpi a readable 840x540 PNG
DPI = 120


def require_matplotlib() -> None:
    """Fails with a clear message before a run whose plots could not be drawn."""
    try:
        importlib.import_module("matplotlib")
    except ImportError as exc:
        raise BenchError(MISSING) from exc


def _figure():
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)  # attaches the Agg canvas: PNG output without a display
    return fig


def _prompt_len(r: RequestRecord) -> int:
    return r.prompt_tokens if r.usage_reported else r.prompt_words


def ttft_vs_prompt(result: BenchResult, path: Path) -> Path:
    """TTFT against prompt length, cold requests apart from those the server partly cached."""
    fig = _figure()
    ax = fig.add_subplot()
    ok = [r for level in result.levels for r in level.records if r.ok and r.ttft_s is not None]
    groups = (("cold", [r for r in ok if not r.cached_tokens], "tab:blue"),
              ("cached prefix", [r for r in ok if r.cached_tokens], "tab:orange"))
    for label, records, color in groups:
        if records:
            ax.scatter([_prompt_len(r) for r in records], [r.ttft_s * 1000 for r in records],
                       s=12, alpha=0.7, color=color, label=f"{label} ({len(records)})")
    usage = all(r.usage_reported for r in ok)
    ax.set_xlabel("prompt tokens" if usage else "prompt length (words, usage missing)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(f"TTFT vs prompt length: {result.config.workload}")
    if ok:
        ax.legend()
    fig.savefig(path)
    return path


def _concurrency_axis(ax, levels: list[int]) -> None:
    # Sweeps usually double the level (1,2,4,...), so a log2 axis spaces them evenly;
    # ticks at the levels themselves read better than powers of two.
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.minorticks_off()
    ax.set_xlabel("concurrency")


def throughput_vs_concurrency(result: BenchResult, summaries: list[Summary], path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    levels = [level.concurrency for level in result.levels]
    ax.plot(levels, [s.output_token_throughput for s in summaries], "o-", label="output tok/s")
    ax.plot(levels, [s.total_token_throughput for s in summaries], "s--", label="total tok/s")
    _concurrency_axis(ax, levels)
    ax.set_ylabel("tokens/s")
    right = ax.twinx()
    right.plot(levels, [s.request_throughput for s in summaries], "^:", color="tab:green",
               label="req/s")
    right.set_ylabel("requests/s")
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = right.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, loc="upper left")
    ax.set_title("throughput vs concurrency")
    fig.savefig(path)
    return path


def latency_vs_concurrency(result: BenchResult, summaries: list[Summary], path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    levels = [level.concurrency for level in result.levels]
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT")):
        for stat, style in (("p50", "o-"), ("p99", "o--")):
            values = [(getattr(s, key) or {}).get(stat) for s in summaries]
            ax.plot(levels, [v * 1000 if v is not None else float("nan") for v in values],
                    style, label=f"{name} {stat}")
    _concurrency_axis(ax, levels)
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("latency vs concurrency")
    fig.savefig(path)
    return path


def write_plots(result: BenchResult, summaries: list[Summary], out_dir: Path) -> list[Path]:
    """Writes the charts that apply (sweep charts need two or more levels); returns paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [ttft_vs_prompt(result, out_dir / "ttft_vs_prompt.png")]
    if len(result.levels) > 1:
        paths.append(throughput_vs_concurrency(result, summaries,
                                               out_dir / "throughput_vs_concurrency.png"))
        paths.append(latency_vs_concurrency(result, summaries,
                                            out_dir / "latency_vs_concurrency.png"))
    return paths
