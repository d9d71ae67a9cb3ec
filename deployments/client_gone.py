"""A client that left is no failure of the app.

Under ASGI spec 2.4 a send to a client that left raises OSError (https://asgi.readthedocs.io/en/latest/specs/www.html,
"Response Body"; Starlette's streams turn it into ClientDisconnect). Raised out of the app, it reached the app's
handler of errors as a failed request: an ERROR with a traceback per client gone, whether its answer was a stream's
chunk, a whole answer or a 429. Under 2.3 (uvicorn, Serve's proxy) the server drops such sends and nothing is raised.
"""
from __future__ import annotations

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ClientGone:
    """ASGI middleware, outermost: under spec 2.4, the OSError a send raised, or the ClientDisconnect Starlette
    raises for it, ends the response quietly. Anything else still raises, an OSError after the client left too (a
    timeout is one). Under 2.3 the app is called as it is: nothing is added to a chunk's send."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _spec_version(scope) < (2, 4):
            await self.app(scope, receive, send)
            return
        gone: OSError | None = None  # what a send raised

        async def noted_send(message: Message) -> None:
            nonlocal gone
            try:
                await send(message)
            except OSError as exc:
                gone = exc
                raise

        try:
            await self.app(scope, receive, noted_send)
        except (OSError, ClientDisconnect) as exc:
            if gone is None or (exc is not gone and exc.__context__ is not gone):
                raise


def _spec_version(scope: Scope) -> tuple[int, ...]:
    """The scope's ASGI HTTP spec version ("2.0" when not given; one that is not numbers: as 2.0)."""
    try:
        return tuple(int(part) for part in scope.get("asgi", {}).get("spec_version", "2.0").split("."))
    except ValueError:
        return (2, 0)
