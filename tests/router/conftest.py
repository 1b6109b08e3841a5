"""Router fixtures: the real SmolLM2 tokenizer as a ServedModel, a FakeBackend, app factories."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from engine.registry import DEFAULT_MODEL
from router.app import create_app
from router.model_info import ServedModel, load_served_model
from router.settings import RouterSettings
from tests.router.fake_backend import FakeBackend

MODEL = DEFAULT_MODEL
MAX_MODEL_LEN = 512  # small, so context-length tests need small prompts


@pytest.fixture(scope="session")
def served_model(default_folder) -> ServedModel:
    return load_served_model(str(default_folder), served_name=MODEL, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="session")
def tokenizer(served_model):
    return served_model.tokenizer


@pytest.fixture
def fake(served_model) -> FakeBackend:
    return FakeBackend(served_model.tokenizer)


@pytest.fixture
def make_app(served_model) -> Callable[..., FastAPI]:
    def build(backend: FakeBackend, **settings) -> FastAPI:
        # _env_file=None: a developer's .env must not change what the tests see.
        config = RouterSettings(_env_file=None, **settings)
        return create_app(config, backend, models=[served_model])

    return build


@pytest.fixture
def client(make_app, fake) -> Iterator[TestClient]:
    with TestClient(make_app(fake), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
