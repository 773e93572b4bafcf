"""A folder of Zarr stores served over HTTP on 127.0.0.1, as a bucket would serve them: for the tests and the benchmarks
that read stores by URL (``tests/test_cloud.py``, ``bench/loader.py --url``) without a network.

The server runs in its own process (its work never takes the reader's GIL): a bare HTTP/1.1 protocol on an asyncio
event loop, since it shares the machine's cores with the reader it measures and a web framework's per-request work
showed in the loader benchmark (aiohttp: ~11 ms of server CPU per 181x360 sample of 24 chunks). Connections are kept
alive; each file is read once and answered from memory; GET (whole files or one byte range: 206, or 416 outside the
file) and HEAD; the per-request ``delay_s`` (a bucket's latency) is a timer on the loop, so waiting costs no CPU and no
thread. ``status`` answers every request with that HTTP error (a private bucket: 401/403). Only files are served (no
directory listings); anything else is a 404, as in a bucket.

    with StoreServer("/data", delay_s=0.02) as server:
        WB2Store(server.url("era5.zarr"), channels)
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

from fcn3_lightning.memory import keep_freed_memory

_REASONS = {200: "OK", 206: "Partial Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}
_REASONS |= {405: "Method Not Allowed", 416: "Range Not Satisfiable"}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class _Files:
    """The files under ``root``, read once each; None for anything that is not a file inside it."""

    def __init__(self, root: str):
        self.base = Path(root).resolve()
        self.cache: dict[str, bytes | None] = {}

    def get(self, target: str) -> bytes | None:
        name = unquote(urlsplit(target).path).lstrip("/")
        if name not in self.cache:
            path = (self.base / name).resolve()
            self.cache[name] = path.read_bytes() if path.is_relative_to(self.base) and path.is_file() else None
        return self.cache[name]


def _answer(files: _Files, status: int | None, method: str, target: str, headers: dict[str, str]) -> bytes:
    """The whole HTTP response to one request."""

    def response(code: int, body: bytes, extra: str = "", length: int | None = None) -> bytes:
        head = f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}\r\nContent-Length: {len(body) if length is None else length}\r\n"
        head += f"Content-Type: application/octet-stream\r\nAccept-Ranges: bytes\r\n{extra}\r\n"
        return head.encode() + (b"" if method == "HEAD" else body)

    if status:
        return response(status, f"HTTP {status}\n".encode())
    if method not in ("GET", "HEAD"):
        return response(405, b"")
    body = files.get(target)
    if body is None:
        return response(404, b"not found\n")
    want = headers.get("range")
    if want is None:
        return response(200, body)
    m = _RANGE.match(want.strip())
    size = len(body)
    if m is None or m.groups() == ("", ""):
        return response(416, b"", f"Content-Range: bytes */{size}\r\n")
    first, last = m.groups()
    if first == "":  # the last N bytes
        start, stop = max(0, size - int(last)), size
    else:
        start, stop = int(first), size if last == "" else min(size, int(last) + 1)
    if start >= size or start >= stop:
        return response(416, b"", f"Content-Range: bytes */{size}\r\n")
    return response(206, body[start:stop], f"Content-Range: bytes {start}-{stop - 1}/{size}\r\n")


class _Http(asyncio.Protocol):
    """One kept-alive connection: requests (no bodies, as GET and HEAD have none) answered in order after the delay."""

    def __init__(self, files: _Files, delay_s: float, status: int | None):
        self.files, self.delay_s, self.status = files, delay_s, status
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split()
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            if len(parts) != 3:
                self._send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", close=True)
                return
            reply = _answer(self.files, self.status, parts[0], parts[1], headers)
            close = headers.get("connection", "").lower() == "close"
            if self.delay_s:
                asyncio.get_running_loop().call_later(self.delay_s, self._send, reply, close)
            else:
                self._send(reply, close)

    def _send(self, reply: bytes, close: bool = False) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply)
            if close:
                self.transport.close()


def _serve(root: str, delay_s: float, status: int | None, ready: multiprocessing.Queue) -> None:
    """The server process: bind a free port on 127.0.0.1, report it on ``ready``, serve until terminated."""
    keep_freed_memory()  # every answer is a fresh buffer of a chunk's size: keep them in the heap (no page-fault churn)
    files = _Files(root)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        # a deep listen backlog: a loader opens many connections at once
        server = await loop.create_server(lambda: _Http(files, delay_s, status), "127.0.0.1", 0, backlog=1024)
        ready.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


class StoreServer:
    """Serve the files under ``root`` on 127.0.0.1 from a separate process; ``url(name)`` is a file's URL."""

    def __init__(self, root: str | os.PathLike, *, delay_s: float = 0.0, status: int | None = None, start_timeout_s: float = 60.0):
        ctx = multiprocessing.get_context("spawn")  # no fork of the caller's threads and event loops
        ready = ctx.Queue()
        self.process = ctx.Process(target=_serve, args=(str(root), float(delay_s), status, ready), daemon=True)
        self.process.start()
        try:
            self.port: int = ready.get(timeout=start_timeout_s)
        except Exception as e:
            self.close()
            why = f"exit code {self.process.exitcode}"
            raise RuntimeError(f"the HTTP server for {root} did not start within {start_timeout_s:g} s ({why})") from e

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(10)

    def __enter__(self) -> StoreServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
