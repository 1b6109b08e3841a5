"""Optional bearer-key auth, as OpenAI does it (`Authorization: Bearer <key>`)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from router.errors import APIError

# auto_error=False: we answer in OpenAI's envelope, not FastAPI's {"detail": ...}. Declaring the
# scheme still puts `bearer` security into /openapi.json.
_bearer = HTTPBearer(auto_error=False, description="one of the router's --api-key values")


def _unauthorized(message: str) -> APIError:
    return APIError(
        401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
    )


def _key_hint(key: str) -> str:
    """Never echo a whole key back: enough to recognise which one was sent."""
    return key[:3] + "*" * 4 + key[-2:] if len(key) > 8 else "*" * 4


def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """A dependency for every protected route; a no-op when no keys are configured."""
    keys: list[str] = request.app.state.tandem.settings.api_keys
    if not keys:
        return
    if credentials is None:
        raise _unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`."
        )
    sent = credentials.credentials.encode()
    # Compare against every key (no early exit) so timing says nothing about which matched.
    matches = [secrets.compare_digest(sent, k.encode()) for k in keys]
    if not any(matches):
        raise _unauthorized(f"Incorrect API key provided: {_key_hint(credentials.credentials)}.")


ApiKey = Annotated[None, Depends(require_api_key)]
