"""Attacks on the server and on the index it reads (issue 19), each mounted and refused: image uploads that
decode to much or through unsafe plugins, slow connections, DNS rebinding and cross-site requests, an index
whose rows name other types and files, an index folder whose name holds '#' or '?'."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import shutil
import socket
import sqlite3
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from clipkit.cli.main import build_parser
from clipkit.cli.serve import config_from_args
from clipkit.retrieval import (
    ImageUnavailable,
    RetrievalIndex,
    add_to_index,
    build_index,
    open_index,
    read_record_bytes,
)
from clipkit.serve import ServeConfig, create_app
from clipkit.serve.guards import DecodeSlots
from clipkit.serve.server import bounded_protocol
from conftest import run_clipkit
from test_eval_datasets import encode
from test_serve_app import collection, in_process, png_declaring  # noqa: F401 (collection: a fixture)

LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def opened(collection):  # noqa: F811
    index, encoder = open_index(collection["root"] / "index")
    yield {**collection, "index": index, "encoder": encoder}
    index.close()


def client_for(opened, config: ServeConfig | None = None) -> TestClient:
    return TestClient(create_app(opened["index"], opened["encoder"], config or ServeConfig()), base_url=LOCAL)


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


# --- Finding 2: image uploads -----------------------------------------------------------------------------


def test_only_the_data_layers_image_formats_are_decoded(opened):
    image = opened["images"][5]
    with client_for(opened) as client:
        for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
            response = client.post("/v1/embed/image", files={"image": ("x", encoded(image, fmt))})
            assert response.status_code == 200, (fmt, response.text)
        # ICO is decoded whole inside Image.open (before any size check); the others are plugins nobody needs.
        for fmt in ("ICO", "PCX", "PPM", "TGA", "SGI", "IM"):
            response = client.post("/v1/embed/image", files={"image": ("x", encoded(image, fmt))})
            assert response.status_code == 415, (fmt, response.text)
            assert "send JPEG, PNG, WebP, GIF, BMP or TIFF" in response.json()["detail"]
        eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 36\nshowpage\n"  # Ghostscript would run it
        assert client.post("/v1/embed/image", files={"image": ("x.eps", eps)}).status_code == 415


def test_the_default_pixel_limit_refuses_a_25_megapixel_image_before_decoding_it(opened):
    assert ServeConfig().max_image_pixels == 4096 * 4096
    with client_for(opened) as client:
        response = client.post("/v1/search/image", files={"image": ("big.png", png_declaring(5000))})
        assert response.status_code == 413
        assert response.json()["detail"] == "the image is 5000x5000 pixels; the limit is 16777216 pixels"
        accepted = client.post("/v1/search/image", files={"image": ("ok.png", png_declaring(4096))})
        assert accepted.status_code == 200


def test_concurrent_uploads_wait_for_a_decoder_then_get_503(opened):
    config = ServeConfig(max_decodes=1, decode_wait_s=0.05, reload_interval_s=0)
    app = create_app(opened["index"], opened["encoder"], config)
    upload = png_declaring(4096)  # ~0.2 s or more to decode: 8 at once cannot all get the one decoder in time

    async def scenario(client):
        return await asyncio.gather(
            *(client.post("/v1/search/image", files={"image": ("q.png", upload)}) for _ in range(8))
        )

    responses = asyncio.run(in_process(app, scenario))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 1, statuses
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["detail"] == "all 1 image decoders are busy; retry later"


def test_decode_slots_bound_running_decodes_even_when_requests_are_cancelled():
    running, most = 0, 0
    lock = threading.Lock()

    def decode(seconds: float) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(seconds)
        with lock:
            running -= 1

    async def scenario():
        slots = DecodeSlots(2, wait_s=5)
        first = [asyncio.create_task(slots.run(decode, 0.3)) for _ in range(2)]
        await asyncio.sleep(0.05)
        for task in first:  # a request deadline: the decodes go on in their threads
            task.cancel()
        await asyncio.gather(*first, return_exceptions=True)
        started = time.monotonic()
        await asyncio.gather(*(slots.run(decode, 0.05) for _ in range(6)))
        slots.close()
        return time.monotonic() - started

    waited = asyncio.run(scenario())
    assert most == 2  # never a third decode, though two requests were cancelled mid-decode
    assert waited >= 0.2  # the next decodes waited for the cancelled ones' slots


# --- Finding 3: slow clients (the protocol, on a real socket) ----------------------------------------------


async def hello(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = (await receive())["type"]
            await send(
                {"type": f"{message}.complete"}
            )  # lifespan.startup.complete, lifespan.shutdown.complete
            if message == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
    await send({"type": "http.response.body", "body": b"hello"})


def partial_request(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    return sock


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_connections_that_never_finish_their_headers_are_closed_and_cannot_crowd_out_clients():
    protocol = bounded_protocol(header_timeout_s=1.0, max_connections=8)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(hello, http=protocol, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started
        slow = [partial_request(port) for _ in range(8)]
        # At the cap, a new client is still answered: the connection longest without a request makes room.
        answer = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert answer.status_code == 200 and answer.text == "hello"
        assert closed_by_server(slow[0], 1.0)  # the oldest slow one
        # The rest are closed by the header timeout (1 s), though they keep sending header bytes.
        for sock_ in slow[1:]:
            sock_.sendall(b"a")
        assert all(closed_by_server(sock_, 3.0) for sock_ in slow[1:])
        # A kept-alive connection that starts a request and stalls is closed too.
        kept = socket.create_connection(("127.0.0.1", port), timeout=5)
        kept.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answered = b""
        while not answered.endswith(b"hello"):
            answered += kept.recv(4096)
        kept.sendall(b"GET / HTTP/1.1\r\n")
        assert closed_by_server(kept, 3.0)
        for sock_ in [*slow, kept]:
            sock_.close()
    finally:
        server.should_exit = True
        thread.join(10)


# --- Finding 4: DNS rebinding and cross-site requests -------------------------------------------------------


def test_a_foreign_host_header_is_refused(opened):
    with client_for(opened) as client:
        for host in ("evil.example", "rebound.attacker.test:8000", "127.0.0.2"):
            for method, path in (("GET", "/"), ("GET", "/v1/images/1"), ("POST", "/v1/index/reload")):
                response = client.request(method, path, headers={"host": host})
                assert response.status_code == 400, (host, path)
        for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:8000"):
            assert client.get("/v1/images/1", headers={"host": host}).status_code == 200, host
    with client_for(opened, ServeConfig(allowed_hosts=("search.example.com",))) as client:
        assert client.get("/healthz", headers={"host": "search.example.com"}).status_code == 200
        assert client.get("/healthz", headers={"host": "127.0.0.1"}).status_code == 400


def test_a_reload_from_another_sites_page_is_refused(opened):
    with client_for(opened, ServeConfig(reload_interval_s=0)) as client:
        for headers in (
            {"origin": "http://evil.example"},
            {"origin": "http://127.0.0.1:3000"},  # another port: same site, another origin
            {"origin": "null"},
            {"sec-fetch-site": "cross-site"},
            {"sec-fetch-site": "same-site"},
        ):
            response = client.post("/v1/index/reload", headers={"host": "127.0.0.1:8000", **headers})
            assert response.status_code == 403, headers
            assert "another site's page" in response.json()["detail"]
        own_page = {
            "host": "127.0.0.1:8000",
            "origin": "http://127.0.0.1:8000",
            "sec-fetch-site": "same-origin",
        }
        assert client.post("/v1/index/reload", headers=own_page).status_code == 200
        assert client.post("/v1/index/reload").status_code == 200  # curl, a script: no browser headers
        # Searches change nothing: a page elsewhere cannot read the answer (no CORS), nor rebind (Host).
        assert (
            client.post("/v1/search", json={"query": "a"}, headers={"origin": "http://x.test"}).status_code
            == 200
        )


def test_the_page_keeps_the_api_key_out_of_scripts_reach(opened):
    with client_for(opened) as client:
        script = client.get("/page.js").text
    for place in ("sessionStorage", "localStorage", "document.cookie", "indexedDB"):
        assert place not in script
    with client_for(opened, ServeConfig(api_key="k3y")) as client:
        assert client.post("/v1/session").status_code == 401
        signed_in = client.post("/v1/session", headers={"authorization": "Bearer k3y"})
        assert signed_in.status_code == 204
        # HttpOnly: no script reads it; SameSite=Strict: no other site's page sends it.
        assert signed_in.headers["set-cookie"] == "clipkit-key=k3y; HttpOnly; SameSite=Strict; Path=/"
        assert client.post("/v1/search", json={"query": "a"}).status_code == 200  # the cookie is the key now
        client.cookies.set("clipkit-key", "wrong")
        assert client.post("/v1/search", json={"query": "a"}).status_code == 401


# --- Finding 7: an index's rows are not trusted ------------------------------------------------------------


@pytest.fixture
def tampered(opened, tmp_path):
    """A copy of the index whose metadata rows can be changed: (index dir, update(id, **columns))."""
    index_dir = tmp_path / "index"
    shutil.copytree(opened["root"] / "index", index_dir)
    metadata = index_dir / RetrievalIndex(index_dir).manifest["metadata_file"]

    def update(image_id: int, **columns) -> None:
        db = sqlite3.connect(metadata)
        with db:
            for name, value in columns.items():
                db.execute(f"UPDATE images SET {name} = ? WHERE id = ?", (value, image_id))
        db.close()

    return index_dir, update


def test_the_index_records_the_folders_its_images_came_from(opened):
    root = opened["root"] / "images"
    assert opened["index"].image_roots == [str((root / "folder").resolve()), str((root / "shards").resolve())]


def test_a_row_naming_another_type_or_a_file_elsewhere_is_not_served(opened, tampered, tmp_path):
    index_dir, update = tampered
    update(3, media_type="text/html")  # would make the file a page on this origin
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(opened["root"] / "images" / "folder" / "04.png", outside / "04.png")  # same bytes, same hash
    update(4, path=str(outside / "04.png"))
    update(5, path="/dev/zero", offset=0)
    update(20, media_type="image/mpo")  # a phone's JPEG: served as JPEG
    index, encoder = open_index(index_dir)
    try:
        with TestClient(
            create_app(index, encoder, ServeConfig(reload_interval_s=0)), base_url=LOCAL
        ) as client:
            for image_id in (3, 4, 5):
                for params in ({}, {"size": 64}):
                    response = client.get(f"/v1/images/{image_id}", params=params)
                    assert response.status_code == 404, (image_id, params, response.headers)
            jpeg = client.get("/v1/images/20")
            assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
            assert jpeg.headers["x-content-type-options"] == "nosniff"
            assert jpeg.content == encode(opened["images"][20], "jpg")
        # The operator may name the folders instead (e.g. the images moved): then those are the ones allowed.
        config = ServeConfig(reload_interval_s=0, image_roots=(str(outside),))
        with TestClient(create_app(index, encoder, config), base_url=LOCAL) as client:
            assert client.get("/v1/images/4").status_code == 200
            assert client.get("/v1/images/6").status_code == 404
    finally:
        index.close()


def test_rows_naming_devices_fifos_links_out_or_huge_lengths_are_refused_before_reading(opened, tmp_path):
    record = opened["index"].record(2)
    folder = os.path.dirname(record.path)
    roots = [folder]
    assert read_record_bytes(record, roots) == open(record.path, "rb").read()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "inside"
    link.mkdir()
    (link / "passwd.png").symlink_to("/etc/passwd")
    everywhere = [folder, str(tmp_path), "/dev"]  # roots that hold each path: the other checks must refuse
    cases = {
        "/dev/zero, whole": (dict(path="/dev/zero", offset=None), everywhere),
        "/dev/zero, at an offset": (dict(path="/dev/zero", offset=0), everywhere),
        "a fifo": (dict(path=str(fifo), offset=None), everywhere),
        "a link out of the roots": (dict(path=str(link / "passwd.png"), offset=None), everywhere),
        "a huge length": (dict(length=2**40), roots),
        "a negative offset": (dict(offset=-5), roots),
        "a file outside the roots": (dict(path="/etc/passwd", offset=None), roots),
    }
    for name, (change, allowed) in cases.items():
        started = time.monotonic()
        with pytest.raises(ImageUnavailable):
            read_record_bytes(dataclasses.replace(record, **change), allowed)
        assert time.monotonic() - started < 1, name  # refused, not read (a fifo would block forever)


# --- Finding 10: an index folder whose name holds '#' or '?' -----------------------------------------------


def test_an_index_in_a_folder_named_with_hash_and_question_mark_opens_its_own_files(opened, tmp_path):
    images = opened["root"] / "images"
    index_dir = tmp_path / "photos#2024?v=1"
    decoy = tmp_path / "photos"  # what the unquoted URI 'file:.../photos#2024?v=1/...' would open
    decoy.write_bytes(b"not this file")
    build_index(images / "folder", index_dir, model=opened["model_dir"])
    add_to_index(index_dir, images / "shards")
    index = RetrievalIndex(index_dir)
    try:
        assert index.count == 24 and index.generation == 2
        assert index.record(20).uri == "0.tar#s4"
    finally:
        index.close()
    assert decoy.read_bytes() == b"not this file"


# --- issue 18, item 5: the CLI's flags are ServeConfig's -----------------------------------------------------


def serve_args(*flags: str):
    return build_parser().parse_args(["serve", "--index", "x", *flags])


def test_serve_flags_come_from_serve_config_with_its_defaults_units_and_bounds(tmp_path):
    assert config_from_args(serve_args()) == ServeConfig()
    given = config_from_args(
        serve_args("--max-upload-mb", "0.5", "--max-decodes", "3", "--header-timeout", "2.5",
                   "--allowed-host", "a.example", "--allowed-host", "b.example", "--image-root", "/srv/images"),
    )  # fmt: skip
    assert (
        given.max_upload_bytes == 2**19
        and isinstance(given.max_upload_bytes, int)
        and given.max_decodes == 3
        and given.header_timeout_s == 2.5
    )
    assert given.allowed_hosts == ("a.example", "b.example") and given.image_roots == ("/srv/images",)
    result = run_clipkit("serve", "--index", str(tmp_path), "--max-queue", "0")
    assert result.returncode == 2
    assert result.stderr.strip() == "clipkit serve: error: --max-queue 0: must be >= 1"
    result = run_clipkit("serve", "--index", str(tmp_path), "--max-upload-mb", "0")
    assert result.stderr.strip() == "clipkit serve: error: --max-upload-mb 0.0: must be > 0"
    help_text = run_clipkit("serve", "--help").stdout
    for flag in (
        "--max-decodes",
        "--max-image-pixels",
        "--header-timeout",
        "--max-connections",
        "--allowed-host",
    ):
        assert flag in help_text
