"""GET /v1/models, /v1/models/{model}, and the liveness probe /health."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from router.api.openapi_docs import error_responses
from router.auth import require_api_key
from router.deps import State
from router.model_info import ServedModel
from router.protocol.models import HealthStatus, ModelCard, ModelList

router = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)])
health_router = APIRouter(tags=["ops"])


def _card(model: ServedModel) -> ModelCard:
    return ModelCard(
        id=model.name, created=model.created, root=model.root, max_model_len=model.max_model_len
    )


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
async def list_models(state: State) -> ModelList:
    return ModelList(data=[_card(m) for m in state.models.values()])


@router.get("/v1/models/{model:path}", response_model=ModelCard,
            responses=error_responses(401, 404))
async def get_model(model: str, state: State) -> ModelCard:
    return _card(state.model(model))


@health_router.get("/health", response_model=HealthStatus)
async def health() -> HealthStatus:
    """Liveness only: 200 while the process serves HTTP (readiness is /ready). No auth."""
    return HealthStatus()
