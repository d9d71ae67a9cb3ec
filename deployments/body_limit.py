"""A bound on request bodies: a client cannot make the ingress buffer and parse an unbounded body.

413 in OpenAI's error JSON, by the Content-Length header before anything is read, or while the body is
read when it comes chunked (or lies about its length). A body in a content coding (gzip) is a 415: it is not
decoded, as no bound on what it would inflate to could be kept here.
"""
from __future__ import annotations

from ray.exceptions import ActorDiedError, TaskCancelledError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import APIError


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server accepts ({limit} bytes).",
                    code="request_too_large")


def unsupported_encoding(coding: str) -> APIError:
    """RFC 9110 15.5.16: 415, Accept-Encoding naming the one coding taken."""
    return APIError(415, f"Content-Encoding {coding[:64]!r} is not supported: send the body uncompressed.",
                    code="unsupported_content_encoding", headers={"Accept-Encoding": "identity"})


class BodyTooLarge(HTTPException):
    """Raised while reading the body; FastAPI passes an HTTPException through to the app's handlers."""

    def __init__(self, limit: int):
        super().__init__(413, too_large(limit).info.message)


class BodyLimit:
    """ASGI middleware: at most `max_bytes` of request body. As it reads the body for the app, it also reports
    Serve's cancellation of a read as the disconnect it is."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # without its leading zeros, which HTTP servers pass on (httptools does): int() refuses a number of more
        # than 4,300 digits, and "000...0100" is 100
        declared = dict(scope["headers"]).get(b"content-length", b"").lstrip(b"0")
        if declared.isdigit() and (len(declared) > len(str(self.max_bytes)) or int(declared) > self.max_bytes):
            return await too_large(self.max_bytes).response()(scope, receive, send)
        coding = b", ".join(v for name, v in scope["headers"] if name == b"content-encoding").decode("latin-1")
        if any(c.strip().lower() not in ("", "identity") for c in coding.split(",")):
            return await unsupported_encoding(coding).response()(scope, receive, send)
        received, gone = 0, False

        async def limited_receive() -> Message:
            nonlocal received, gone
            try:
                message = {"type": "http.disconnect"} if gone else await receive()
            except (TaskCancelledError, ActorDiedError):  # Serve's plain proxy: the client went away, or the proxy
                # died with it (a shutdown kills it). ASGI says http.disconnect (raised, it was an ERROR with a
                # traceback per cut stream), and says it again if asked
                gone = True
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)
