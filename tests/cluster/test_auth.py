"""API keys (``cluster.auth``): loading, constant-time checking, and the ASGI gate."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cluster.auth import PUBLIC_PATHS, ApiKeyAuth, ApiKeys, AuthConfigError, load_api_keys


def test_keys_from_file_and_env(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# team A\nsk-alpha\n\n  sk-beta  \n")
    keys = load_api_keys(str(f), "MY_KEYS", {"MY_KEYS": "sk-gamma, sk-delta,"})
    assert len(keys) == 4
    assert all(keys.allows(k) for k in ("sk-alpha", "sk-beta", "sk-gamma", "sk-delta"))
    assert not keys.allows("sk-alph") and not keys.allows("sk-alpha ") and not keys.allows(None)
    assert not keys.allows("# team A")


def test_no_keys_means_open_and_a_broken_source_refuses_to_start(tmp_path: Path) -> None:
    assert not load_api_keys(None, "UNSET_VAR", {}).enabled
    assert ApiKeys().allows(None)
    with pytest.raises(AuthConfigError, match="cannot read"):
        load_api_keys(str(tmp_path / "missing"), None, {})
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(AuthConfigError, match="holds no key"):
        load_api_keys(str(empty), None, {})


def _client(keys: ApiKeys) -> TestClient:
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/v1/completions")
    def completions() -> dict:
        return {"served": True}

    app.add_middleware(ApiKeyAuth, keys=lambda: keys)
    return TestClient(app)


def test_gate_refuses_missing_and_wrong_keys_without_echoing_them() -> None:
    client = _client(ApiKeys(["sk-secret-1"]))
    missing = client.post("/v1/completions")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert "Bearer" in missing.json()["error"]["message"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = client.post("/v1/completions", headers={"authorization": "Bearer sk-guess-123"})
    assert wrong.status_code == 401 and "sk-guess-123" not in wrong.text
    assert client.post("/v1/completions", headers={"authorization": "Bearer sk-secret-1"}).json() == {"served": True}
    assert client.post("/v1/completions", headers={"x-api-key": "sk-secret-1"}).status_code == 200
    assert client.post("/v1/completions", headers={"authorization": "Basic sk-secret-1"}).status_code == 401
    assert "/health" in PUBLIC_PATHS and client.get("/health").status_code == 200


def test_gate_is_transparent_without_keys() -> None:
    assert _client(ApiKeys()).post("/v1/completions").json() == {"served": True}
