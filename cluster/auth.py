"""Optional API keys for the ingress: no valid key, no service (401 in the surface's error shape).

Keys come from a file (one per line, ``#`` comments) and/or an environment variable
(comma-separated), never from the serving config itself: the config travels as Serve
deployment args (visible in Ray's dashboard and in a RayService manifest), a key must not.
With no key configured, auth is off and every request is anonymous.

Keys are kept only as SHA-256 digests and compared with ``hmac.compare_digest`` against
*every* configured key, so the time an answer takes says nothing about how much of a key
was right or which key matched. A key is never logged or echoed in an error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.error_shapes import render_error
from cluster.tenancy import GOOGLE_PATH_PREFIX, api_key_from_headers, google_api_key
from cluster.wire import INVALID_API_KEY, ApiError

# Paths anyone may call: liveness for load balancers, and the API's own description.
PUBLIC_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class AuthConfigError(ValueError):
    """The configured key source cannot be read (the replica refuses to start open)."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The set of valid keys, as digests."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests = tuple({_digest(k) for k in keys if k})

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def allows(self, key: str | None) -> bool:
        """Whether ``key`` is valid (always True when auth is off). Constant time per key."""
        if not self._digests:
            return True
        digest = _digest(key or "")
        ok = False
        for known in self._digests:  # no early exit: every key is compared, match or not
            ok |= hmac.compare_digest(digest, known)
        return ok and key is not None


def _keys_in_file(path: str) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise AuthConfigError(f"auth.api_keys_file: cannot read {path}: {e.strerror}") from e
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def load_api_keys(keys_file: str | None, keys_env: str | None, environ: Mapping[str, str] | None = None) -> ApiKeys:
    """Keys from ``keys_file`` and the environment variable named ``keys_env`` (either may be None)."""
    env = os.environ if environ is None else environ
    keys = _keys_in_file(keys_file) if keys_file else []
    if keys_env and env.get(keys_env):
        keys += [k.strip() for k in env[keys_env].split(",") if k.strip()]
    if keys_file and not keys:
        raise AuthConfigError(f"auth.api_keys_file: {keys_file} holds no key")
    return ApiKeys(keys)


class ApiKeyAuth:
    """ASGI middleware: refuse requests without a valid key (``Authorization: Bearer`` or
    ``x-api-key``; on Gemini's ``/v1beta/`` routes also ``x-goog-api-key`` or ``?key=``)
    before anything reads their body."""

    def __init__(self, app: ASGIApp, keys: Callable[[], ApiKeys]) -> None:
        self.app = app
        self._keys = keys  # () -> ApiKeys: the replica's config arrives after import

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys: ApiKeys = self._keys()
        if scope["type"] != "http" or not keys.enabled or scope.get("path") in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        key = api_key_from_headers(headers.get("authorization"), headers.get("x-api-key"))
        if key is None and scope.get("path", "").startswith(GOOGLE_PATH_PREFIX):
            key = google_api_key(headers.get("x-goog-api-key"), scope.get("query_string", b""))
        if keys.allows(key):
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["error_code"] = INVALID_API_KEY
        message = ("Missing API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'." if key is None
                   else "Incorrect API key provided.")
        # OpenAI calls a bad key an invalid_request_error; each surface renders it its way.
        err = ApiError(401, message, code=INVALID_API_KEY, type="invalid_request_error")
        status, shaped = render_error(scope.get("path", ""), err)
        body = json.dumps(shaped).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="kvferry"')]})
        await send({"type": "http.response.body", "body": body})
