"""End to end: a model trained on digits, `clipkit index build` on the digits test split, the real server
(uvicorn, a free loopback port, an API key), searched over HTTP and through its page in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
from PIL import Image

from clipkit.retrieval import RetrievalIndex
from conftest import require_program, run_clipkit, subprocess_env
from test_serve_app import bad_requests, png_declaring

API_KEY = "e2e-test-key-7f3a"
MAX_UPLOAD_MB = 0.25
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

pytestmark = pytest.mark.slow  # trains a model (once per session) and starts a server and a browser


@pytest.fixture(scope="module")
def digits_index(digits_run, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("digits-index") / "index"
    result = run_clipkit(
        "index", "build", "--model", str(digits_run.run_dir), "--images", str(digits_run.data_dir / "test"),
        "--out", str(index_dir), "--batch-size", "128", "--workers", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"serve it with: clipkit serve --index {index_dir}" in result.stdout
    return index_dir


@contextlib.contextmanager
def running_server(index_dir: Path, log_path: Path, *args: str, **env: str):
    """`clipkit serve` on a free loopback port; yields (process, base URL); stops it with Ctrl-C."""
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "clipkit", "serve", "--index", str(index_dir), "--port", "0", *args],
            stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(**env),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (match := re.search(r"at (http://127\.0\.0\.1:\d+)/", log_path.read_text())):
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        base_url = match.group(1)
        while True:  # the message comes just before uvicorn starts answering
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        yield process, base_url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(digits_index, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    args = (
        "--api-key-env",
        "CLIPKIT_E2E_KEY",
        "--max-upload-mb",
        str(MAX_UPLOAD_MB),
        "--log-level",
        "warning",
    )
    with running_server(digits_index, log_path, *args, CLIPKIT_E2E_KEY=API_KEY) as (process, base_url):
        with httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
        ) as client:
            yield {"process": process, "client": client, "base_url": base_url, "log": log_path}
        assert process.poll() is None, "the server stopped during the tests"
    assert process.returncode == 0, log_path.read_text()[-3000:]  # Ctrl-C is a clean shutdown


@pytest.fixture(scope="module")
def labels(digits_index):
    """Image id -> digit, from the index's metadata (the shards' KEY.cls)."""
    index = RetrievalIndex(digits_index)
    records = index.records(range(index.count))
    index.close()
    return {i: r.metadata["label"] for i, r in records.items()}


def precision_at_10(client, labels, query: str, digit: int) -> float:
    response = client.post("/v1/search", json={"query": query, "k": 10})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 10
    return sum(labels[r["id"]] == digit for r in results) / 10


def training_summary(digits_run) -> str:
    """The trained model's final evaluation, for failure messages: a weak model fails here, not the server."""
    lines = (digits_run.run_dir / "metrics.jsonl").read_text().splitlines()
    return next(
        (line for line in reversed(lines) if "zeroshot/acc1" in line), "no evaluation in metrics.jsonl"
    )


def test_a_text_query_finds_the_digit_it_names(server, labels, digits_run):
    # Queries worded like the training captions ("a handwritten three."): the tiny model trained for a
    # minute on 1,257 digits knows those words, not arbitrary phrasings.
    precisions = [precision_at_10(server["client"], labels, f"a handwritten {name}", digit)
                  for digit, name in enumerate(DIGIT_NAMES)]  # fmt: skip
    assert precisions[3] >= 0.6, (precisions, training_summary(digits_run))  # chance: 0.1
    assert sum(precisions) / 10 >= 0.5, (precisions, training_summary(digits_run))


def test_an_uploaded_image_finds_itself_first(server, digits_run):
    client = server["client"]
    with tarfile.open(digits_run.data_dir / "test" / "0.tar") as tar:
        pngs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")][:40:8]
    for data in pngs:
        response = client.post("/v1/search/image", files={"image": ("digit.png", data)}, data={"k": "5"})
        assert response.status_code == 200, response.text
        best = response.json()["results"][0]
        assert best["score"] == pytest.approx(1.0, abs=1e-4)
        assert client.get(f"/v1/images/{best['id']}").content == data  # the very same file


def test_every_bad_request_gets_its_status_and_the_server_stays_up(server):
    client = server["client"]
    cases = bad_requests(
        max_upload=int(MAX_UPLOAD_MB * 2**20), too_many_pixels=png_declaring(7000)
    )  # 49 M > 40 M
    for name, (send, status) in cases.items():
        response = send(client)
        assert response.status_code == status, (name, response.text)
        assert client.get("/healthz").status_code == 200, name
        assert len(client.post("/v1/search", json={"query": "seven", "k": 2}).json()["results"]) == 2, name
    with httpx.Client(base_url=server["base_url"]) as anonymous:
        assert anonymous.post("/v1/search", json={"query": "seven"}).status_code == 401
        assert anonymous.get("/v1/images/0").status_code == 401
        assert anonymous.get("/healthz").status_code == 200


def test_64_concurrent_searches_all_succeed_in_shared_batches(server):
    async def search_all():
        limits = httpx.Limits(max_connections=64)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(
            base_url=server["base_url"], headers=headers, limits=limits, timeout=120
        ) as c:
            return await asyncio.gather(
                *(
                    c.post("/v1/search", json={"query": f"the number {DIGIT_NAMES[i % 10]}", "k": 5})
                    for i in range(64)
                )
            )

    before = batch_counts(server["client"])
    responses = asyncio.run(search_all())
    assert [r.status_code for r in responses] == [200] * 64
    assert all(len(r.json()["results"]) == 5 for r in responses)
    batches, queries = (now - then for now, then in zip(batch_counts(server["client"]), before, strict=True))
    assert queries == 64 and batches < 64  # some queries were encoded together


def batch_counts(client) -> tuple[float, float]:
    text = client.get("/metrics").text
    count = re.search(r'^clipkit_batch_size_count\{batcher="search"\} (\S+)$', text, re.M)
    total = re.search(r'^clipkit_batch_size_sum\{batcher="search"\} (\S+)$', text, re.M)
    return float(count.group(1)), float(total.group(1))


# ------------------------------------------------------------------------------------------------------------
# The search page in headless Chromium, driven over the Chrome DevTools protocol.

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,900",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
)  # fmt: skip


class DevToolsPage:
    """The smallest client of the DevTools protocol a test needs: calls, and the events seen meanwhile."""

    def __init__(self, websocket):
        self.websocket = websocket
        self.events: list[dict] = []
        self._next_id = 0

    def call(self, method: str, **params):
        self._next_id += 1
        self.websocket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.websocket.recv(timeout=60))
            if message.get("id") == self._next_id:
                assert "error" not in message, (method, message["error"])
                return message["result"]
            self.events.append(message)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for: {expression}"
            time.sleep(0.1)
        return value

    def type_text(self, text: str) -> None:
        self.call("Input.insertText", text=text)

    def press_enter(self) -> None:
        key = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}
        self.call("Input.dispatchKeyEvent", type="keyDown", text="\r", **key)
        self.call("Input.dispatchKeyEvent", type="keyUp", **key)


@contextlib.contextmanager
def headless_chromium(profile: Path):
    """A headless Chromium with a fresh profile; yields a DevToolsPage for its first tab."""
    from websockets.sync.client import connect

    binary = require_program("chromium", "chromium")
    process = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().split()) >= 2):
            assert process.poll() is None, "Chromium exited at start"
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            targets = json.load(answer)
        page_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        with connect(page_url, max_size=None, open_timeout=30) as websocket:
            yield DevToolsPage(websocket)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def api_ids(server, query: str, k: int) -> list[int]:
    response = server["client"].post("/v1/search", json={"query": query, "k": k})
    return [result["id"] for result in response.json()["results"]]


def compact(ids: list[int]) -> str:
    return json.dumps(ids, separators=(",", ":"))  # as JSON.stringify writes it


# The ids shown, once EXPECTED results are shown with their thumbnails loaded (falsy until then).
SHOWN_RESULTS = (
    "(() => { const figures = [...document.querySelectorAll('#results figure')];"
    " const imgs = figures.map(f => f.querySelector('img'));"
    " return figures.length === EXPECTED && imgs.every(i => i.complete && i.naturalWidth > 0)"
    " && figures.map(f => Number(f.dataset.id)); })()"
)


def test_the_search_page_shows_thumbnails_in_headless_chromium(server, labels, digits_run, tmp_path):
    with headless_chromium(tmp_path / "chromium-profile") as page:
        page.call("Log.enable")
        page.call("Runtime.enable")
        page.call(
            "Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False
        )
        page.call("Page.navigate", url=server["base_url"] + "/")
        page.wait_for("document.readyState === 'complete' && !!document.getElementById('query')")

        # The server wants a key: the first search says so and the page asks for it.
        page.evaluate("document.getElementById('query').focus()")
        page.type_text("a handwritten three")
        page.press_enter()
        page.wait_for("!document.getElementById('key-row').hidden")
        assert "API key" in page.evaluate("document.getElementById('status').textContent")
        page.evaluate("document.getElementById('api-key').focus()")
        page.type_text(API_KEY)
        page.press_enter()

        count = page.wait_for(
            "(() => { const imgs = [...document.querySelectorAll('#results figure img')];"
            " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0) && imgs.length; })()"
        )
        assert count == 24  # the page's default number of results
        shown = page.evaluate(
            "[...document.querySelectorAll('#results figure')].map(f => "
            "[Number(f.dataset.id), Number(f.querySelector('.score').textContent)])"
        )
        assert [score for _, score in shown] == sorted((score for _, score in shown), reverse=True)
        found = [labels[image_id] for image_id, _ in shown[:10]]
        assert found.count(3) >= 6, (found, training_summary(digits_run))
        assert "24 results" in page.evaluate("document.getElementById('status').textContent")
        # The search is in the URL, so it can be shared, bookmarked and reloaded.
        assert page.evaluate("location.search") == "?q=a+handwritten+three&k=24"

        # A shared link opens with its search done (the sign-in's HttpOnly cookie carries the key).
        page.call("Page.navigate", url=server["base_url"] + "/?q=a+photo+of+the+number+seven&k=10")
        sevens = page.wait_for(SHOWN_RESULTS.replace("EXPECTED", "10"))
        assert sevens == api_ids(server, "a photo of the number seven", 10)
        assert page.evaluate("document.getElementById('query').value") == "a photo of the number seven"
        assert page.evaluate("document.getElementById('k').value") == "10"
        page.evaluate("window.beforeReload = true")
        page.call("Page.reload")
        showing_sevens = f"JSON.stringify({SHOWN_RESULTS.replace('EXPECTED', '10')}) === '{compact(sevens)}'"
        page.wait_for("!window.beforeReload && " + showing_sevens)  # the reloaded page searched again
        # A new search from the form is a new history entry; Back shows the previous search again.
        page.evaluate("document.getElementById('query').select()")
        page.type_text("the number one")
        page.press_enter()
        page.wait_for("location.search === '?q=the+number+one&k=10'")
        ones = api_ids(server, "the number one", 10)
        page.wait_for(f"JSON.stringify({SHOWN_RESULTS.replace('EXPECTED', '10')}) === '{compact(ones)}'")
        page.evaluate("history.back()")
        page.wait_for("location.search === '?q=a+photo+of+the+number+seven&k=10'")
        page.wait_for(showing_sevens)
        assert page.evaluate("document.getElementById('query').value") == "a photo of the number seven"
        page.call("Page.navigate", url=server["base_url"] + "/?q=the+number+one&k=7")  # k not in the list
        assert len(page.wait_for(SHOWN_RESULTS.replace("EXPECTED", "7"))) == 7

        screenshot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
        errors = [
            e
            for e in page.events
            if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
        ]
        exceptions = [e for e in page.events if e.get("method") == "Runtime.exceptionThrown"]
    path = tmp_path / "search-page.png"
    path.write_bytes(screenshot)
    picture = Image.open(io.BytesIO(screenshot))
    assert picture.size == (1280, 900)
    assert not exceptions, exceptions
    # The first search's 401 is logged by the browser as a failed resource; nothing else may fail (e.g. CSP).
    assert all("401" in e["params"]["entry"].get("text", "") for e in errors), errors
