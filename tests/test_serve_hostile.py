"""The real server (`clipkit serve`, uvicorn on 127.0.0.1, default limits) under a hostile load: 200 connections
that never finish their headers, 16 clients uploading images as large as the server accepts, and normal
clients searching by text (scripts/bench_serve_hostile.py's load, for 12 s). The normal searches are all
answered, the slow connections are closed by the header timeout, and the server's memory stays bounded.

Every request loop is bounded in count and time, and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json

import pytest

from conftest import REPO_ROOT
from test_serve_app import collection  # noqa: F401 (a fixture)
from test_serve_e2e import running_server

SECONDS = 12  # longer than the default header timeout (10 s): every slow connection must have been closed
# The server's resident memory may grow by at most this over its idle size: 2 decode slots x (a 16.8 MP
# decode: 50 MB of RGB, and its conversions) + request bodies + allocator slack. Without the limits (16
# decodes at once) the same load grows it by more than 1 GB.
MEMORY_BOUND_MB = 600

pytestmark = pytest.mark.slow  # 12 s of load plus the server's start


def load_script():
    spec = importlib.util.spec_from_file_location(
        "bench_serve_hostile", REPO_ROOT / "scripts" / "bench_serve_hostile.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_searches_are_answered_and_memory_bounded_under_slow_connections_and_large_uploads(
    collection,  # noqa: F811
    tmp_path,
):
    bench = load_script()
    log = tmp_path / "server.log"
    with running_server(collection["root"] / "index", log, "--log-level", "warning") as (process, base_url):
        observed = asyncio.run(
            bench.hostile_load(
                base_url,
                process.pid,
                seconds=SECONDS,
                slow=200,
                uploaders=16,
                searchers=4,
                queries=[f"caption {i}" for i in range(24)],
            )  # fmt: skip
        )
        assert process.poll() is None, "the server stopped under load"
    figures = bench.summary(observed)
    print(json.dumps(figures))
    failed = [status for status, _ in observed["answers"] if status != 200]
    assert observed["answers"] and not failed, (len(failed), failed[:5], log.read_text()[-3000:])
    # Each slow connection was closed by the server's header timeout (10 s), none sooner.
    assert len(observed["closed"]) >= 200 and min(observed["closed"]) >= 9.5, sorted(observed["closed"])[:5]
    # The uploads were decoded a few at a time: the rest were told to come back (503), none failed otherwise.
    assert set(observed["uploads"]) <= {200, 503} and observed["uploads"].count(200) >= 2, figures
    assert figures["rss_growth_mb"] < MEMORY_BOUND_MB, figures
