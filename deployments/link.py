"""A direct TCP connection between two replicas: the token data path, off Serve's request path.

Measured on the 2-core box (docs/DESIGN.md, "Data path at scale"): a message through a Serve handle stream costs
the router ~1-3 ms of CPU (Serve's request routing, Ray's task and object machinery on both ends), so at one
message per mesh step the router saturated near two real-time Galaxies. A length-prefixed pickle over a
socket costs tens of microseconds. Serve still places, restarts and health-checks the replicas, and carries
the control calls (reset, stats); the peer's address comes from such a call, so a restarted replica is
found again the same way. Like vLLM's engine-core sockets (ZMQ there, a plain asyncio protocol here: one
socket per pair, no broker).

Frames are a 4-byte big-endian length and a pickle. Pickle runs code on load, so a connection must open
with the listener's secret (16 random bytes, handed out only through the Serve control call); anything else
is dropped before a frame is read.
"""
from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import os
import pickle
import socket
import struct
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from deployments.aio import within

log = logging.getLogger("ray.serve")

_LEN = struct.Struct(">I")
SECRET_BYTES = 16
AUTH_TIMEOUT_S = 10.0  # a connection that has not sent the secret by then is dropped


@dataclass(frozen=True)
class LinkAddress:
    host: str
    port: int
    secret: bytes


class Link(asyncio.Protocol):
    """One end of a connection: `send` queues a frame without waiting; `recv` returns the next object, or
    `dispatch` hands every frame to a callback. Both raise ConnectionError once the peer is gone.

    A protocol, not asyncio streams: frames are cut out of the bytes in the loop's read callback itself, so
    a frame taken by `dispatch` costs no task wake-up, and one awaited by `recv` one. With streams a reader
    task woke for the length and the body and handed the frame on through a queue: in a two-process
    microbenchmark on the 2-core box (uvloop, 60 frames/s, the rate one mesh's steps reach the router) the
    receiver paid 100-120 us of CPU per frame that way, 55-90 us with the protocol."""

    def __init__(self, secret: bytes | None = None, on_open: Callable[[Link], None] | None = None):
        self._secret = secret  # a listener's end: the first bytes must be this, else the link is dropped
        self._on_open = on_open  # called once the secret checked out
        self._auth_timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._frames: deque = deque()  # received, not yet taken by recv
        self._waiter: asyncio.Future | None = None  # recv's, or dispatch's (until the link ends)
        self._on_frame: Callable[[object], None] | None = None
        self._lost: BaseException | None = None

    # ---- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        _no_delay(transport.get_extra_info("socket"))
        if self._secret is not None:
            self._auth_timer = asyncio.get_running_loop().call_later(AUTH_TIMEOUT_S, self._refuse)

    def data_received(self, data: bytes) -> None:
        if self._lost is not None:  # closing: what still comes is not read
            return
        buf = self._buffer
        buf += data
        if self._secret is not None:
            if len(buf) < SECRET_BYTES:
                return
            if not hmac.compare_digest(bytes(buf[:SECRET_BYTES]), self._secret):
                return self._refuse()
            del buf[:SECRET_BYTES]
            self._secret = None
            self._auth_timer.cancel()
            self._on_open(self)
        frames, offset, size = [], 0, len(buf)
        while size - offset >= _LEN.size:
            (n,) = _LEN.unpack_from(buf, offset)
            if size - offset - _LEN.size < n:
                break
            offset += _LEN.size + n
            frames.append(buf[offset - n:offset])
        if not frames:
            return
        del buf[:offset]
        try:
            for frame in frames:
                obj = pickle.loads(frame)
                if self._on_frame is not None:
                    self._on_frame(obj)
                else:
                    self._frames.append(obj)
        except Exception as exc:  # a frame that does not load, or that the receiver cannot take: the link ends
            self._close_with(exc)
            return
        self._wake()

    def eof_received(self) -> bool:
        """The peer will send nothing more: the link's end now (not once our own writes drain)."""
        self._end(ConnectionError("link closed by the peer"))
        return False  # the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        self._end(ConnectionError("link closed by the peer") if exc is None else
                  exc if isinstance(exc, ConnectionError) else ConnectionError(f"link broke: {exc!r}"))

    def _end(self, error: BaseException) -> None:
        """The link's end, the first reason given; a reader waiting hears of it."""
        if self._lost is None:
            self._lost = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done() and (self._frames or self._lost is not None):
            self._waiter.set_result(None)

    # ---- the link --------------------------------------------------------------------------------
    def send(self, *objs) -> None:
        """Queue one frame per object, all in one write: small frames sent together reach the peer in one
        segment, so it takes them in one wake-up. Raises ConnectionError once the connection is closed."""
        if self.closed:
            raise ConnectionError("link closed")
        out = bytearray()
        for obj in objs:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            out += _LEN.pack(len(data))
            out += data
        self._transport.write(out)

    @property
    def backlog_bytes(self) -> int:
        """Bytes sent but not yet taken by the peer's socket."""
        return self._transport.get_write_buffer_size()

    async def recv(self):
        """The next frame's object, in order."""
        while not self._frames:
            await self._wait()
        return self._frames.popleft()

    async def dispatch(self, on_frame: Callable[[object], None]) -> None:
        """Call `on_frame(obj)` for every frame from now on, in order, inside the loop's read callback. Never
        returns: raises ConnectionError when the link closes, or what `on_frame` raised (the link is closed)."""
        try:
            while self._frames:  # those that came before
                on_frame(self._frames.popleft())
        except Exception as exc:
            self._close_with(exc)
            raise
        self._on_frame = on_frame
        try:
            while True:
                await self._wait()
        finally:
            self._on_frame = None

    async def _wait(self) -> None:
        """Until a frame is queued for recv; raises the link's end. One reader at a time."""
        if self._lost is None:
            if self._waiter is not None:
                raise RuntimeError("another recv or dispatch is already reading this link")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._lost is not None and not self._frames:
            if isinstance(self._lost, ConnectionError):
                raise ConnectionError(*self._lost.args) from None  # a fresh one each time: no traceback piles up
            raise self._lost

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Close now, dropping what the peer has not taken (close() would wait for it to drain)."""
        if self._transport is not None:
            self._transport.abort()

    @property
    def closed(self) -> bool:
        return self._lost is not None or self._transport is None or self._transport.is_closing()

    def _refuse(self) -> None:
        """The peer did not open with the secret (in time): drop it before a frame is read."""
        self._close_with(ConnectionError("the peer did not present the link's secret"))

    def _close_with(self, error: BaseException) -> None:
        self._end(error)
        self._transport.abort()


async def connect(address: LinkAddress, timeout_s: float = 10.0) -> Link:
    """Open a link to a LinkServer. Raises OSError / asyncio.TimeoutError when it cannot be reached."""
    loop = asyncio.get_running_loop()
    _, link = await within(loop.create_connection(Link, address.host, address.port), timeout_s)
    link._transport.write(address.secret)
    return link


class LinkServer:
    """Accepts links on the host's address (port chosen by the OS) and runs `handler` for each one that
    opens with the secret; the link is closed when the handler returns."""

    def __init__(self, handler: Callable[[Link], Awaitable[None]]):
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._links: weakref.WeakSet[Link] = weakref.WeakSet()  # every connection, the secret checked or not
        self.address: LinkAddress | None = None
        self._starting = asyncio.Lock()

    async def start(self, host: str) -> LinkAddress:
        """Listen on `host` (the node's IP: the peer may be on another node) once; returns the address.
        Concurrent callers (several ingress replicas starting) all get the one address."""
        async with self._starting:
            if self.address is None:
                secret = os.urandom(SECRET_BYTES)
                # Listening in an empty context: each connection's callbacks and tasks take the one it listened in,
                # and Serve names a log line's request by its context (the call that started this server, for good)
                self._server = await contextvars.Context().run(asyncio.ensure_future, asyncio.get_running_loop()
                                                               .create_server(lambda: self._made(secret), host, 0))
                port = self._server.sockets[0].getsockname()[1]
                self.address = LinkAddress(host, port, secret)
            return self.address

    def _made(self, secret: bytes) -> Link:
        link = Link(secret, self._open)
        self._links.add(link)
        return link

    def _open(self, link: Link) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(link))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, link: Link) -> None:
        try:
            await self._handler(link)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the peer left, or this server closed: the connection's end, nothing to report
        except Exception:  # a frame the handler cannot take: this connection ends, the server goes on
            log.exception("link from %s dropped", link._transport.get_extra_info("peername"))
        finally:
            link.close()

    def close(self) -> None:
        """Stop listening and end every open link's handler; a later start() listens anew."""
        if self._server is not None:
            self._server.close()
        self._server, self.address = None, None
        for task in list(self._tasks):
            task.cancel()
        for link in list(self._links):  # those still presenting the secret too: no handler starts for them
            link.abort()


def _no_delay(sock: socket.socket | None) -> None:
    """Small frames leave at once (no Nagle delay): a token waits for nothing but its flush. A peer whose
    node died or was cut off sends no FIN: keepalive probes (after 5 s idle, every 2 s, 3 of them) and a
    15 s limit on unacknowledged data end the link instead of the kernel's ~15 minute retransmission."""
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
