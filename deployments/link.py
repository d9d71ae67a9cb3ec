"""A direct TCP connection between two replicas: the token data path, off Serve's request path.

Measured on the 2-core box (DESIGN.md, "Data path at scale"): a message through a Serve handle stream costs
the router ~1-3 ms of CPU (Serve's request routing, Ray's task and object machinery on both ends), so at one
message per mesh step the router saturated near two real-time Galaxies. A length-prefixed pickle over a
socket costs tens of microseconds. Serve still places, restarts and health-checks the replicas, and carries
the control calls (reset, stats); the peer's address comes from such a call, so a restarted replica is
found again the same way. Like vLLM's engine-core sockets (ZMQ there, plain asyncio streams here: one
socket per pair, no broker).

Frames are a 4-byte big-endian length and a pickle. Pickle runs code on load, so a connection must open
with the listener's secret (16 random bytes, handed out only through the Serve control call); anything else
is dropped before a frame is read.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import pickle
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("ray.serve")

_LEN = struct.Struct(">I")
SECRET_BYTES = 16


@dataclass(frozen=True)
class LinkAddress:
    host: str
    port: int
    secret: bytes


class Link:
    """One end of a connection: `send` queues a frame without waiting; `recv` returns the next object.
    recv raises ConnectionError (EOFError included) when the peer is gone."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer

    def send(self, obj) -> None:
        """Queue one frame. Raises ConnectionError once the connection is closed."""
        if self._writer.is_closing():
            raise ConnectionError("link closed")
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_LEN.pack(len(data)) + data)

    @property
    def backlog_bytes(self) -> int:
        """Bytes sent but not yet taken by the peer's socket."""
        return self._writer.transport.get_write_buffer_size()

    async def recv(self):
        try:
            (n,) = _LEN.unpack(await self._reader.readexactly(_LEN.size))
            data = await self._reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError("link closed by the peer") from exc
        return pickle.loads(data)

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        """Close now, dropping what the peer has not taken (close() would wait for it to drain)."""
        self._writer.transport.abort()

    @property
    def closed(self) -> bool:
        return self._writer.is_closing()


async def connect(address: LinkAddress, timeout_s: float = 10.0) -> Link:
    """Open a link to a LinkServer. Raises OSError / asyncio.TimeoutError when it cannot be reached."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address.host, address.port), timeout_s)
    _no_delay(writer)
    writer.write(address.secret)
    return Link(reader, writer)


class LinkServer:
    """Accepts links on the host's address (port chosen by the OS) and runs `handler` for each one that
    opens with the secret; the link is closed when the handler returns."""

    def __init__(self, handler: Callable[[Link], Awaitable[None]]):
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self.address: LinkAddress | None = None
        self._starting = asyncio.Lock()

    async def start(self, host: str) -> LinkAddress:
        """Listen on `host` (the node's IP: the peer may be on another node) once; returns the address.
        Concurrent callers (several ingress replicas starting) all get the one address."""
        async with self._starting:
            if self.address is None:
                secret = os.urandom(SECRET_BYTES)
                self._server = await asyncio.start_server(self._accept, host, 0)
                port = self._server.sockets[0].getsockname()[1]
                self.address = LinkAddress(host, port, secret)
            return self.address

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        link = Link(reader, writer)
        try:
            secret = await asyncio.wait_for(reader.readexactly(SECRET_BYTES), 10.0)
            if self.address is None or not hmac.compare_digest(secret, self.address.secret):
                return
            _no_delay(writer)
            await self._handler(link)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.CancelledError):
            pass  # the peer left, or this server closed: the connection's end, nothing to report
        except Exception:  # a frame the handler cannot take: this connection ends, the server goes on
            log.exception("link from %s dropped", writer.get_extra_info("peername"))
        finally:
            self._tasks.discard(task)
            link.close()

    def close(self) -> None:
        """Stop listening and end every open link's handler; a later start() listens anew."""
        if self._server is not None:
            self._server.close()
        self._server, self.address = None, None
        for task in list(self._tasks):
            task.cancel()


def _no_delay(writer: asyncio.StreamWriter) -> None:
    """Small frames leave at once (no Nagle delay): a token waits for nothing but its flush. A peer whose
    node died or was cut off sends no FIN: keepalive probes (after 5 s idle, every 2 s, 3 of them) and a
    15 s limit on unacknowledged data end the link instead of the kernel's ~15 minute retransmission."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", 15000)):
        if hasattr(socket, option):  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def node_ip() -> str:
    """This node's IP as Ray knows it (what a peer on another node reaches), else loopback outside Ray."""
    try:
        import ray
        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"
