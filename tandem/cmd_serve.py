"""`tandem serve` (the whole stack) and `tandem router|prefill|decode` (one service each)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from typing import Annotated, Any

import uvicorn
from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from engine.registry import DEFAULT_MODEL
from router.settings import RouterSettings, split_list
from tandem.flags import add_settings_args, settings_from_args
from tandem.logs import setup_logging
from tandem.supervisor import Child, Supervisor, child_argv
from wire.settings import TandemSettings
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class ServeSettings(TandemSettings):
    """Fields of `tandem serve` itself; the router's and workers' fields pass through."""

    model: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_MODEL],
        description="a model to serve; repeat the flag (or comma-separate) to serve several, "
        "each with its own workers",
    )
    port: int = Field(8000, description="router port")
    host: str = Field("127.0.0.1", description="router bind address")
    prefill_workers: int = 1
    decode_workers: int = 1
    colocated: bool = Field(False, description="one worker does prefill and decode (no handoff)")

    @field_validator("model", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_list(value)


def register(sub) -> None:
    p = sub.add_parser("serve", help="run router + prefill + decode workers as one stack")
    add_settings_args(p, ServeSettings)
    add_settings_args(p, RouterSettings, skip=set(ServeSettings.model_fields))
    skip = set(ServeSettings.model_fields) | set(RouterSettings.model_fields) | {"role"}
    add_settings_args(p, WorkerSettings, skip=skip)
    p.set_defaults(func=run_serve)

    r = sub.add_parser("router", help="run the OpenAI-compatible router")
    add_settings_args(r, RouterSettings)
    r.set_defaults(func=run_router)
    for role in ("prefill", "decode"):
        w = sub.add_parser(role, help=f"run one {role} worker")
        add_settings_args(w, WorkerSettings, skip={"role"})
        w.set_defaults(func=run_worker, role=role)


def _serve_app(app, host: str, port: int, level: str) -> None:
    uvicorn.run(app, host=host, port=port, log_config=None, log_level=level.lower(),
                timeout_graceful_shutdown=10)


def run_router(args: argparse.Namespace) -> int:
    from router.service import build_router_app

    settings = settings_from_args(RouterSettings, args)
    setup_logging(settings.log_level, "router", settings.log_format)
    _serve_app(build_router_app(settings), settings.host, settings.port, settings.log_level)
    return 0


def run_worker(args: argparse.Namespace) -> int:
    settings = settings_from_args(WorkerSettings, args)
    setup_logging(settings.log_level, settings.role, settings.log_format)
    if settings.role == "prefill":
        from prefill_worker.app import create_app
    else:
        from decode_worker.app import create_app
    _serve_app(create_app(settings), settings.host, settings.port, settings.log_level)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _given(args: argparse.Namespace, cls, skip: set[str]) -> dict:
    return {k: v for k, v in vars(args).items()
            if k in cls.model_fields and k not in skip and v is not None}


def _threads_per_model(models: int) -> int:
    """Each model's workers get an equal share of the cores. Every torch process otherwise
    starts one OpenMP thread per core, and two models busy at once then fight over every core:
    measured on 2 vCPUs (scripts/bench_dag.py, docs/BENCHMARKS.md), a DAG over two models ran
    1.56x slower than the same nodes sent one by one; with one thread per model, 0.49x."""
    cores = len(os.sched_getaffinity(0))
    return max(1, cores // models)


def run_serve(args: argparse.Namespace) -> int:
    serve = settings_from_args(ServeSettings, args)
    setup_logging(serve.log_level, "serve", serve.log_format)
    worker_flags = _given(args, WorkerSettings, {"host", "port", "role", "model"})
    if len(serve.model) > 1 and "torch_threads" not in worker_flags:
        worker_flags["torch_threads"] = _threads_per_model(len(serve.model))
    router_flags = _given(args, RouterSettings, {"host", "port", "prefill_urls", "decode_urls",
                                                 "model"})
    n_prefill = 0 if serve.colocated else serve.prefill_workers
    children, urls = [], {"prefill": [], "decode": []}
    for k, model in enumerate(serve.model):
        for role, count in (("prefill", n_prefill), ("decode", serve.decode_workers)):
            for i in range(count):
                port = free_port()
                urls[role].append(f"http://127.0.0.1:{port}")
                argv = child_argv(role, {**worker_flags, "model": model, "port": port})
                name = f"{role}-{i}" if len(serve.model) == 1 else f"{role}-{k}.{i}"
                children.append(Child(name, argv, {}))
    router_argv = child_argv("router", {
        **router_flags, "model": serve.model, "host": serve.host, "port": serve.port,
        "prefill_urls": ",".join(urls["prefill"]), "decode_urls": ",".join(urls["decode"]),
    })
    children.append(Child("router", router_argv, {}))
    log.info("serving %s on http://%s:%d (%d prefill, %d decode%s per model)",
             ", ".join(serve.model), serve.host, serve.port, n_prefill, serve.decode_workers,
             ", colocated" if serve.colocated else "")
    return Supervisor(children).run()
