"""`clipkit serve` (default limits, 127.0.0.1) under a hostile load: connections that never finish their
headers, clients uploading the largest image the server accepts, and normal clients searching by text.
Reports the text searches' latency (p50, p99) and failures, what became of the uploads and the slow
connections, and the server's resident memory (idle, peak) read from /proc.

The load: `--slow` connections each send part of a request's headers and then one header byte a second,
reopening when the server closes them; `--uploaders` clients each post a PNG declaring 4096 x 4096 pixels
(ServeConfig's default limit: 50 MB of RGB once decoded) back to back; `--searchers` clients each send
text searches back to back. Every loop is bounded by `--seconds` and a request count, and talks to
127.0.0.1 only. tests/test_serve_hostile.py runs the same load and asserts on it.

    python scripts/bench_serve_hostile.py --out bench_serve_hostile.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_report  # noqa: E402
from bench_serve import build_served_index, start_server, stop_server  # noqa: E402 (this checkout's src/)

MAX_REQUESTS_PER_LOOP = 2000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def largest_accepted_png(side: int = 4096) -> bytes:
    """A small PNG declaring side x side pixels (blank 1-bit pixels compress to almost nothing)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, format="PNG")
    return out.getvalue()


async def slow_connection(port: int, until: float, closed: list[float]) -> None:
    """Part of a request's headers, then one more header byte a second, never the end; when the server
    closes the connection, notes after how long and opens another."""
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


async def uploader(client, upload: bytes, until: float, statuses: list) -> None:
    import httpx

    for _ in range(MAX_REQUESTS_PER_LOOP):
        if time.monotonic() >= until:
            return
        try:
            response = await client.post(
                "/v1/search/image", files={"image": ("big.png", upload)}, data={"k": "3"}
            )
        except httpx.HTTPError as e:
            statuses.append(repr(e))
            continue
        statuses.append(response.status_code)
        if response.status_code == 503:
            await asyncio.sleep(0.05)


async def searcher(client, queries: list[str], until: float, answers: list) -> None:
    import httpx

    for i in range(MAX_REQUESTS_PER_LOOP):
        if time.monotonic() >= until:
            return
        start = time.perf_counter()
        try:
            response = await client.post("/v1/search", json={"query": queries[i % len(queries)], "k": 5})
            answers.append((response.status_code, time.perf_counter() - start))
        except httpx.HTTPError as e:
            answers.append((repr(e), time.perf_counter() - start))


async def sample_memory(pid: int, until: float, samples: list[float]) -> None:
    while time.monotonic() < until:
        samples.append(rss_mb(pid))
        await asyncio.sleep(0.1)


async def hostile_load(
    base_url: str, pid: int, *, seconds: float, slow: int, uploaders: int, searchers: int, queries: list[str]
) -> dict:
    """Runs the load for `seconds` against the server at `base_url` (process `pid`); raw observations."""
    import httpx

    port = int(base_url.rsplit(":", 1)[1])
    upload = largest_accepted_png()
    closed: list[float] = []
    uploads: list = []
    answers: list = []
    memory: list[float] = []
    limits = httpx.Limits(max_connections=64, keepalive_expiry=2)
    async with (
        httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as uploads_client,
        httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as search_client,
    ):
        await search_client.post("/v1/search", json={"query": "warm up", "k": 5})
        idle = rss_mb(pid)
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(slow_connection(port, until, closed) for _ in range(slow)),
            *(uploader(uploads_client, upload, until, uploads) for _ in range(uploaders)),
            *(searcher(search_client, queries[i:] + queries[:i], until, answers) for i in range(searchers)),
            sample_memory(pid, until, memory),
        )
    return {"idle_rss_mb": idle, "closed": closed, "uploads": uploads, "answers": answers, "memory": memory}


def summary(observed: dict) -> dict:
    """The figures of a `hostile_load` run."""
    latencies = np.array([seconds for _, seconds in observed["answers"]]) * 1000
    statuses = [status for status, _ in observed["answers"]]
    uploads = observed["uploads"]
    return {
        "searches": len(statuses),
        "searches_failed": sum(status != 200 for status in statuses),
        "search_p50_ms": round(float(np.percentile(latencies, 50)), 1) if len(latencies) else None,
        "search_p99_ms": round(float(np.percentile(latencies, 99)), 1) if len(latencies) else None,
        "uploads_200": uploads.count(200),
        "uploads_503": uploads.count(503),
        "uploads_other": len(uploads) - uploads.count(200) - uploads.count(503),
        "slow_connections_closed": len(observed["closed"]),
        "slow_connection_shortest_life_s": round(min(observed["closed"]), 1) if observed["closed"] else None,
        "idle_rss_mb": round(observed["idle_rss_mb"]),
        "peak_rss_mb": round(max(observed["memory"])),
        "rss_growth_mb": round(max(observed["memory"]) - observed["idle_rss_mb"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="ViT-B-32", help="open_clip architecture or conf/model name (random weights)"
    )
    parser.add_argument("--images", type=int, default=64, help="images in the served index")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the load runs")
    parser.add_argument("--slow", type=int, default=200, help="connections that never finish their headers")
    parser.add_argument("--uploaders", type=int, default=16, help="clients uploading large images")
    parser.add_argument("--searchers", type=int, default=4, help="clients searching by text")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args()
    import torch

    report = {
        "benchmark": "clipkit serve under slow connections, large uploads and text searches",
        "command": "python scripts/bench_serve_hostile.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "uvicorn": metadata.version("uvicorn"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {k: v for k, v in vars(args).items() if k != "out"},
    }
    with tempfile.TemporaryDirectory(prefix="bench_serve_hostile.") as tmp:
        index = build_served_index(Path(tmp), args.model, args.images)
        process, base_url = start_server(index, Path(tmp) / "server.log")
        try:
            import httpx

            for _ in range(600):  # the start message comes just before uvicorn answers
                try:
                    if httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            queries = [f"a photo number {i}" for i in range(64)]
            observed = asyncio.run(
                hostile_load(
                    base_url,
                    process.pid,
                    seconds=args.seconds,
                    slow=args.slow,
                    uploaders=args.uploaders,
                    searchers=args.searchers,
                    queries=queries,
                )  # fmt: skip
            )
            report["server_alive"] = process.poll() is None
        finally:
            stop_server(process)
    report["figures"] = summary(observed)
    print(write_report(report, args.out))


if __name__ == "__main__":
    main()
