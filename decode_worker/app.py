"""The decode worker's FastAPI app. With no prefill worker in front (--colocated) it prefills
too: /generate accepts any prompt and computes whatever the store does not hold."""

from __future__ import annotations

from fastapi import FastAPI

from decode_worker.service import routes
from worker.app import create_worker_app
from worker.settings import WorkerSettings


def create_app(settings: WorkerSettings) -> FastAPI:
    return create_worker_app(settings.model_copy(update={"role": "decode"}), routes)
