"""What clipkit writes never destroys what it did not write: `--overwrite` replaces only a directory clipkit
wrote (its manifest present) and never one holding the input."""

from __future__ import annotations

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
