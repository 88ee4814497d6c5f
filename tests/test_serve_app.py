"""The HTTP API in process: answers against the index and open_clip, bad input, auth, metrics, batching."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import open_clip
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from clipkit.retrieval import Encoder, add_to_index, build_index, open_index
from clipkit.serve import BatchFailed, MicroBatcher, ServeConfig, create_app
from clipkit.serve.thumbnails import ByteBoundedCache, render_thumbnail
from test_eval_datasets import encode, export_small_model, make_images, write_tar

MAX_UPLOAD = 100_000
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """An index over a folder of PNGs (with captions) and a shard of JPEGs, and the images themselves."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = export_small_model(root / "model", seed=21)
    images = make_images(24, seed=22)
    (root / "images" / "folder").mkdir(parents=True)
    for i, image in enumerate(images[:16]):
        image.save(root / "images" / "folder" / f"{i:02d}.png")
        (root / "images" / "folder" / f"{i:02d}.txt").write_text(f"caption {i}")
    write_tar(root / "images" / "shards" / "0.tar",
              [{"__key__": f"s{i}", "jpg": encode(im, "jpg")} for i, im in enumerate(images[16:])])  # fmt: skip
    build_index(root / "images" / "folder", root / "index", model=model_dir)
    from clipkit.retrieval import add_to_index

    add_to_index(root / "index", root / "images" / "shards")
    return {"root": root, "model_dir": model_dir, "images": images}


@pytest.fixture(scope="module")
def served(collection):
    index, encoder = open_index(collection["root"] / "index")
    app = create_app(index, encoder, ServeConfig(max_upload_bytes=MAX_UPLOAD, max_image_pixels=MAX_PIXELS))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield {**collection, "client": client, "index": index, "encoder": encoder}
    index.close()


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_search_returns_what_the_index_finds(served):
    client, index, encoder = served["client"], served["index"], served["encoder"]
    for query, k in (("caption 3", 5), ("a green thing", 1), ("anything", 1000)):
        response = client.post("/v1/search", json={"query": query, "k": k})
        assert response.status_code == 200, response.text
        body = response.json()
        scores, ids = index.search(encoder.encode_texts([query]), k)
        assert [r["id"] for r in body["results"]] == ids[0].tolist()
        np.testing.assert_allclose([r["score"] for r in body["results"]], scores[0], atol=1e-6)
        assert len(body["results"]) == min(k, 24) and body["took_ms"] >= 0
        records = index.records(ids[0])
        assert [(r["uri"], r["caption"]) for r in body["results"]] == [
            (records[i].uri, records[i].caption) for i in ids[0]
        ]
    default_k = client.post("/v1/search", json={"query": "caption 7"}).json()
    assert len(default_k["results"]) == 10


def test_image_search_finds_the_uploaded_image_first(served):
    client, index = served["client"], served["index"]
    for image_id in (0, 9, 20):  # two PNG files and a JPEG inside a shard
        record = index.record(image_id)
        data = served["client"].get(f"/v1/images/{image_id}").content
        response = client.post("/v1/search/image", files={"image": (record.uri, data)}, data={"k": "3"})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == 3 and results[0]["id"] == image_id
        assert results[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_images_are_served_with_their_type_and_thumbnails(served):
    client, root = served["client"], served["root"]
    response = client.get("/v1/images/3")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content == (root / "images" / "folder" / "03.png").read_bytes()
    shard = client.get("/v1/images/18")
    assert shard.headers["content-type"] == "image/jpeg"
    assert shard.content == encode(served["images"][18], "jpg")
    for image_id, size in ((3, 64), (18, 128), (18, 512)):
        thumbnail = client.get(f"/v1/images/{image_id}", params={"size": size})
        assert thumbnail.status_code == 200
        picture = Image.open(io.BytesIO(thumbnail.content))
        assert thumbnail.headers["content-type"] == f"image/{picture.format.lower()}"
        assert picture.size == (40, 36)  # the originals are 40 x 36: never enlarged
    other_size = client.get("/v1/images/3", params={"size": 100})
    assert other_size.status_code == 422
    assert other_size.json()["detail"] == "size=100 is not a thumbnail size; use one of 64, 128, 256, 512"


def test_embeddings_are_normalised_and_equal_open_clips(served):
    client, model_dir = served["client"], served["model_dir"]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    model.eval()
    texts = ["a red square", "caption 5", "two words"]
    body = client.post("/v1/embed/text", json={"texts": texts}).json()
    with torch.no_grad():
        expected = model.encode_text(tokenizer(texts), normalize=True).numpy()
    np.testing.assert_allclose(np.array(body["embeddings"]), expected, atol=1e-5)
    assert body["dim"] == 32 and body["model"] == served["index"].model["fingerprint"]

    image = served["images"][4]
    body = client.post("/v1/embed/image", files={"image": ("x.png", png_bytes(image))}).json()
    with torch.no_grad():
        expected = model.encode_image(preprocess(image)[None], normalize=True).numpy()
    np.testing.assert_allclose(np.array(body["embeddings"]), expected, atol=1e-5)
    assert np.linalg.norm(body["embeddings"][0]) == pytest.approx(1.0, abs=1e-5)


def png_declaring(side: int) -> bytes:
    """A small PNG file that declares side x side pixels (blank 1-bit pixels compress to almost nothing)."""
    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, format="PNG")
    return out.getvalue()


def bad_requests(*, max_upload: int, too_many_pixels: bytes) -> dict:
    """Bad request name -> (send(client), expected status): what a server with these limits must refuse."""
    small_png = png_bytes(make_images(1)[0])
    json_type = {"content-type": "application/json"}
    return {
        "empty query": (lambda c: c.post("/v1/search", json={"query": ""}), 422),
        "blank query": (lambda c: c.post("/v1/search", json={"query": "   \n"}), 422),
        "query too long": (lambda c: c.post("/v1/search", json={"query": "x" * 1001}), 422),
        "k zero": (lambda c: c.post("/v1/search", json={"query": "cat", "k": 0}), 422),
        "k too big": (lambda c: c.post("/v1/search", json={"query": "cat", "k": 1001}), 422),
        "k a string": (lambda c: c.post("/v1/search", json={"query": "cat", "k": "5"}), 422),
        "k fractional": (lambda c: c.post("/v1/search", json={"query": "cat", "k": 2.5}), 422),
        "k boolean": (lambda c: c.post("/v1/search", json={"query": "cat", "k": True}), 422),
        "query not a string": (lambda c: c.post("/v1/search", json={"query": ["cat"]}), 422),
        "unknown field": (lambda c: c.post("/v1/search", json={"query": "cat", "top_k": 3}), 422),
        "malformed json": (lambda c: c.post("/v1/search", content=b'{"query": "ca', headers=json_type), 422),
        "json array": (lambda c: c.post("/v1/search", json=[1, 2]), 422),
        "not json": (
            lambda c: c.post("/v1/search", content=b"cat", headers={"content-type": "text/plain"}),
            422,
        ),
        "invalid utf-8": (
            lambda c: c.post("/v1/search", content=b'{"query": "\xff\xfe"}', headers=json_type),
            422,
        ),
        "upload too big": (
            lambda c: c.post(
                "/v1/search/image", files={"image": ("big.png", b"\x89PNG" + b"0" * (max_upload + 70_000))}
            ),
            413,
        ),
        "too many pixels": (
            lambda c: c.post("/v1/search/image", files={"image": ("huge.png", too_many_pixels)}),
            413,
        ),
        "not an image": (
            lambda c: c.post("/v1/search/image", files={"image": ("a.txt", b"hello, I am text")}),
            415,
        ),
        "truncated image": (
            lambda c: c.post("/v1/embed/image", files={"image": ("t.png", small_png[:60])}),
            415,
        ),
        "empty upload": (lambda c: c.post("/v1/embed/image", files={"image": ("e.png", b"")}), 415),
        "no image field": (lambda c: c.post("/v1/search/image", data={"k": "3"}), 422),
        "form k out of range": (
            lambda c: c.post("/v1/search/image", files={"image": ("a.png", small_png)}, data={"k": "0"}),
            422,
        ),
        "embed upload too big": (
            lambda c: c.post(
                "/v1/embed/image", files={"image": ("big.jpg", b"\xff" * (max_upload + 70_000))}
            ),
            413,
        ),
        "unknown id": (lambda c: c.get("/v1/images/1000000"), 404),
        "negative id": (lambda c: c.get("/v1/images/-1"), 422),
        "id not a number": (lambda c: c.get("/v1/images/abc"), 422),
        "id past sqlite range": (lambda c: c.get("/v1/images/99999999999999999999999"), 422),
        "path in id": (lambda c: c.get("/v1/images/..%2F..%2Fetc%2Fpasswd"), 404),
        "traversal": (lambda c: c.get("/v1/images/../../etc/passwd"), 404),
        "thumbnail size zero": (lambda c: c.get("/v1/images/1", params={"size": 0}), 422),
        "thumbnail size huge": (lambda c: c.get("/v1/images/1", params={"size": 5000}), 422),
        "thumbnail size not offered": (lambda c: c.get("/v1/images/1", params={"size": 127}), 422),
        "no texts": (lambda c: c.post("/v1/embed/text", json={"texts": []}), 422),
        "too many texts": (lambda c: c.post("/v1/embed/text", json={"texts": ["a"] * 65}), 422),
        "empty text": (lambda c: c.post("/v1/embed/text", json={"texts": ["a", ""]}), 422),
        "wrong method": (lambda c: c.get("/v1/search"), 405),
        "unknown route": (lambda c: c.get("/v1/nothing"), 404),
    }


BAD_REQUESTS = bad_requests(max_upload=MAX_UPLOAD, too_many_pixels=png_declaring(2000))


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_its_status_and_the_server_carries_on(served, case):
    client = served["client"]
    send, status = BAD_REQUESTS[case]
    response = send(client)
    assert response.status_code == status, response.text
    assert "detail" in response.json()
    assert client.get("/healthz").json() == {
        "status": "ok",
        "images": 24,
        "model": served["index"].model["fingerprint"],
        "generation": 2,  # a build and an add
        "problems": [],
    }
    assert client.get("/readyz").status_code == 200
    assert client.get("/v1/images/24").status_code == 404
    search = client.post("/v1/search", json={"query": "caption 2", "k": 3})
    assert search.status_code == 200 and len(search.json()["results"]) == 3


def test_an_api_key_guards_every_v1_route(collection):
    index, encoder = open_index(collection["root"] / "index")
    app = create_app(index, encoder, ServeConfig(api_key="s3cret-key"))
    v1_routes = [(r.path, sorted(r.methods)[0]) for r in app.routes if r.path.startswith("/v1")]
    assert len(v1_routes) == 7
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for path, method in v1_routes:
            url = path.replace("{image_id}", "1")
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                            {"Authorization": "Bearer s3cret-key-and-more"}, {"Authorization": "Basic s3cret-key"}):  # fmt: skip
                response = client.request(method, url, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
        # Refused before the body is read: a malformed or oversized body without the key is still a 401.
        assert (
            client.post(
                "/v1/search", content=b'{"query', headers={"content-type": "application/json"}
            ).status_code
            == 401
        )
        assert (
            client.post("/v1/search/image", files={"image": ("x.png", b"0" * (11 * 2**20))}).status_code
            == 401
        )
        good = {"Authorization": "Bearer s3cret-key"}
        assert client.post("/v1/search", json={"query": "caption 1"}, headers=good).status_code == 200
        assert client.get("/v1/images/1", headers=good).status_code == 200
        for path in (
            "/healthz",
            "/readyz",
            "/metrics",
            "/",
            "/page.js",
            "/docs",
            "/openapi.json",
        ):  # probes, scraping, the page (it asks for the key) and the docs stay open
            assert client.get(path).status_code == 200
        # Anything else needs the key, routes outside /v1 included (one added later is guarded too).
        assert client.get("/knn-service").status_code == 401 and client.get("/v2/x").status_code == 401
    index.close()


def metric_samples(client) -> dict:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_metrics_count_requests_errors_latency_and_index_size(collection):
    index, encoder = open_index(collection["root"] / "index")
    with TestClient(create_app(index, encoder), base_url="http://127.0.0.1") as client:
        for _ in range(3):
            client.post("/v1/search", json={"query": "caption 1"})
        client.post("/v1/search", json={"query": ""})
        client.get("/v1/images/77")
        client.get("/v1/images/3")
        samples = metric_samples(client)
    index.close()
    search = "/v1/search"
    assert (
        samples[("clipkit_http_requests_total", (("method", "POST"), ("route", search), ("status", "200")))]
        == 3
    )
    assert (
        samples[("clipkit_http_requests_total", (("method", "POST"), ("route", search), ("status", "422")))]
        == 1
    )
    assert samples[("clipkit_http_errors_total", (("route", search), ("status", "422")))] == 1
    assert (
        samples[("clipkit_http_errors_total", (("route", "/v1/images/{image_id}"), ("status", "404")))] == 1
    )
    assert samples[("clipkit_http_request_duration_seconds_count", (("route", search),))] == 4
    assert samples[("clipkit_http_request_duration_seconds_bucket", (("le", "+Inf"), ("route", search)))] == 4
    assert samples[("clipkit_index_images", ())] == 24
    assert samples[("clipkit_batch_size_count", (("batcher", "search"),))] == 3


def test_the_page_is_served_with_a_strict_content_security_policy(served):
    client = served["client"]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'id="query"' in page.text and 'src="/page.js"' in page.text
    script = client.get("/page.js")
    assert script.headers["content-type"].startswith("text/javascript") and "/v1/search" in script.text
    assert "innerHTML" not in script.text  # results are written as text nodes
    assert client.get("/docs").status_code == 200
    assert "/v1/search" in client.get("/openapi.json").json()["paths"]


def test_concurrent_queries_are_batched_and_answered_like_single_ones(served):
    index, encoder = served["index"], served["encoder"]
    app = create_app(index, encoder, ServeConfig(max_batch=16, batch_wait_ms=20))
    queries = [f"caption {i}" for i in range(40)]

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                responses = await asyncio.gather(
                    *(client.post("/v1/search", json={"query": q, "k": 4}) for q in queries)
                )
                metrics = (await client.get("/metrics")).text
        return responses, metrics

    responses, metrics = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in responses)
    for query, response in zip(queries, responses, strict=True):
        _, ids = index.search(encoder.encode_texts([query]), 4)
        assert [r["id"] for r in response.json()["results"]] == ids[0].tolist()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics) for s in f.samples}  # fmt: skip
    batches = samples[("clipkit_batch_size_count", (("batcher", "search"),))]
    assert samples[("clipkit_batch_size_sum", (("batcher", "search"),))] == 40
    assert 3 <= batches < 40  # 40 queries at once, 16 at most per batch
    assert samples[("clipkit_batch_size_bucket", (("batcher", "search"), ("le", "8.0")))] < batches


def run_batcher(items, compute, **options):
    async def scenario():
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(compute, executor=executor, **options)
            batcher.start()
            try:
                return await asyncio.gather(*(batcher.submit(item) for item in items), return_exceptions=True)
            finally:
                await batcher.stop()

    return asyncio.run(scenario())


def test_micro_batcher_groups_concurrent_items_and_keeps_each_result_with_its_caller():
    seen, lock = [], threading.Lock()

    def square_all(batch):
        with lock:
            seen.append(list(batch))
        return [x * x for x in batch]

    results = run_batcher(list(range(50)), square_all, max_batch=8, max_wait_s=0.05)
    assert results == [x * x for x in range(50)]
    assert sorted(x for batch in seen for x in batch) == list(range(50))
    assert max(len(batch) for batch in seen) == 8 and len(seen) == 7  # 50 items waiting: full batches


def test_micro_batcher_hands_a_failure_to_that_batch_only():
    def fail_on_negative(batch):
        if any(x < 0 for x in batch):
            raise ValueError("negative")
        return batch

    results = run_batcher([1, -1, 2, 3], fail_on_negative, max_batch=2, max_wait_s=0.05)
    assert [type(r) for r in results[:2]] == [BatchFailed, BatchFailed] and results[2:] == [2, 3]
    assert all(isinstance(r.__cause__, ValueError) for r in results[:2])
    assert "negative" not in str(results[0])  # the client is not shown the server's internals


def test_micro_batcher_survives_a_wrong_result_count():
    results = run_batcher([1, 2, 3], lambda batch: batch[:1] if 2 in batch else batch, max_batch=2,
                          max_wait_s=0.05)  # fmt: skip
    assert [type(r) for r in results[:2]] == [BatchFailed, BatchFailed] and results[2] == 3


def test_metadata_reaches_results_as_json_safe_values(served):
    body = served["client"].post("/v1/search", json={"query": "caption 0", "k": 24}).json()
    assert json.loads(json.dumps(body)) == body
    assert {r["caption"] for r in body["results"]} >= {f"caption {i}" for i in range(16)} | {None}


def test_embedding_more_texts_than_a_batch_holds(served):
    index, encoder = served["index"], served["encoder"]
    texts = [f"text number {i}" for i in range(10)]
    with TestClient(
        create_app(index, encoder, ServeConfig(max_batch=4)), base_url="http://127.0.0.1"
    ) as client:
        body = client.post("/v1/embed/text", json={"texts": texts}).json()
    np.testing.assert_allclose(np.array(body["embeddings"]), encoder.encode_texts(texts), atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Holding under failure and overload


class BreaksOnWord(Encoder):
    """The index's encoder, except that a batch holding the word BREAK raises (an exception in the model)."""

    def encode_texts(self, texts):
        if any("BREAK" in text for text in texts):
            raise RuntimeError("the model failed on this batch")
        return super().encode_texts(texts)


async def in_process(app, scenario):
    """Run `scenario(client)` against `app` with its lifespan (batchers running), over ASGI."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
            return await scenario(client)


def test_a_failing_batch_answers_500_and_the_next_request_is_served(served):
    index, encoder = served["index"], served["encoder"]
    app = create_app(index, BreaksOnWord(encoder.bundle), ServeConfig(reload_interval_s=0))

    async def scenario(client):
        failed = await client.post("/v1/search", json={"query": "BREAK it"})
        after = await client.post("/v1/search", json={"query": "caption 3", "k": 4})
        return failed, after, await client.get("/readyz"), await client.get("/healthz")

    failed, after, ready, health = asyncio.run(in_process(app, scenario))
    assert failed.status_code == 500
    assert failed.json()["detail"] == "the search batch this request was in failed; the server log says why"
    assert after.status_code == 200
    _, ids = index.search(encoder.encode_texts(["caption 3"]), 4)
    assert [r["id"] for r in after.json()["results"]] == ids[0].tolist()
    assert ready.status_code == 200 and health.json()["status"] == "ok"


def test_a_killed_batcher_fails_readyz_at_once_and_its_requests_get_503(served):
    app = create_app(served["index"], served["encoder"], ServeConfig(reload_interval_s=0))
    release = threading.Event()

    async def scenario(client):
        # A request inside a batch (the model thread is busy) when the batcher task is killed.
        app.state.model_thread.submit(release.wait)
        waiting = asyncio.create_task(client.post("/v1/search", json={"query": "caption 1"}))
        while not app.state.batchers["search"]._in_flight:
            await asyncio.sleep(0.01)
        task = app.state.batchers["search"]._task
        task.cancel()  # what a crash of the batcher's loop looks like from outside
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            # Bounded waits: a hang fails the test instead of stalling it.
            answers = [await asyncio.wait_for(request, 1.0) for request in (
                waiting, client.get("/readyz"), client.get("/healthz"),
                client.post("/v1/search", json={"query": "caption 2"}))]  # fmt: skip
        finally:
            release.set()
        answers.append(await client.post("/v1/embed/text", json={"texts": ["another batcher"]}))
        return answers

    waiting, ready, health, later, embed = asyncio.run(in_process(app, scenario))
    assert waiting.status_code == 503 and later.status_code == 503
    assert later.headers["retry-after"] == "1" and "/readyz" in later.json()["detail"]
    assert (
        ready.status_code == 503 and ready.json()["detail"] == "the search batcher is not running (stopped)"
    )
    assert health.status_code == 200  # the process answers: liveness holds, and says what is wrong
    assert health.json()["status"] == "failing"
    assert health.json()["problems"] == ["the search batcher is not running (stopped)"]
    assert embed.status_code == 200  # the other batchers carry on


def test_a_saturated_server_answers_503_at_once_and_recovers(served):
    index, encoder = served["index"], served["encoder"]
    app = create_app(
        index, encoder, ServeConfig(max_batch=2, batch_wait_ms=0, max_queue=4, reload_interval_s=0)
    )
    release = threading.Event()

    async def scenario(client):
        app.state.model_thread.submit(release.wait)  # the model is busy: nothing leaves the queue
        requests = [
            asyncio.create_task(client.post("/v1/search", json={"query": f"caption {i}", "k": 3}))
            for i in range(20)
        ]
        try:
            for _ in range(1000):  # the refusals come while the model is still busy
                if sum(r.done() for r in requests) >= 14:
                    break
                await asyncio.sleep(0.01)
            refused_while_busy = [r.result().status_code for r in requests if r.done()]
        finally:
            release.set()
        responses = await asyncio.gather(*requests)
        return refused_while_busy, responses, await client.post("/v1/search", json={"query": "caption 9"})

    refused_while_busy, responses, later = asyncio.run(in_process(app, scenario))
    # 2 in the batch waiting for the model and 4 queued are answered; the rest are refused at once.
    assert len(refused_while_busy) >= 14 and set(refused_while_busy) == {503}
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503} and 4 <= statuses.count(200) <= 6
    for query, response in zip(range(20), responses, strict=True):
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert "4 search requests are already waiting" in response.json()["detail"]
        else:
            _, ids = index.search(encoder.encode_texts([f"caption {query}"]), 3)
            assert [r["id"] for r in response.json()["results"]] == ids[0].tolist()
    assert later.status_code == 200  # recovered


def test_every_request_has_a_deadline(served):
    app = create_app(
        served["index"], served["encoder"], ServeConfig(request_timeout_s=0.3, reload_interval_s=0)
    )
    release = threading.Event()

    async def scenario(client):
        app.state.model_thread.submit(release.wait)
        try:
            late = await asyncio.wait_for(client.post("/v1/search", json={"query": "caption 1"}), 10)
            image = png_bytes(served["images"][2])
            late_image = await asyncio.wait_for(
                client.post("/v1/search/image", files={"image": ("a.png", image)}), 10
            )
        finally:
            release.set()
        return late, late_image, await client.post("/v1/search", json={"query": "caption 1"})

    late, late_image, after = asyncio.run(in_process(app, scenario))
    for response in (late, late_image):
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "deadline (0.3 s)" in response.json()["detail"]
    assert after.status_code == 200


def test_image_queries_are_batched_and_answered_like_single_ones(served):
    index, encoder = served["index"], served["encoder"]
    app = create_app(index, encoder, ServeConfig(max_image_batch=8, batch_wait_ms=50, reload_interval_s=0))
    ids = list(range(0, 24, 2))

    async def scenario(client):
        uploads = [png_bytes(served["images"][i]) for i in ids]
        searches = await asyncio.gather(
            *(
                client.post("/v1/search/image", files={"image": ("q.png", data)}, data={"k": "3"})
                for data in uploads
            )
        )
        embeds = await asyncio.gather(
            *(client.post("/v1/embed/image", files={"image": ("q.png", data)}) for data in uploads[:4])
        )
        return searches, embeds, (await client.get("/metrics")).text

    searches, embeds, metrics = asyncio.run(in_process(app, scenario))
    for image_id, response in zip(ids, searches, strict=True):
        assert response.status_code == 200, response.text
        expected = encoder.encode_images([served["images"][image_id].convert("RGB")])
        scores, found = index.search(expected, 3)
        assert [r["id"] for r in response.json()["results"]] == found[0].tolist()
        np.testing.assert_allclose([r["score"] for r in response.json()["results"]], scores[0], atol=1e-5)
    for image_id, response in zip(ids[:4], embeds, strict=True):
        expected = encoder.encode_images([served["images"][image_id].convert("RGB")])
        np.testing.assert_allclose(response.json()["embeddings"], expected, atol=1e-5)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics) for s in f.samples}  # fmt: skip
    assert samples[("clipkit_batch_size_sum", (("batcher", "image"),))] == 16
    assert samples[("clipkit_batch_size_count", (("batcher", "image"),))] < 16  # some were encoded together


# ------------------------------------------------------------------------------------------------------------
# Thumbnails


def test_thumbnails_of_a_large_photo_are_upright_and_close_to_a_full_decode():
    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize(
        (1600, 1200), Image.Resampling.BICUBIC
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    out = io.BytesIO()
    photo.save(out, format="JPEG", exif=exif, quality=95)
    data, media_type = render_thumbnail(out.getvalue(), "image/jpeg", 128)
    small = Image.open(io.BytesIO(data))
    assert media_type == "image/jpeg" and small.format == "JPEG" and small.size == (96, 128)
    upright = photo.transpose(Image.Transpose.ROTATE_270)  # what a viewer shows, 1200 x 1600
    reference = upright.resize((96, 128), Image.Resampling.LANCZOS)
    difference = np.abs(np.asarray(small, np.float32) - np.asarray(reference, np.float32)).mean()
    assert difference < 6  # of 255: the reduced-scale decode looks like the full one


def test_the_thumbnail_cache_is_bounded_in_bytes_and_keeps_the_recently_used():
    cache = ByteBoundedCache(1000)
    for i in range(5):
        cache.put(i, (bytes(300), "image/jpeg"))
        assert cache.nbytes <= 1000
    assert len(cache) == 3 and cache.get(0) is None and cache.get(2) is not None
    cache.put(5, (bytes(300), "image/jpeg"))  # 2 was used just now: 3 goes
    assert cache.get(3) is None and cache.get(2) is not None and cache.nbytes == 900
    cache.put(6, (bytes(1001), "image/png"))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get(6) is None and len(cache) == 3


# ------------------------------------------------------------------------------------------------------------
# New generations without a restart


def test_an_index_add_is_served_without_restart_while_queries_run(collection, tmp_path):
    root, images = collection["root"], collection["images"]
    build_index(root / "images" / "folder", tmp_path / "index", model=collection["model_dir"])  # 16 images
    index, encoder = open_index(tmp_path / "index")
    app = create_app(index, encoder, ServeConfig(reload_interval_s=0.05))

    async def scenario(client):
        answers, adding = [], asyncio.Event()

        async def query_until_added(worker: int) -> None:
            for i in range(10_000):  # bounded: stops once the add is served, or after this many rounds
                if adding.is_set() and answers and answers[-1][2] == 24:
                    return
                search = await client.post("/v1/search", json={"query": f"caption {i % 16}", "k": 24})
                thumbnail = await client.get(f"/v1/images/{(i + worker) % 16}", params={"size": 64})
                results = search.json().get("results", []) if search.status_code == 200 else []
                answers.append((search.status_code, thumbnail.status_code, len(results)))

        queries = [asyncio.create_task(query_until_added(worker)) for worker in range(4)]
        await asyncio.sleep(0.2)
        adding.set()
        await asyncio.to_thread(add_to_index, tmp_path / "index", root / "images" / "shards")  # 8 more
        await asyncio.wait_for(asyncio.gather(*queries), 120)
        image_20 = png_bytes(images[20])
        return (
            answers, (await client.get("/healthz")).json(),
            await client.post("/v1/search/image", files={"image": ("q.png", image_20)}, data={"k": "1"}),
            await client.get("/v1/images/20"), await client.post("/v1/index/reload"),
        )  # fmt: skip

    answers, health, found, original, reload = asyncio.run(in_process(app, scenario))
    assert {(search, thumbnail) for search, thumbnail, _ in answers} == {(200, 200)}  # none failed
    assert {count for _, _, count in answers} == {16, 24}  # both generations answered, in that order
    assert [count for _, _, count in answers] == sorted(count for _, _, count in answers)
    assert health["images"] == 24 and health["generation"] == 2 and health["problems"] == []
    assert found.json()["results"][0]["id"] == 20 and original.content == encode(images[20], "jpg")
    assert reload.json() == {"reloaded": False, "generation": 2, "images": 24}  # nothing newer
    app.state.served.close()


def test_a_reload_to_another_models_index_is_refused_and_the_current_one_stays(collection, tmp_path):
    root = collection["root"]
    build_index(root / "images" / "folder", tmp_path / "index", model=collection["model_dir"])
    index, encoder = open_index(tmp_path / "index")
    app = create_app(index, encoder, ServeConfig(reload_interval_s=0, api_key="k"))
    other_model = export_small_model(tmp_path / "other-model", seed=99)
    build_index(root / "images" / "shards", tmp_path / "index", model=other_model, overwrite=True)
    key = {"Authorization": "Bearer k"}

    async def scenario(client):
        return (
            await client.post("/v1/index/reload"), await client.post("/v1/index/reload", headers=key),
            (await client.get("/healthz")).json(),
            await client.post("/v1/search", json={"query": "caption 1", "k": 24}, headers=key),
        )  # fmt: skip

    anonymous, refused, health, search = asyncio.run(in_process(app, scenario))
    assert anonymous.status_code == 401  # the reload call is behind the API key
    assert refused.status_code == 409 and "now names an index of another model" in refused.json()["detail"]
    assert health["status"] == "failing" and health["generation"] == 1 and health["images"] == 16
    assert health["problems"] == [f"the last reload failed: {refused.json()['detail']}"]
    assert search.status_code == 200 and len(search.json()["results"]) == 16
    app.state.served.close()
