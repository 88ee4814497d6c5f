"""The real server (`clipkit serve`, uvicorn on 127.0.0.1, default limits) under a hostile load: 200 connections
that never finish their headers, 16 clients uploading images as large as the server accepts, and normal
clients searching by text. The normal searches are all answered, the slow connections are closed by the
header timeout, and the server's memory stays bounded.

Every request loop is bounded in count and time, and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from test_serve_app import collection  # noqa: F401 (a fixture)
from test_serve_e2e import running_server

SLOW_CONNECTIONS = 200
UPLOADERS = 16
SEARCHERS = 4
SECONDS = 12  # longer than the default header timeout (10 s): every slow connection must have been closed
MAX_REQUESTS_PER_LOOP = 2000
# The server's resident memory may grow by at most this over its idle size: 2 decode slots x (a 16.8 MP
# decode: 50 MB of RGB, its transform) + request bodies + allocator slack. Before the limits, 8 uploads of
# a 40 MP PNG took it up by 2.3 GB.
MEMORY_BOUND_MB = 600

pytestmark = pytest.mark.slow  # 12 s of load plus the server's start


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def largest_accepted_png() -> bytes:
    """A small PNG declaring 4096 x 4096 pixels (ServeConfig's default limit): decoded, it is 50 MB of RGB."""
    out = io.BytesIO()
    Image.new("1", (4096, 4096)).save(out, format="PNG")
    return out.getvalue()


async def slow_connection(port: int, until: float, closed: list[float]) -> None:
    """Opens a connection, sends part of a request's headers, then one more header byte a second, never the
    end; when the server closes it, notes after how long and opens another."""
    while time.monotonic() < until:
        opened = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.2)
            continue
        try:
            writer.write(b"POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            while time.monotonic() < until:
                try:
                    data = await asyncio.wait_for(reader.read(1024), 1.0)
                except asyncio.TimeoutError:
                    writer.write(b"a")
                    await writer.drain()
                    continue
                if not data:  # closed by the server
                    closed.append(time.monotonic() - opened)
                    break
        except OSError:
            closed.append(time.monotonic() - opened)
        finally:
            writer.close()


async def uploader(client: httpx.AsyncClient, upload: bytes, until: float, statuses: list[int]) -> None:
    for _ in range(MAX_REQUESTS_PER_LOOP):
        if time.monotonic() >= until:
            return
        try:
            response = await client.post(
                "/v1/search/image", files={"image": ("big.png", upload)}, data={"k": "3"}
            )
        except httpx.HTTPError:
            statuses.append(-1)
            continue
        statuses.append(response.status_code)
        if response.status_code == 503:
            await asyncio.sleep(0.05)


async def searcher(client: httpx.AsyncClient, seed: int, until: float, answers: list) -> None:
    for i in range(MAX_REQUESTS_PER_LOOP):
        if time.monotonic() >= until:
            return
        start = time.perf_counter()
        try:
            response = await client.post("/v1/search", json={"query": f"caption {(seed + i) % 24}", "k": 5})
            answers.append((response.status_code, time.perf_counter() - start))
        except httpx.HTTPError as e:
            answers.append((repr(e), time.perf_counter() - start))


async def sample_memory(pid: int, until: float, samples: list[float]) -> None:
    while time.monotonic() < until:
        samples.append(rss_mb(pid))
        await asyncio.sleep(0.1)


def test_text_searches_are_answered_and_memory_bounded_under_slow_connections_and_large_uploads(
    collection,  # noqa: F811
    tmp_path,
):
    with running_server(collection["root"] / "index", tmp_path / "server.log", "--log-level", "warning") as (process, base_url):
        port = int(base_url.rsplit(":", 1)[1])
        upload = largest_accepted_png()

        async def load():
            closed: list[float] = []
            uploads: list[int] = []
            answers: list = []
            memory: list[float] = []
            limits = httpx.Limits(max_connections=64, keepalive_expiry=2)
            async with (
                httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as uploads_client,
                httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as search_client,
            ):
                await search_client.post("/v1/search", json={"query": "warm up", "k": 5})
                idle = rss_mb(process.pid)
                until = time.monotonic() + SECONDS
                await asyncio.gather(
                    *(slow_connection(port, until, closed) for _ in range(SLOW_CONNECTIONS)),
                    *(uploader(uploads_client, upload, until, uploads) for _ in range(UPLOADERS)),
                    *(searcher(search_client, seed, until, answers) for seed in range(SEARCHERS)),
                    sample_memory(process.pid, until, memory),
                )
            return idle, closed, uploads, answers, memory

        idle, closed, uploads, answers, memory = asyncio.run(load())
        assert process.poll() is None, "the server stopped under load"
    failed = [status for status, _ in answers if status != 200]
    assert answers and not failed, (len(failed), failed[:5], (tmp_path / "server.log").read_text()[-3000:])
    latencies = np.array([seconds for _, seconds in answers]) * 1000
    # Each slow connection was closed by the server's header timeout (10 s), none sooner than it.
    assert len(closed) >= SLOW_CONNECTIONS and min(closed) >= 9.5, sorted(closed)[:5]
    # The uploads were decoded a few at a time: the rest were told to come back (503), none failed otherwise.
    assert set(uploads) <= {200, 503} and uploads.count(200) >= 2, sorted(set(uploads))
    growth = max(memory) - idle
    figures = {
        "searches": len(answers),
        "search_p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "search_p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "uploads_200": uploads.count(200),
        "uploads_503": uploads.count(503),
        "slow_connections_closed": len(closed),
        "idle_rss_mb": round(idle),
        "peak_rss_mb": round(max(memory)),
        "rss_growth_mb": round(growth),
    }
    print(json.dumps(figures))
    assert growth < MEMORY_BOUND_MB, figures
