"""bench.saturation's stream() against a plain local HTTP server (no Ray)."""
import asyncio
import json
import time

import httpx

from bench.saturation import stream


def sse(*events: dict) -> bytes:
    """A chunked text/event-stream answer carrying `events`, then [DONE]."""
    body = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")


async def served(answer: bytes, client: httpx.AsyncClient) -> tuple[list, float]:
    """stream()'s marks from a server that answers `answer` to one request, and when the server read the request."""
    read_at = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        read_at.append(time.perf_counter())
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, client:
        marks = await stream(client, f"http://127.0.0.1:{port}", "m", [1, 2, 3], 2)
    return marks, read_at[0]


def test_the_first_mark_is_when_the_request_went_out_not_when_the_client_began_building_it():
    """The first mark was taken before httpx built and queued the request (~0.5 ms of client CPU on the 2-core box),
    which bench.single_mesh counted as the stack's TTFT overhead. httpx runs a request event hook after it built
    the request and before it writes it: the first mark must come after the hook, and before the server read it."""
    hooked = []

    async def hook(request: httpx.Request) -> None:
        hooked.append(time.perf_counter())

    usage = {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1}
    answer = sse({"choices": [{"text": "a"}], "usage": usage},
                 {"choices": [{"text": "b"}], "usage": {**usage, "total_tokens": 5, "completion_tokens": 2}})
    marks, read_at = asyncio.run(served(answer, httpx.AsyncClient(event_hooks={"request": [hook]})))
    assert [n for _, n in marks] == [0, 1, 2]
    assert hooked[0] < marks[0][0] < read_at < marks[1][0]


def test_a_chunk_that_brings_no_new_tokens_is_no_mark():
    """The stream's last chunk carries only the usage (include_usage) with the completion tokens of the one before it:
    marked, it would end the stream, and the steady window, later than its last token, and add a gap no token had."""
    usage = {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1}
    done = {**usage, "total_tokens": 5, "completion_tokens": 2}
    answer = sse({"choices": [{"text": "a"}], "usage": usage}, {"choices": [{"text": "b"}], "usage": done},
                 {"choices": [], "usage": done})
    marks, _ = asyncio.run(served(answer, httpx.AsyncClient()))
    assert [n for _, n in marks] == [0, 1, 2]
