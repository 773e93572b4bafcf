"""A folder of Zarr stores served over HTTP on 127.0.0.1, as a bucket would serve them: for the tests and the benchmarks
that read stores by URL (``tests/test_cloud.py``, ``bench/loader.py --url``) without a network.

The server runs in its own process (its work never takes the reader's GIL) on an asyncio event loop (aiohttp): files
go out with ``sendfile`` over kept-alive connections, and the per-request ``delay_s`` (a bucket's latency) is an
``asyncio.sleep``, so waiting costs no CPU and no thread. ``status`` answers every request with that HTTP error (a
private bucket: 401/403). Only files are served (no directory listings); anything else is a 404, as in a bucket.

    with StoreServer("/data", delay_s=0.02) as server:
        WB2Store(server.url("era5.zarr"), channels)
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from pathlib import Path
from types import TracebackType

from fcn3_lightning.memory import keep_freed_memory


def _serve(root: str, delay_s: float, status: int | None, ready: multiprocessing.Queue) -> None:
    """The server process: bind a free port on 127.0.0.1, report it on ``ready``, serve until terminated."""
    from aiohttp import web

    base = Path(root).resolve()
    keep_freed_memory()  # every answer is a fresh buffer of a chunk's size: keep them in the heap (no page-fault churn)

    async def handle(request: web.Request) -> web.StreamResponse:
        if status:
            return web.Response(status=status, text=f"HTTP {status}\n")
        if delay_s:
            await asyncio.sleep(delay_s)
        path = (base / request.match_info["path"]).resolve()
        if not path.is_relative_to(base) or not path.is_file():
            raise web.HTTPNotFound()
        if "Range" in request.headers:
            return web.FileResponse(path)  # partial reads (206, 416) as a bucket answers them
        # a whole file from the page cache in one write: half the CPU of FileResponse's executor hops and sendfile here
        return web.Response(body=path.read_bytes(), content_type="application/octet-stream")

    async def main() -> None:
        app = web.Application()
        app.router.add_route("GET", "/{path:.*}", handle)  # GET routes answer HEAD too
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        # a deep listen backlog: a loader opens many connections at once
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        ready.put(runner.addresses[0][1])
        await asyncio.Event().wait()

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
