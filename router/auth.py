"""Optional bearer-key auth, as OpenAI does it (`Authorization: Bearer <key>`), and tenants.

Each `api_keys` entry is `key` or `tenant:key`. A request's tenant names its prefix-cache
namespace: the salt sent to the workers is derived here, on the server, from the tenant
(`cache_salt`), so a client may narrow its own namespace but never reach another tenant's.

    entry "acme:sk-1"  -> tenant "acme"
    entry "sk-2"       -> tenant "key-<blake2b(sk-2), 16 hex>"  (never the key itself)
    tenant + client salt "s" -> backend salt "t:acme/s";  no client salt -> "t:acme"

Tenant names cannot contain '/', so "t:<tenant>/" is unambiguous: no client salt under one
tenant spells another tenant's salt. Without keys there are no tenants and the client's salt
passes through as-is (today's behaviour).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from router.errors import APIError

# auto_error=False: we answer in OpenAI's envelope, not FastAPI's {"detail": ...}. The scheme
# this declares in /openapi.json is kept only when keys are set (router/api/openapi_docs.py).
_bearer = HTTPBearer(auto_error=False, description="one of the router's --api-key values")

_TENANT = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")


@dataclass(frozen=True, slots=True)
class ApiKey:
    key: bytes
    tenant: str


def parse_api_keys(entries: list[str]) -> list[ApiKey]:
    """`tenant:key` or a plain `key` (its tenant is a hash of it). Raises ValueError."""
    keys = []
    for entry in entries:
        tenant, sep, key = entry.partition(":")
        if not sep:
            key = entry
            tenant = "key-" + hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
        if not key or not _TENANT.match(tenant):
            raise ValueError(
                "an api key entry is `key` or `tenant:key`, the tenant 1-64 of [A-Za-z0-9._-]"
            )
        keys.append(ApiKey(key.encode(), tenant))
    return keys


def tenant_salt(tenant: str | None, client_salt: str | None) -> str:
    """The `cache_salt` the backend sees: the tenant's namespace, narrowed by the client's."""
    if tenant is None:
        return client_salt or ""
    return f"t:{tenant}/{client_salt}" if client_salt else f"t:{tenant}"


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
) -> str | None:
    """A dependency for every protected route: the caller's tenant, or None when no keys are
    configured (then everyone may call)."""
    keys: list[ApiKey] = request.app.state.api_keys  # router/app.py, parsed once
    if not keys:
        return None
    if credentials is None:
        raise _unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`."
        )
    sent = credentials.credentials.encode()
    # Compare against every key (no early exit) so timing says nothing about which matched.
    matches = [k.tenant for k in keys if secrets.compare_digest(sent, k.key)]
    if not matches:
        raise _unauthorized(f"Incorrect API key provided: {_key_hint(credentials.credentials)}.")
    return matches[0]


Tenant = Annotated[str | None, Depends(require_api_key)]
"""The caller's tenant (None without keys); also the auth check itself."""
