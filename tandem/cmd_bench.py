"""`tandem bench`: benchmark any OpenAI-compatible server (see tandem/bench/)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tandem.bench.config import WORKLOADS, BenchConfig, parse_concurrency, parse_slo
from tandem.bench.main import bench_main
from tandem.logs import setup_logging

log = logging.getLogger(__name__)


def _add_target(p: argparse.ArgumentParser, d: BenchConfig) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--base-url", default=d.base_url, help="server root (default %(default)s)")
    g.add_argument("--model", help="model id (default: the first one GET /v1/models lists)")
    g.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--endpoint", choices=["chat", "completions"], default=d.endpoint,
                   help="/v1/chat/completions (default) or /v1/completions")
    g.add_argument("--timeout-s", type=float, default=d.timeout_s,
                   help="cap on one request, seconds (default %(default)s)")


def _add_workload(p: argparse.ArgumentParser, d: BenchConfig) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=WORKLOADS, default=d.workload,
                   help="default %(default)s")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="same seed, same prompts; concurrency level i uses seed + i "
                   "(default %(default)s)")
    g.add_argument("--input-len", type=int, default=d.input_len,
                   help="mean words per prompt (random) or per question (default %(default)s)")
    g.add_argument("--output-len", type=int, default=d.output_len,
                   help="mean max_tokens per request (default %(default)s)")
    g.add_argument("--range-ratio", type=float, default=d.range_ratio,
                   help="lengths uniform in mean*(1-r)..mean*(1+r) (default 0: fixed)")
    g.add_argument("--max-tokens", type=int, help="fixed max_tokens, overrides --output-len")
    g.add_argument("--prefix-len", type=int, default=d.prefix_len,
                   help="words of each session's system/document prefix (default %(default)s)")
    g.add_argument("--num-users", type=int, default=d.num_users,
                   help="sessions, for shared-prefix/multi-turn (default %(default)s)")
    g.add_argument("--turns", type=int, default=d.turns,
                   help="requests per session (default %(default)s)")
    g.add_argument("--temperature", type=float, default=d.temperature,
                   help="default %(default)s")
    g.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos (a vLLM/tandem extension some peers reject)")


def _add_load(p: argparse.ArgumentParser, d: BenchConfig) -> None:
    g = p.add_argument_group("load and bounds")
    g.add_argument("--num-requests", type=int, default=d.num_requests,
                   help="at most this many requests per level (default %(default)s)")
    g.add_argument("--max-duration-s", type=float, default=d.max_duration_s,
                   help="no new request after this many seconds per level (default %(default)s)")
    g.add_argument("--concurrency", default="1",
                   help="max requests in flight; a list like 1,4,16 runs each level in turn")
    g.add_argument("--request-rate", type=float,
                   help="Poisson arrivals per second of sessions (default: all at once)")
    g.add_argument("--slo", help="goodput targets in seconds, e.g. ttft=0.5,tpot=0.05")


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark an OpenAI-compatible server",
                       description=__doc__)
    defaults = BenchConfig()
    _add_target(p, defaults)
    _add_workload(p, defaults)
    _add_load(p, defaults)
    g = p.add_argument_group("output")
    g.add_argument("--output-json", type=Path, help="write config, summaries and every request")
    g.add_argument("--plot", type=Path, metavar="DIR", help="write PNG charts (needs matplotlib)")
    g.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Raises ValueError for a malformed --concurrency or --slo."""
    return BenchConfig(
        base_url=args.base_url.rstrip("/"), model=args.model, api_key=args.api_key,
        endpoint=args.endpoint, workload=args.workload, seed=args.seed,
        num_requests=args.num_requests, max_duration_s=args.max_duration_s,
        concurrency=parse_concurrency(args.concurrency), request_rate=args.request_rate,
        input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
        max_tokens=args.max_tokens, prefix_len=args.prefix_len, num_users=args.num_users,
        turns=args.turns, temperature=args.temperature, ignore_eos=args.ignore_eos,
        timeout_s=args.timeout_s, slo=parse_slo(args.slo),
    )


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, role="bench")
    # httpx logs every request at INFO; a benchmark sends thousands.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    return bench_main(cfg, args.output_json, args.plot)
