"""Tables and the comparison chart of scripts/bench_serving.py's results.

`results` maps a target name to {"sweep": run, "ttft": {case: request}, "shared": run} (parts
may be missing) or {"error": message}; a run is {"doc", "result", "summaries"}.
"""

from __future__ import annotations

from pathlib import Path

from tandem.bench.plot import DPI, FIGSIZE, require_matplotlib

TTFT_CASES = ("cold", "shared prefix", "other router", "after restart")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f}"


def _levels(results: dict) -> list[int]:
    return sorted({level.concurrency for res in results.values() if "sweep" in res
                   for level in res["sweep"]["result"].levels})


def _by_level(run: dict) -> dict[int, object]:
    return {lv.concurrency: s for lv, s in zip(run["result"].levels, run["summaries"],
                                                 strict=True)}


def sweep_tables(results: dict) -> list[str]:
    levels = _levels(results)
    tput, lat = [], []
    for name, res in results.items():
        if "sweep" not in res:
            continue
        at = _by_level(res["sweep"])
        tput.append([name] + [f"{at[c].output_token_throughput:.1f}" if c in at else "-"
                              for c in levels])
        lat.append([name] + [
            f"{_ms((at[c].ttft_s or {}).get('p50'))} / {_ms((at[c].tpot_s or {}).get('p50'))}"
            if c in at else "-" for c in levels])
    head = [f"c={c}" for c in levels]
    return (["## Output throughput (tok/s) by concurrency", ""]
            + _table(["target", *head], tput)
            + ["", "## TTFT p50 / TPOT p50 (ms) by concurrency", ""]
            + _table(["target", *head], lat) + [""])


def _ttft_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if not r["ok"]:
        return f"failed: {(r['error'] or '')[:60]}"
    cached = "n/a" if r["cached_tokens"] is None else f"{r['cached_tokens']:,}"
    return f"{_ms(r['ttft_s'])} ms (cached {cached} of {r['prompt_tokens']:,})"


def ttft_table(results: dict) -> list[str]:
    rows = [[name] + [_ttft_cell(res["ttft"].get(case)) for case in TTFT_CASES]
            for name, res in results.items() if "ttft" in res]
    return (["## TTFT of a long chat prompt, then prompts sharing its prefix", ""]
            + _table(["target", *TTFT_CASES], rows) + [""])


def shared_table(results: dict) -> list[str]:
    rows = []
    for name, res in results.items():
        if "shared" not in res:
            continue
        s = res["shared"]["summaries"][0]
        share = "n/a" if s.cached_token_share is None else f"{s.cached_token_share:.0%}"
        rows.append([name, f"{s.output_token_throughput:.1f}", _ms((s.ttft_s or {}).get("p50")),
                     _ms((s.ttft_s or {}).get("p99")), share, f"{s.completed} / {s.failed}"])
    return (["## Shared-prefix workload", ""]
            + _table(["target", "out tok/s", "TTFT p50 (ms)", "TTFT p99 (ms)", "cached share",
                      "ok / failed"], rows) + [""])


def render_markdown(meta: dict, results: dict) -> str:
    sizes = meta["sizes"]
    lines = [
        "# Serving benchmark", "",
        f"`{meta['command']}`, started {meta['started_at']}: {meta['model']} in "
        f"{meta['dtype']}, {meta['cpus']} CPUs, load average "
        f"{meta['load_before'][0]:.1f} before and {meta['load_after'][0]:.1f} after."
        + (" Quick (smoke) sizes: not for comparison." if meta["quick"] else ""), "",
        f"Sweep: random chat prompts of ~{sizes['input_len']} tokens, up to "
        f"{sizes['max_tokens']} output tokens (temperature 0, no ignore_eos), at most "
        f"{sizes['num_requests']} requests or {sizes['level_s']:g} s per level. TTFT prompt: "
        f"a ~{sizes['prefix_words']}-word document plus a question. Shared prefix: "
        f"{sizes['shared_users']} users x {sizes['shared_turns']} questions on a "
        f"{sizes['shared_prefix_words']}-word document, concurrency "
        f"{sizes['shared_concurrency']}.", "",
    ]
    lines += sweep_tables(results) + ttft_table(results) + shared_table(results)
    errors = [f"- {name}: {res['error']}" for name, res in results.items() if "error" in res]
    if errors:
        lines += ["## Failed targets", "", *errors, ""]
    return "\n".join(lines)


def write_comparison_plot(results: dict, path: Path) -> Path | None:
    """Output tok/s against concurrency, one line per target."""
    runs = {name: res["sweep"] for name, res in results.items() if "sweep" in res}
    if not runs:
        return None
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)  # PNG output without pyplot's global state or a display
    ax = fig.add_subplot()
    for name, run in runs.items():
        at = _by_level(run)
        levels = sorted(at)
        ax.plot(levels, [at[c].output_token_throughput for c in levels], "o-", label=name)
    levels = _levels(results)
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.minorticks_off()
    ax.set_xlabel("concurrency")
    ax.set_ylabel("output tokens/s")
    ax.set_title("output throughput vs concurrency")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
