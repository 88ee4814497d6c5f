"""Damaged shards in a collection: `clipkit embed` and `clipkit index build/add` keep the samples before the
damage, list the shard as skipped and carry on; a missing shard is still an error; the server answers a
shard changed after indexing with a clear status."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from clipkit.cli.main import main
from clipkit.errors import ClipkitError
from clipkit.retrieval import (
    RetrievalIndex,
    build_index,
    list_images,
    load_encoder,
    open_index,
    read_item_bytes,
)
from clipkit.retrieval.embed_job import embed_collection
from clipkit.serve import ServeConfig, create_app
from conftest import run_clipkit
from test_eval_datasets import encode, export_small_model, make_images, write_tar
from test_retrieval_embed import accelerate_launch, read_embeddings

PER_SHARD = 6
# shard name -> samples read intact before its damage (None: undamaged)
KEPT = {"000.tar": None, "001.tar": 3, "002.tar": 4, "003.tar": 0, "004.tar": 2, "005.tar": None}


def shard_samples(shard: int, images) -> list[dict]:
    return [{"__key__": f"s{shard}k{i}", "jpg": encode(images[shard * PER_SHARD + i], "jpg"),
             "txt": f"shard {shard} photo {i}".encode()} for i in range(PER_SHARD)]  # fmt: skip


def jpg_member(path: Path, key: str) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return tar.getmember(f"{key}.jpg")


def damage(path: Path) -> None:
    """001: cut mid-way through sample 3's image; 002: garbage over sample 4's first header; 003: zero
    bytes; 004: cut at sample 2's first header (no end-of-archive blocks)."""
    name = path.name
    if name == "001.tar":
        member = jpg_member(path, "s1k3")
        os.truncate(path, member.offset_data + member.size // 2)
    elif name == "002.tar":
        offset = jpg_member(path, "s2k4").offset
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(np.random.default_rng(0).integers(1, 256, 512, dtype=np.uint8).tobytes())
    elif name == "003.tar":
        os.truncate(path, 0)
    elif name == "004.tar":
        os.truncate(path, jpg_member(path, "s4k2").offset)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """`whole/`: six shards; `damaged/`: the same with four of them damaged; `intact/`: only the samples the
    damage left, as undamaged shards of the same names (what a good copy of those samples gives)."""
    root = tmp_path_factory.mktemp("bad_shards")
    images = make_images(6 * PER_SHARD, seed=31)
    kept_samples = {}
    for shard, (name, kept) in enumerate(KEPT.items()):
        samples = shard_samples(shard, images)
        write_tar(root / "whole" / name, samples)
        (root / "damaged").mkdir(exist_ok=True)
        shutil.copy(root / "whole" / name, root / "damaged" / name)
        damage(root / "damaged" / name)
        kept_samples[name] = samples if kept is None else samples[:kept]
        if kept_samples[name]:
            write_tar(root / "intact" / name, kept_samples[name])
    return {"root": root, "model_dir": export_small_model(root / "model", seed=32), "kept": kept_samples}


def expected_uris(kept: dict) -> list[str]:
    return [f"{name}#{s['__key__']}" for name, samples in kept.items() for s in samples]


def expected_skipped(root: Path) -> list[tuple[str, str]]:
    """(shard path, reason prefix): in listing order, each with how far it was read."""
    damaged = root / "damaged"
    return [
        (str(damaged / "001.tar"), "damaged shard skipped after 3 sample(s) (ReadError: unexpected end of data)"),
        (str(damaged / "002.tar"), f"damaged shard skipped after 4 sample(s) (corrupt tar header at byte "
                                   f"{jpg_member(root / 'whole' / '002.tar', 's2k4').offset})"),
        (str(damaged / "003.tar"), "damaged shard skipped whole (ReadError: empty file)"),
        (str(damaged / "004.tar"), f"damaged shard skipped after 2 sample(s) (truncated: the file ends at byte "
                                   f"{jpg_member(root / 'whole' / '004.tar', 's4k2').offset} without tar's "
                                   "end-of-archive block)"),
    ]  # fmt: skip


def test_listing_keeps_the_samples_before_the_damage_and_names_each_damaged_shard(collection):
    root, kept = collection["root"], collection["kept"]
    for source in (
        root / "damaged",
        str(root / "damaged" / "{000..005}.tar"),
        str(root / "damaged" / "*.tar"),
    ):
        listing = list_images(source)
        assert [item.uri for item in listing.items] == expected_uris(kept)
        samples = [s for name in kept for s in kept[name]]
        for item, sample in zip(listing.items, samples, strict=True):
            assert read_item_bytes(item.path, item.offset, item.length) == sample["jpg"]
            assert item.caption == sample["txt"].decode()
        assert listing.skipped == expected_skipped(root)
    one = list_images(root / "damaged" / "001.tar")
    assert [i.uri for i in one.items] == ["001.tar#s1k0", "001.tar#s1k1", "001.tar#s1k2"]
    assert one.skipped == expected_skipped(root)[:1]
    assert list_images(root / "whole").skipped == []


def test_a_missing_shard_or_a_wholly_damaged_source_is_a_one_line_error(collection, tmp_path):
    damaged = collection["root"] / "damaged"
    with pytest.raises(ClipkitError, match=r"^shard .*006\.tar \(from .*\) not found$"):
        list_images(str(damaged / "{000..006}.tar"))
    with pytest.raises(ClipkitError, match=r"^image source .*missing\.tar not found"):
        list_images(damaged / "missing.tar")
    (tmp_path / "bad").mkdir()
    shutil.copy(damaged / "003.tar", tmp_path / "bad" / "a.tar")
    (tmp_path / "bad" / "b.tar").write_bytes(b"\x01" * 2048)
    with pytest.raises(ClipkitError) as error:
        list_images(tmp_path / "bad")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'bad'} holds no readable images; 2 damaged shard(s), the first "
                              f"{tmp_path / 'bad' / 'a.tar'}: damaged shard skipped whole")  # fmt: skip


@pytest.fixture(scope="module")
def intact_embeddings(collection):
    """uri -> (vector, metadata row) of the undamaged copy of the intact samples, embedded in this process."""
    root = collection["root"]
    encoder, identity = load_encoder(collection["model_dir"])
    embed_collection(root / "intact", root / "intact_emb", encoder=encoder, identity=identity, part_size=5)
    vectors, rows = read_embeddings(root / "intact_emb")
    return {f"{row['shard']}#{row['key']}": (vector, row) for vector, row in zip(vectors, rows, strict=True)}


# The metadata columns that name the image's bytes and content (image_path differs: another folder).
SAME_COLUMNS = ("key", "shard", "offset", "length", "sha256", "media_type", "width", "height", "caption")


def test_clipkit_embed_embeds_the_intact_samples_and_lists_the_damaged_shards(
    collection, intact_embeddings, capsys
):
    root = collection["root"]
    out = root / "damaged_emb"
    result = run_clipkit("embed", "--model", str(collection["model_dir"]), "--images", str(root / "damaged"),
                         "--out", str(out), "--part-size", "5", "--workers", "0", OMP_NUM_THREADS="1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    vectors, rows = read_embeddings(out)
    uris = [f"{row['shard']}#{row['key']}" for row in rows]
    assert uris == expected_uris(collection["kept"])
    for vector, row, uri in zip(vectors, rows, uris, strict=True):
        reference_vector, reference_row = intact_embeddings[uri]
        np.testing.assert_allclose(vector, reference_vector, atol=1e-6)
        assert {k: row[k] for k in SAME_COLUMNS} == {k: reference_row[k] for k in SAME_COLUMNS}
    job = json.loads((out / "embeddings.json").read_text())
    assert job["embedded"] == len(uris) == 21
    assert [tuple(entry) for entry in job["skipped"]] == expected_skipped(root)
    damaged = root / "damaged"
    assert (f"21 images embedded in 5 part(s), 4 damaged shard(s) (re-copy {damaged / '001.tar'}, "
            f"{damaged / '002.tar'}, {damaged / '003.tar'} and 1 more) skipped, listed in {out}/embeddings.json"
            ) in result.stdout  # fmt: skip
    for shard, reason in expected_skipped(root):
        assert f"{shard}: {reason}; re-copy it from its source" in result.stderr

    # An index built from these embeddings reports the same skipped shards.
    assert main(["index", "build", "--from-embeddings", str(out), "--out", str(root / "from_emb")]) == 0
    assert "21 images (21 added, 0 already indexed, 4 damaged shard(s) (re-copy" in capsys.readouterr().out


def test_clipkit_index_build_indexes_the_intact_samples_and_add_takes_the_recopied_rest(
    collection, intact_embeddings, tmp_path, capsys
):
    root, model_dir = collection["root"], collection["model_dir"]
    index_dir = tmp_path / "index"
    code = main(["index", "build", "--model", str(model_dir), "--images", str(root / "damaged"),
                 "--out", str(index_dir), "--workers", "0", "--index", "flat"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "21 images (21 added, 0 already indexed, 4 damaged shard(s) (re-copy" in captured.out
    index = RetrievalIndex(index_dir)
    try:
        records = index.records(range(index.count))
        assert [records[i].uri for i in range(index.count)] == expected_uris(collection["kept"])
        for i in range(index.count):
            reference_vector, reference_row = intact_embeddings[records[i].uri]
            np.testing.assert_allclose(index.reconstruct(i), reference_vector, atol=1e-6)
            assert (records[i].sha256, records[i].caption) == (
                reference_row["sha256"],
                reference_row["caption"],
            )
        assert index.manifest["sources"][0]["skipped"] == 4
    finally:
        index.close()

    # The warning's advice: re-copy the damaged shards and add them; only what was missing is embedded.
    recopied = tmp_path / "recopied"
    shutil.copytree(root / "whole", recopied)
    code = main(["index", "add", "--index", str(index_dir), "--images", str(recopied), "--workers", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"{index_dir}: 36 images (15 added, 21 already indexed)" in captured.out


def test_a_missing_shard_in_a_pattern_stops_embed_and_index_build_before_anything_runs(
    collection, tmp_path, capsys
):
    damaged, model_dir = collection["root"] / "damaged", str(collection["model_dir"])
    pattern = str(damaged / "{000..006}.tar")
    error = f"error: shard {damaged / '006.tar'} (from {pattern}) not found"
    embed = run_clipkit("embed", "--model", model_dir, "--images", pattern, "--out", str(tmp_path / "emb"))
    assert embed.returncode == 2
    assert embed.stderr.strip().splitlines()[-1] == f"clipkit embed: {error}"
    code = main(["index", "build", "--model", model_dir, "--images", pattern, "--out", str(tmp_path / "i")])
    assert (code, capsys.readouterr().err.strip()) == (2, f"clipkit index: {error}")
    assert not (tmp_path / "emb").exists() and not (tmp_path / "i").exists()


@pytest.mark.slow  # ~20 s: a 2-process launch
def test_two_processes_list_the_damaged_collection_as_one_does(collection, intact_embeddings, tmp_path):
    root = collection["root"]
    result = accelerate_launch("--model", str(collection["model_dir"]), "--images", str(root / "damaged"),
                               "--out", str(tmp_path / "two"), "--part-size", "5", "--workers", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    vectors, rows = read_embeddings(tmp_path / "two")
    uris = [f"{row['shard']}#{row['key']}" for row in rows]
    assert uris == expected_uris(collection["kept"])  # every intact sample once
    np.testing.assert_allclose(vectors, np.stack([intact_embeddings[u][0] for u in uris]), atol=1e-6)
    job = json.loads((tmp_path / "two" / "embeddings.json").read_text())
    assert [tuple(entry) for entry in job["skipped"]] == expected_skipped(root)  # once, not once per process
    assert result.stderr.count(f"{root / 'damaged' / '001.tar'}: damaged shard skipped") == 1


def test_the_server_answers_404_for_a_shard_damaged_or_replaced_after_indexing(collection, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(collection["root"] / "whole", shards)
    build_index(shards / "000.tar", tmp_path / "index", model=collection["model_dir"], kind="flat")
    index, encoder = open_index(tmp_path / "index")
    last = index.record(PER_SHARD - 1)
    with TestClient(create_app(index, encoder, ServeConfig()), base_url="http://127.0.0.1") as client:
        assert client.get(f"/v1/images/{PER_SHARD - 1}").status_code == 200
        # Replaced by another shard of at least the same length: other bytes at the indexed offsets.
        shutil.copy(shards / "001.tar", shards / "000.tar")
        for size in ("", "?size=64"):
            response = client.get(f"/v1/images/0{size}")
            assert response.status_code == 404, response.headers
            assert response.json()["detail"] == "image 0 is no longer readable on the server"
        # Cut short before the last image.
        os.truncate(shards / "000.tar", last.offset)
        assert client.get(f"/v1/images/{PER_SHARD - 1}?size=64").status_code == 404
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.post("/v1/search", json={"query": "photo", "k": 3}).status_code == 200
    index.close()
