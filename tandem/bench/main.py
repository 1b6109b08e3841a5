"""Entry point behind `tandem bench`: run, then write the markdown, JSON and charts."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from tandem.bench import report
from tandem.bench.config import BenchConfig, BenchError
from tandem.bench.runner import run_benchmark

log = logging.getLogger(__name__)


def bench_main(cfg: BenchConfig, output_json: Path | None, plot_dir: Path | None) -> int:
    """Returns the exit status: 0 if any request succeeded, 1 if none did, 2 for user errors."""
    try:
        cfg.validate()
        if plot_dir is not None:
            from tandem.bench.plot import require_matplotlib

            require_matplotlib()  # before the run, not after minutes of benchmarking
        result = asyncio.run(run_benchmark(cfg))
    except (BenchError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    summaries = [report.summarize_level(level, cfg.slo) for level in result.levels]
    print(report.markdown(result, summaries))
    if output_json is not None:
        report.write_json(output_json, report.document(result, summaries))
        log.info("wrote %s", output_json)
    if plot_dir is not None:
        from tandem.bench.plot import write_plots

        for path in write_plots(result, summaries, plot_dir):
            log.info("wrote %s", path)
    if not any(s.completed for s in summaries):
        log.error("no request succeeded")
        return 1
    return 0
