"""What clipkit writes never destroys what it did not write: `--overwrite` replaces only a directory clipkit
wrote (its manifest present) and never one holding the input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clipkit.cli.main import main
from clipkit.models import build_model, export_model


@pytest.fixture(scope="module")
def tiny_bundle():
    return build_model("tiny")


@pytest.fixture
def project(tiny_bundle, tmp_path) -> Path:
    """A project directory: its data and an exported model (the source of the exports below)."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "00000.tar").write_bytes(b"shards")
    export_model(tiny_bundle, project / "model")
    return project


def clipkit(*args: str, capsys) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def files_under(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("out", ["..", "."], ids=["parent of the source", "the source itself"])
def test_export_refuses_an_out_holding_the_source(project, out, capsys):
    before = files_under(project)
    target = (project / "model" / out).resolve()
    code, err = clipkit("export", str(project / "model"), "--out", str(target), "--overwrite", capsys=capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "holds the source" in err
    assert files_under(project) == before


@pytest.mark.parametrize("fmt", ["open_clip", "hf"])
def test_overwrite_refuses_a_directory_clipkit_did_not_write(project, tmp_path, fmt, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, err = clipkit(
        "export", str(project / "model"), "--out", str(mine), "--format", fmt, "--overwrite", capsys=capsys
    )
    assert code == 2 and "is not a model export clipkit wrote" in err
    assert (mine / "thesis.tex").read_text() == "years of work"
    # A look-alike holding the manifest beside a sub-directory (a run, a project) is not an export either.
    (mine / "open_clip_config.json").write_text("{}")
    (mine / "open_clip_model.safetensors").write_text("")
    (mine / "checkpoints").mkdir()
    code, err = clipkit("export", str(project / "model"), "--out", str(mine), "--overwrite", capsys=capsys)
    assert code == 2 and "is not a model export clipkit wrote" in err
    assert (mine / "thesis.tex").exists() and (mine / "checkpoints").is_dir()


def test_overwrite_replaces_an_earlier_export(project, tmp_path, capsys):
    out = tmp_path / "exported"
    for _ in range(2):
        code, err = clipkit("export", str(project / "model"), "--out", str(out), "--overwrite", capsys=capsys)
        assert code == 0, err
    assert files_under(out) == files_under(project / "model")


def test_shards_overwrite_refuses_the_input_and_foreign_directories(tmp_path, capsys):
    photos = tmp_path / "photos"
    for label in ("cat", "dog"):
        (photos / label).mkdir(parents=True)
        (photos / label / "1.jpg").write_bytes(b"not looked at")
    before = files_under(tmp_path)
    code, err = clipkit("shards", str(photos), "--out", str(tmp_path), "--overwrite", capsys=capsys)
    assert code == 2 and "holds the source" in err
    code, err = clipkit("shards", "digits", "--out", str(photos), "--overwrite", capsys=capsys)
    assert code == 2 and "is not a shard directory clipkit wrote" in err
    assert files_under(tmp_path) == before


# -- credentials never written --------------------------------------------------------------------------
SECRET = "s3cr3t-Pa55"


@pytest.fixture
def authenticated_shard_server(tmp_path):
    """An HTTP server that serves `/0.tar` only with the basic-auth credentials user:SECRET."""
    import base64
    import http.server
    import threading

    from clipkit.configs import cache_dir
    from clipkit.data.prepare import ensure_generated

    # conf/data/digits.yaml's dataset, where the run looks for it (the session's CLIPKIT_CACHE)
    digits = ensure_generated(
        {"name": "digits", "dir": str(cache_dir() / "datasets" / "digits-seed0-32px"), "seed": 0,
         "test_fraction": 0.3, "image_size": 32}
    )  # fmt: skip
    tar = (digits / "test" / "0.tar").read_bytes()  # captioned images: retrieval evaluation reads them
    expected = "Basic " + base64.b64encode(f"user:{SECRET}".encode()).decode()
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            ok = self.path == "/0.tar" and self.headers.get("Authorization") == expected
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(tar) if ok else 0))
            self.end_headers()
            if ok:
                self.wfile.write(tar)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://user:{SECRET}@127.0.0.1:{server.server_port}/0.tar", digits, seen
    server.shutdown()


@pytest.mark.slow  # a short training run, then an export
def test_a_run_on_credentialed_shards_writes_no_credentials(authenticated_shard_server, tmp_path):
    from conftest import run_clipkit, subprocess_env

    url, digits, seen = authenticated_shard_server
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "clipkit.train", "experiment=digits", "train.steps=2", "train.eval_every=0",
         "data.workers=0", "data.batch_size=16", "data.zeroshot_dataset=null", f"data.val_shards={url}",
         f"output_dir={run}"],
        env=subprocess_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert seen and all(seen), "the run fetched the shards with the credentials"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("retrieval/") for r in records for k in r), (
        "the credentialed shards were evaluated"
    )
    result = run_clipkit("export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr[-3000:]
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "127.0.0.1" in card and "***@" in card  # the card still says where the data came from
    config = (run / "config.yaml").read_text()
    assert "***@127.0.0.1" in config
    for directory in (run, tmp_path / "hf"):
        for path in directory.rglob("*"):
            assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


def test_redaction_of_urls_and_commands():
    from clipkit.redaction import redact, redact_text

    cases = {
        "https://user:pw@host/s/{0..9}.tar": "https://***@host/s/{0..9}.tar",
        "pipe:curl -s -H 'Authorization: Bearer pw' https://host/a.tar": "pipe:curl -s -H 'Authorization: ***' https://host/a.tar",
        'pipe:curl --header "X-Api-Key: pw" s3://b/a.tar': 'pipe:curl --header "X-Api-Key: ***" s3://b/a.tar',
        "pipe:curl -u alice:pw https://host/a.tar": "pipe:curl -u *** https://host/a.tar",
        "https://b.s3.amazonaws.com/a.tar?X-Amz-Signature=pw&X-Amz-Date=1": "https://b.s3.amazonaws.com/a.tar?X-Amz-Signature=***&X-Amz-Date=1",
        "https://a.blob.core.windows.net/c/a.tar?sv=1&sig=pw": "https://a.blob.core.windows.net/c/a.tar?sv=1&sig=***",
        "https://hf.co/d/resolve/main/0.tar?token=pw": "https://hf.co/d/resolve/main/0.tar?token=***",
        "/data/{000..009}.tar::s3://bucket/{0..9}.tar": "/data/{000..009}.tar::s3://bucket/{0..9}.tar",
        "hf-hub:timm/ViT-B-16-SigLIP": "hf-hub:timm/ViT-B-16-SigLIP",
    }  # fmt: skip
    for given, expected in cases.items():
        assert redact_text(given) == expected
        assert redact_text(expected) == expected  # idempotent: a redacted record stays comparable
    assert redact({"data": ["https://u:pw@h/x.tar", 3]}) == {"data": ["https://***@h/x.tar", 3]}
