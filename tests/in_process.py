"""The whole stack in one process, without Ray: the ingress app over a real Router and in-process meshes, on an event
loop of its own, with an httpx client, so a test sends what a client sends and can look at the router meanwhile."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from deployments.ingress import build_app
from deployments.router import Router, RouterConfig
from model.backend import Backend
from tests.local_mesh import LocalMesh
from tests.test_router import FAST, until


class InProcessRouter:
    """The Router behind the RouterClient interface the ingress uses (its cancel and stats are awaited there)."""

    def __init__(self, router: Router):
        self.router = router

    def generate(self, *args, **kwargs):
        return self.router.generate(*args, **kwargs)

    async def cancel(self, request_id: str, reason: str = "abort") -> None:
        self.router.cancel(request_id, reason)

    async def stats(self, report: tuple[str, list] | None = None) -> dict:
        return self.router.stats(report)

    def link_down_s(self) -> float:
        return 0.0


class Stack:
    """The ingress over a Router of `num_meshes` LocalMeshes ("mesh-0", ...) of `make_backend`, once every mesh is up.
    `config`: RouterConfig fields over the tests' FAST ones; `grammar_tokenizer`: the meshes' (LocalMesh's)."""

    def __init__(self, tok, make_backend: Callable[[], Backend], num_meshes: int = 1,
                 grammar_tokenizer: Callable[[], object] | None = None, **config):
        self.tok = tok
        self.loop = asyncio.new_event_loop()
        self.meshes = [LocalMesh(make_backend, grammar_tokenizer) for _ in range(num_meshes)]

        async def start() -> Router:
            router = Router([(f"mesh-{i}", m) for i, m in enumerate(self.meshes)], RouterConfig(**{**FAST, **config}))
            await until(lambda: all(m["up"] for m in router.stats()["meshes"]))
            return router
        self.router = self.run(start())
        self.client = self.ingress()

    def ingress(self, **app_kwargs) -> httpx.AsyncClient:
        """A client of a new ingress app (replica) over the same router; `app_kwargs` go to build_app."""
        app = build_app(InProcessRouter(self.router), self.tok, "smollm2", **app_kwargs)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x", timeout=60)

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.run(self.client.post(path, json=body))

    def posts(self, path: str, bodies: list[dict]) -> list[httpx.Response]:
        async def together():
            return await asyncio.gather(*(self.client.post(path, json=b) for b in bodies))
        return self.run(together())

    def stats(self) -> dict:
        async def read():
            return self.router.stats()
        return self.run(read())

    def close(self) -> None:
        self.run(self.router.close())
        self.loop.close()
