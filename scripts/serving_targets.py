"""The servers scripts/bench_serving.py compares, as child processes on free loopback ports.

    tandem serve [--colocated] [--no-prefix-cache]    ready: GET /ready
    tandem router (a second router over running workers)
    transformers serve [--continuous-batching] FOLDER  ready: GET /health (the peer)
    python -m llama_cpp.server --model GGUF            ready: GET /v1/models (llama.cpp)

Each runs in its own session (process group) with its log in the work folder, and is stopped
with SIGTERM to the group, then SIGKILL. The peer is quirky: GET /v1/models fails offline, it
accepts only the folder path as `model`, rejects `ignore_eos`, and its first request with
--continuous-batching takes tens of seconds (cache set-up), so callers warm it up first.
llama-cpp-python's server lives in its own venv (it is built from source, with -march=native),
silently ignores `ignore_eos`, and sends no `usage` when streaming. By default a new request
interrupts the one running (its stream ends early, empty, as a success); this target turns
that off, so the server queues requests and serves them one at a time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from engine.device import dtype_name, resolve_dtype
from engine.registry import DEFAULT_MODEL


# `auto`: bf16 on a CPU with native bf16 (avx512_bf16/amx), else fp32 (bf16 matmuls have no fast
# kernel on AVX2: ~70x slower). Every target of one run gets the same dtype.
def default_dtype() -> str:
    return dtype_name(resolve_dtype("auto", torch.device("cpu")))


# --compile-decode compiles as the decode worker starts: 5.5 min with an empty inductor cache on
# a 2-vCPU Xeon (avx512f, 2026-12-07), against ~1 min for any other start.
READY_TIMEOUT_S = 900.0
# llama-cpp-python[server] is installed apart from tandem's venv (its build must not touch ours).
LLAMACPP_PYTHON_ENV = "LLAMACPP_PYTHON"
LLAMACPP_PYTHON_DEFAULT = "/work/llama-venv/bin/python"
LLAMACPP_CTX = 4096  # tokens: room for any benchmark prompt plus its answer
STOP_GRACE_S = 30.0


def cpu_flags() -> list[str]:
    """The CPU features every benchmark header names (native bf16 or not decides the dtype)."""
    text = Path("/proc/cpuinfo").read_text()
    return sorted(f for f in ("avx512_bf16", "amx_bf16", "avx2") if f in text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    model: str  # what requests must send as `model`
    ready_path: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None  # another checkout to serve from (its code, not this one's)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> Server:
        """Spawn it; with wait, block until it is ready (else call wait_ready later, so that
        several servers load their models at once)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env}, cwd=self.cwd)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); "
                                   f"see {self.log_path}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {READY_TIMEOUT_S:.0f} s; "
                           f"see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def tandem_serve(name: str, workdir: Path, kv_dir: Path, *flags: str, dtype: str) -> Server:
    """`tandem serve` (1 prefill + 1 decode unless flags say otherwise) on a fresh port."""
    port = free_port()
    argv = [sys.executable, "-m", "tandem.cli", "serve", "--port", str(port), "--dtype", dtype,
            "--disk-cache-dir", str(kv_dir), *flags]
    return Server(name, argv, port, DEFAULT_MODEL, "/ready", workdir / f"{name}-{port}.log")


def tandem_router(name: str, workdir: Path, kv_dir: Path, workers: list[dict]) -> Server:
    """A second router process over another stack's workers (its own lookup store)."""
    port = free_port()
    urls = {role: ",".join(w["url"] for w in workers if w["role"] == role)
            for role in ("prefill", "decode")}
    argv = [sys.executable, "-m", "tandem.cli", "router", "--port", str(port),
            "--disk-cache-dir", str(kv_dir), "--prefill-urls", urls["prefill"],
            "--decode-urls", urls["decode"]]
    return Server(name, argv, port, DEFAULT_MODEL, "/ready", workdir / f"{name}-{port}.log")


def peer_serve(name: str, workdir: Path, folder: Path, continuous: bool, dtype: str) -> Server:
    """`transformers serve` pinned to the model folder (the `peer` extra)."""
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which(
        "transformers")
    if exe is None:
        raise RuntimeError("transformers CLI not found: pip install -e '.[peer]'")
    port = free_port()
    argv = [exe, "serve", "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
            "--device", "cpu", "--log-level", "warning",
            "--continuous-batching" if continuous else "--no-continuous-batching", str(folder)]
    # Offline: the folder is local, and the peer must not try the Hub for anything.
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return Server(name, argv, port, str(folder), "/health", workdir / f"{name}-{port}.log", env)


def llamacpp_serve(name: str, workdir: Path, gguf: Path, threads: int = 2,
                   python: str | None = None) -> Server:
    """llama-cpp-python's OpenAI server on the GGUF itself (the speed anchor for quantization).

    The interpreter is `python`, else $LLAMACPP_PYTHON, else /work/llama-venv/bin/python.
    Answers are formatted with the GGUF's own chat template (ChatML for SmolLM2).
    """
    exe = python or os.environ.get(LLAMACPP_PYTHON_ENV, LLAMACPP_PYTHON_DEFAULT)
    if not Path(exe).is_file():
        raise RuntimeError(f"llama-cpp-python interpreter {exe} not found: build it with "
                           f"`python3 -m venv /work/llama-venv && /work/llama-venv/bin/pip "
                           f"install 'llama-cpp-python[server]'`, or set {LLAMACPP_PYTHON_ENV}")
    port = free_port()
    argv = [exe, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", DEFAULT_MODEL,
            "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--n_ctx", str(LLAMACPP_CTX),
            "--interrupt_requests", "False"]
    return Server(name, argv, port, DEFAULT_MODEL, "/v1/models", workdir / f"{name}-{port}.log")
