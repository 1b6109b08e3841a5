"""The prefill worker's FastAPI app."""

from __future__ import annotations

from fastapi import FastAPI

from prefill_worker.service import routes
from tandem.worker_base import create_worker_app
from tandem.worker_settings import WorkerSettings


def create_app(settings: WorkerSettings) -> FastAPI:
    return create_worker_app(settings.model_copy(update={"role": "prefill"}), routes)
