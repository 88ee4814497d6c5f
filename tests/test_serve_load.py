"""The real server (`clipkit serve`, uvicorn on 127.0.0.1) under 256 concurrent clients for 30 s, while
`clipkit index add` commits a new generation: only 200s and 503s, the new images served without a restart,
and a server that is ready and answering afterwards."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from clipkit.retrieval import build_index
from conftest import run_clipkit
from test_eval_datasets import encode
from test_serve_app import collection, png_bytes  # noqa: F401 (collection is a fixture)
from test_serve_e2e import running_server

CLIENTS = 256
SECONDS = 30

pytestmark = pytest.mark.slow  # 30 s of load, plus the server's start and an `index add`


async def client_loop(client: httpx.AsyncClient, seed: int, until: float, upload: bytes, seen: list) -> None:
    """Requests back to back until `until`: text searches mostly, thumbnails, image searches."""
    rng = random.Random(seed)
    while time.monotonic() < until:
        kind = rng.random()
        try:
            if kind < 0.7:
                response = await client.post(
                    "/v1/search", json={"query": f"caption {rng.randrange(24)}", "k": 10}
                )
            elif kind < 0.9:
                response = await client.get(f"/v1/images/{rng.randrange(16)}", params={"size": 128})
            else:
                response = await client.post(
                    "/v1/search/image", files={"image": ("q.png", upload)}, data={"k": "5"}
                )
        except httpx.HTTPError as e:  # a reset, refused or timed-out connection: a failure of the server
            seen.append(
                ("error", f"{e!r} on {e.request.method} {e.request.url} at {time.monotonic() - until:.1f} s")
            )
            continue
        seen.append((response.status_code, response.headers.get("retry-after")))
        if response.status_code == 503:
            await asyncio.sleep(float(response.headers.get("retry-after", 1)) * rng.random())


def test_256_clients_for_30_seconds_get_only_200s_and_503s_while_an_add_is_served(collection, tmp_path):  # noqa: F811
    root = collection["root"]
    index_dir = tmp_path / "index"
    build_index(root / "images" / "folder", index_dir, model=collection["model_dir"])  # 16 images
    args = (
        "--max-queue",
        "32",
        "--request-timeout",
        "10",
        "--reload-interval",
        "0.5",
        "--log-level",
        "warning",
    )
    with running_server(index_dir, tmp_path / "server.log", *args) as (process, base_url):

        async def load():
            seen: list = []
            # Idle connections are dropped long before the server's keep-alive (75 s) ends them, as a client
            # should: else a request sent just as the server closes an idle connection meets a reset.
            limits = httpx.Limits(
                max_connections=CLIENTS, max_keepalive_connections=CLIENTS, keepalive_expiry=2
            )
            async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:
                until = time.monotonic() + SECONDS
                upload = png_bytes(collection["images"][3])
                clients = [client_loop(client, seed, until, upload, seen) for seed in range(CLIENTS)]
                # Midway, another process appends the shard's 8 images; the server must pick them up.
                add = asyncio.to_thread(
                    run_clipkit,
                    "index",
                    "add",
                    "--index",
                    str(index_dir),
                    "--images",
                    str(root / "images" / "shards"),
                )
                results = await asyncio.gather(add, *clients)
                for _ in range(300):  # the server checks index.json every 0.5 s
                    health = (await client.get("/healthz")).json()
                    if health["images"] == 24:
                        break
                    await asyncio.sleep(0.1)
                ready = await client.get("/readyz")
                search = await client.post("/v1/search", json={"query": "caption 20", "k": 24})
                image = await client.get("/v1/images/20")
            return seen, results[0], health, ready, search, image

        seen, added, health, ready, search, image = asyncio.run(load())
        assert process.poll() is None, "the server stopped under load"
    assert added.returncode == 0, added.stderr[-2000:]
    statuses = [status for status, _ in seen]
    log = (tmp_path / "server.log").read_text()[-3000:]
    failed = [s for s in seen if s[0] not in (200, 503)]
    assert set(statuses) <= {200, 503}, (len(failed), failed[:5], log)
    assert statuses.count(200) > CLIENTS  # every client was answered, most more than once
    assert all(retry == "1" for status, retry in seen if status == 503)
    # Recovered, and serving the new generation without a restart.
    assert ready.status_code == 200 and health["status"] == "ok"
    assert health["images"] == 24 and health["generation"] == 2
    assert search.status_code == 200 and len(search.json()["results"]) == 24
    assert image.status_code == 200 and image.content == encode(collection["images"][20], "jpg")
    print(f"{len(seen)} requests: {statuses.count(200)} x 200, {statuses.count(503)} x 503")
