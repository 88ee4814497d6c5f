"""The README's "Retrieval" commands and Python example run as written (the port aside), on generated images."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from clipkit.models import build_model, export_model
from conftest import REPO_ROOT, require_program, subprocess_env
from test_eval_datasets import make_images


def readme_section() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    return readme.split("## Retrieval\n", 1)[1].split("\n## ", 1)[0]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", readme_section(), re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What the commands name: the Quickstart's tiny export, photos/ and more-photos/."""
    root = tmp_path_factory.mktemp("retrieval-readme")
    export_model(build_model("tiny"), root / "runs" / "tiny-export")
    for folder, seed in (("photos", 51), ("more-photos", 52)):
        (root / folder).mkdir()
        for i, image in enumerate(make_images(5, seed=seed)):
            image.save(root / folder / f"photo{i}.jpg")
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # three command-line runs and a server, each importing torch and open_clip
def test_readme_commands_run(workdir):
    build, add, serve = [line for line in blocks("bash")[0].splitlines() if line.strip()]
    for command in (build, add):
        result = subprocess.run(
            [sys.executable, "-m", "clipkit", *shlex.split(command)[1:]],
            cwd=workdir, env=subprocess_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, (command, result.stderr[-2000:])
    assert "10 images (5 added" in result.stdout

    # The README's port may be taken on a test machine: the server and the curl commands use a free one.
    port = str(free_port())
    argv = [port if arg == "8000" else arg for arg in shlex.split(serve)[1:]]
    server = subprocess.Popen(
        [sys.executable, "-m", "clipkit", *argv], cwd=workdir, env=subprocess_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        require_program("curl", "curl")
        outputs = []
        for command in (line for line in blocks("bash")[1].splitlines() if line.strip()):
            result = subprocess.run(
                shlex.split(command.replace(":8000/", f":{port}/")),
                cwd=workdir,
                capture_output=True,
                timeout=60,
            )
            assert result.returncode == 0, (command, result.stderr)
            outputs.append(result.stdout)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    assert server.returncode == 0
    text_hits, image_hits = (json.loads(output)["results"] for output in outputs[:2])
    assert json.loads(outputs[3]) == {"status": "ready"}
    assert json.loads(outputs[4]) == {"reloaded": False, "generation": 2, "images": 10}  # nothing newer
    assert len(text_hits) == 3 and image_hits[0]["uri"] == "photo0.jpg" and image_hits[0]["score"] > 0.999
    assert Image.open(io.BytesIO((workdir / "thumbnail.jpg").read_bytes())).size[0] <= 128


@pytest.mark.slow  # ~60 s: one process, a 2-process launch and an index build
def test_readme_embedding_commands_run(workdir):
    """`clipkit embed` in 1 and 2 processes writes the same embeddings; `--from-embeddings` indexes them."""
    import numpy as np

    (workdir / "conf").mkdir(exist_ok=True)  # the launch command names the repository's config
    (workdir / "conf" / "accelerate").symlink_to(REPO_ROOT / "conf" / "accelerate")
    for command in (line for line in blocks("bash")[2].splitlines() if line.strip()):
        program, *args = shlex.split(command)
        if program == "accelerate":  # `accelerate launch ARGS`
            launcher, args = ["-m", "accelerate.commands.launch"], args[1:]
        else:
            launcher = ["-m", "clipkit"]
        result = subprocess.run([sys.executable, *launcher, *args], cwd=workdir, env=subprocess_env(),
                                capture_output=True, text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, (command, result.stderr[-2000:])
    one, two = (
        np.load(workdir / name / "img_emb" / "img_emb_0000.npy")
        for name in ("photo-embeddings", "photo-embeddings-2")
    )
    np.testing.assert_allclose(one, two, atol=1e-6)
    manifest = json.loads((workdir / "big-index" / "index.json").read_text())
    assert manifest["count"] == 5 and manifest["kind"] == "flat" and manifest["tuning"]["recall_at_10"] == 1.0


def test_readme_python_example_runs(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    exec(compile(blocks("python")[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.count("photo") == 3
