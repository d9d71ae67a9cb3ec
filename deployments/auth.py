"""API keys: who may call (compared so that neither timing nor odd bytes in the header give anything away),
and tenants: each key its own prefix cache."""
from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.errors import APIError


def _unauthorized() -> APIError:
    """OpenAI's 401: type invalid_request_error, code invalid_api_key (its SDKs raise AuthenticationError on the
    status)."""
    return APIError(401, "Missing or wrong API key (send `Authorization: Bearer <key>`).", code="invalid_api_key")


class ApiKeys:
    """The configured bearer keys. A request's key is hashed and its fixed-length digest compared with every
    key's in constant time, so the comparison leaks neither a key's length nor where it differs, and any
    bytes a client sends (non-ASCII too) are just a wrong key: a 401, never a 500."""

    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def check(self, authorization: str) -> bytes:
        """The request's key, as the bytes the client sent; 401 unless it is one of the keys. RFC 6750 2.1 allows
        several spaces after the scheme ("Bearer" 1*SP b64token); a configured key never begins with one."""
        scheme, _, key = authorization.partition(" ")
        raw = key.lstrip(" ").encode("latin-1")  # Starlette decodes header bytes as Latin-1: this gives them back
        digest = hashlib.sha256(raw).digest()
        match = False
        for known in self._digests:  # every key, whichever matches
            match |= hmac.compare_digest(digest, known)
        if scheme.lower() != "bearer" or not match:
            raise _unauthorized()
        return raw


class KeyCheck:
    """ASGI middleware: every path but `open_paths` needs one of the keys, checked before the body is read, so
    a client without a key gets a 401 whatever it sends (a malformed body too), as OpenAI and vLLM answer.
    The key the client sent is left in the request's state (`request.state.api_key`) for its tenant salt.
    A path is matched as the routes match it, below the app's root_path: Serve mounts an app with a
    route_prefix there ("/llm/health" with root_path "/llm"), where /health must stay open to probes."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, open_paths: frozenset[str]):
        self.app = app
        self.keys = keys
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _route_path(scope) in self.open_paths:
            return await self.app(scope, receive, send)
        # one header: with two, which one a proxy checked and which names the tenant would be up to each reader
        values = [value for name, value in scope["headers"] if name == b"authorization"]
        try:
            if len(values) > 1:
                raise _unauthorized()
            key = self.keys.check(values[0].decode("latin-1") if values else "")
        except APIError as exc:
            return await exc.response()(scope, receive, send)
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)


def tenant_salt(key: bytes, cache_salt: str | None) -> str:
    """The prefix-cache salt of a request made with `key`: a keyed hash (HMAC-SHA256) of the client's own
    `cache_salt` under the key. Requests share cached KV blocks only with the same key and cache_salt, so a
    tenant's `cached_tokens` reveal only its own prefixes; the router never sees the key, and every ingress
    replica derives the same salt."""
    message = b"meshserve prefix cache\0" + (b"\1" + cache_salt.encode() if cache_salt is not None else b"\0")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _route_path(scope: Scope) -> str:
    """The path as the routes match it: below the app's root_path, as Starlette's router cuts it (its own
    get_route_path is private)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path
