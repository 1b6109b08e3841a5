"""The prefill worker's FastAPI app."""

from __future__ import annotations

from fastapi import FastAPI

from prefill_worker.service import routes
from worker.app import create_worker_app
from worker.settings import WorkerSettings


def create_app(settings: WorkerSettings) -> FastAPI:
    return create_worker_app(settings.model_copy(update={"role": "prefill"}), routes)
