"""Tenants: the backend's cache_salt is derived from the API key's tenant, so no client can
reach (or measure) another tenant's prefix cache; cached_tokens can be hidden."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from router.auth import parse_api_keys, tenant_salt
from tests.router.fake_backend import CACHED_TOKENS
from tests.router.helpers import chat, cmpl

KEYS = ["acme:sk-acme", "globex:sk-globex", "sk-plain"]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_tenants_with_the_same_prompt_and_salt_get_different_backend_salts(make_app, fake):
    with TestClient(make_app(fake, api_keys=KEYS)) as c:
        for key in ("sk-acme", "sk-globex", "sk-plain"):
            assert c.post("/v1/completions", json=cmpl(cache_salt="s"),
                          headers=_auth(key)).status_code == 200
            assert c.post("/v1/chat/completions", json=chat(), headers=_auth(key)).status_code \
                == 200
    salts = [r.cache_salt for r in fake.requests]
    assert salts[:4] == ["t:acme/s", "t:acme", "t:globex/s", "t:globex"]
    plain = salts[4]
    assert plain.startswith("t:key-") and plain.endswith("/s") and "sk-plain" not in plain
    assert len(set(salts)) == len(salts)


_TENANTS = st.from_regex(r"[A-Za-z0-9._\-]{1,64}", fullmatch=True)
_SALTS = st.one_of(st.none(), st.text(max_size=256))


@settings(max_examples=300, deadline=None)
@given(_TENANTS, _TENANTS, _SALTS, _SALTS)
def test_a_client_salt_cannot_spell_another_tenants_salt(a, b, salt_a, salt_b):
    if a != b:
        assert tenant_salt(a, salt_a) != tenant_salt(b, salt_b)


def test_tenant_names_cannot_hold_the_separator():
    for bad in ("acme/x:sk-1", "acme:", ":sk-1", "a b:sk-1"):
        with pytest.raises(ValueError):
            parse_api_keys([bad])


def test_plain_keys_get_a_hashed_tenant_and_keep_working():
    [plain, named] = parse_api_keys(["sk-plain", "acme:sk-acme"])
    assert plain.key == b"sk-plain" and plain.tenant.startswith("key-")
    assert "sk-plain" not in plain.tenant
    assert plain.tenant == parse_api_keys(["sk-plain"])[0].tenant  # stable: same namespace
    assert (named.key, named.tenant) == (b"sk-acme", "acme")


def test_without_keys_the_client_salt_passes_through(client, fake):
    assert client.post("/v1/completions", json=cmpl(cache_salt="mine")).status_code == 200
    assert client.post("/v1/completions", json=cmpl()).status_code == 200
    assert [r.cache_salt for r in fake.requests] == ["mine", ""]


@pytest.mark.parametrize("report", [True, False])
def test_report_cached_tokens(make_app, fake, report):
    expected = CACHED_TOKENS if report else 0
    with TestClient(make_app(fake, report_cached_tokens=report)) as c:
        for path, body in (("/v1/completions", cmpl()), ("/v1/chat/completions", chat())):
            usage = c.post(path, json=body).json()["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] == expected
            streamed = c.post(path, json={**body, "stream": True,
                                          "stream_options": {"include_usage": True}})
            assert f'"cached_tokens":{expected}' in streamed.text.replace(" ", "")
