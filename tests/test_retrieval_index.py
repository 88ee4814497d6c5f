"""The on-disk index: every source kind, search against a float64 reference, appends, atomic writes, model identity."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from clipkit.cli.main import main
from clipkit.errors import ClipkitError
from clipkit.models import build_model
from clipkit.retrieval import (
    RetrievalIndex,
    add_to_index,
    build_index,
    list_images,
    open_index,
    read_item_bytes,
    read_manifest,
)
from conftest import subprocess_env
from test_eval_datasets import encode, export_small_model, make_images, write_tar


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_small_model(tmp_path_factory.mktemp("model") / "small", seed=3)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    return export_small_model(tmp_path_factory.mktemp("model") / "other", seed=4)


def write_folder(root, images, *, fmt="png", captions=None):
    """Images spread over two levels of sub-folders, with a caption file beside some of them."""
    paths = []
    for i, image in enumerate(images):
        path = root / f"part{i % 3}" / ("deep" if i % 2 else "") / f"img{i:03d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(image, fmt))
        if captions is not None:
            path.with_suffix(".txt").write_text(captions[i] + "\n")
        paths.append(path)
    return paths


def reference_search(model_dir, images, query_texts, k):
    """Top-k ids and cosine scores by brute force in float64, embedding with open_clip's model directly."""
    bundle = build_model(model_dir)
    model = bundle.model.eval()
    with torch.no_grad():
        image_features = model.encode_image(
            torch.stack([bundle.eval_transform(im) for im in images])
        ).double()
        text_features = model.encode_text(bundle.tokenizer(query_texts)).double()
    image_features /= image_features.norm(dim=-1, keepdim=True)
    text_features /= text_features.norm(dim=-1, keepdim=True)
    scores = (text_features @ image_features.T).numpy()  # (Q, N)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def test_every_source_kind_lists_its_images_with_readable_bytes(tmp_path):
    images = make_images(7, seed=1)
    folder_paths = write_folder(tmp_path / "folder", images, captions=[f"caption {i}" for i in range(7)])
    (tmp_path / "folder" / "notes.md").write_text("not an image")
    items = list_images(tmp_path / "folder").items
    assert [item.uri for item in items] == sorted(
        p.relative_to(tmp_path / "folder").as_posix() for p in folder_paths
    )
    by_uri = {item.uri: item for item in items}
    for path in folder_paths:
        item = by_uri[path.relative_to(tmp_path / "folder").as_posix()]
        assert read_item_bytes(item.path, item.offset, item.length) == path.read_bytes()
        assert item.caption == f"caption {int(path.stem[3:])}"

    samples = [
        {
            "__key__": f"s{i:04d}",
            "jpg": encode(im, "jpg"),
            "txt": f"shard caption {i}".encode(),
            "cls": str(i).encode(),
        }
        for i, im in enumerate(images)
    ]
    samples[2]["json"] = json.dumps({"photographer": "ada"}).encode()
    write_tar(tmp_path / "shards" / "000.tar", samples[:4])
    write_tar(tmp_path / "shards" / "001.tar", samples[4:])
    for source in (
        tmp_path / "shards",
        str(tmp_path / "shards" / "{000..001}.tar"),
        str(tmp_path / "shards" / "*.tar"),
    ):
        listing = list_images(source)
        assert listing.skipped == []
        items = listing.items
        assert [item.uri for item in items] == [f"00{i // 4}.tar#s{i:04d}" for i in range(7)]
        for item, sample in zip(items, samples, strict=True):
            assert read_item_bytes(item.path, item.offset, item.length) == sample["jpg"]
            assert item.caption == sample["txt"].decode()
            assert item.metadata["label"] == int(sample["cls"])
        assert items[2].metadata["photographer"] == "ada"

    rows = [{"image": f"folder/{p.relative_to(tmp_path / 'folder').as_posix()}", "caption": f"row {i}", "source": "x"}
            for i, p in enumerate(folder_paths)]  # fmt: skip
    (tmp_path / "table.csv").write_text(
        "image,caption,source\n" + "".join(f"{r['image']},{r['caption']},{r['source']}\n" for r in rows)
    )
    (tmp_path / "table.jsonl").write_text(
        "".join(json.dumps({**r, "rating": i}) + "\n" for i, r in enumerate(rows))
    )
    for table, extra in (("table.csv", {}), ("table.jsonl", {"rating": 0})):
        items = list_images(tmp_path / table).items
        assert [item.uri for item in items] == [r["image"] for r in rows]
        assert (
            read_item_bytes(items[0].path, items[0].offset, items[0].length) == folder_paths[0].read_bytes()
        )
        assert items[0].caption == "row 0" and items[0].metadata == {"source": "x", **extra}


def test_flat_index_search_equals_a_float64_reference(model_dir, tmp_path):
    images = make_images(40, seed=2)
    paths = write_folder(tmp_path / "images", images, captions=[f"picture number {i}" for i in range(40)])
    report = build_index(tmp_path / "images", tmp_path / "index", model=model_dir, batch_size=16)
    assert (report.count, report.added, report.duplicates, report.skipped) == (40, 40, 0, [])

    index, encoder = open_index(tmp_path / "index")
    queries = ["a red square", "something blue", "picture number 3"]
    scores, ids = index.search(encoder.encode_texts(queries), 10)
    uris = [p.relative_to(tmp_path / "images").as_posix() for p in paths]
    records = index.records(range(40))
    # ids follow the sorted listing; map them back to the images they came from
    order = sorted(range(40), key=lambda i: uris[i])
    assert [records[i].uri for i in range(40)] == [uris[j] for j in order]
    ref_scores, ref_positions = reference_search(model_dir, [images[j] for j in order], queries, 10)
    np.testing.assert_array_equal(ids, ref_positions)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)

    record = records[5]
    source_path = tmp_path / "images" / record.uri
    assert record.sha256 == hashlib.sha256(source_path.read_bytes()).hexdigest()
    assert (record.width, record.height, record.media_type) == (40, 36, "image/png")
    assert record.caption == source_path.with_suffix(".txt").read_text().strip()
    assert record.length == source_path.stat().st_size and record.offset is None
    manifest = read_manifest(tmp_path / "index")
    assert manifest["count"] == 40 and manifest["kind"] == "flat" and manifest["dim"] == 32
    assert manifest["model"]["source"] == str(model_dir.resolve())
    index.close()


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_find_what_exact_search_finds(model_dir, tmp_path, kind):
    images = make_images(300, seed=5, size=(20, 20))
    write_folder(tmp_path / "images", images)
    build_index(tmp_path / "images", tmp_path / "exact", model=model_dir, batch_size=100)
    build_index(tmp_path / "images", tmp_path / kind, model=model_dir, kind=kind, batch_size=100)
    exact, encoder = open_index(tmp_path / "exact")
    approximate = RetrievalIndex(tmp_path / kind)
    queries = encoder.encode_texts([f"query {i}" for i in range(20)])
    _, exact_ids = exact.search(queries, 10)
    scores, ids = approximate.search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids, exact_ids, strict=True)])
    assert recall >= 0.95, recall
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    # The approximate index stores the same vectors
    np.testing.assert_allclose(approximate.reconstruct(7), exact.reconstruct(7), atol=1e-6)

    # Search settings can be changed when opening, without a rebuild; settings of another kind are refused.
    setting, other = ("ef_search", "nprobe") if kind == "hnsw" else ("nprobe", "ef_search")
    tuned = RetrievalIndex(tmp_path / kind, search_params={setting: 1})
    live = tuned.vectors.hnsw.efSearch if kind == "hnsw" else tuned.vectors.nprobe
    assert tuned.params[setting] == live == 1
    _, tuned_ids = tuned.search(queries, 10)
    tuned_recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(tuned_ids, exact_ids, strict=True)])
    assert tuned_recall < recall
    for bad_dir, params in (
        (tmp_path / kind, {other: 4}),
        (tmp_path / kind, {setting: 0}),
        (tmp_path / "exact", {setting: 4}),
    ):
        with pytest.raises(ClipkitError, match=f"{list(params)[0]}"):
            RetrievalIndex(bad_dir, search_params=params)


def test_add_appends_only_new_content_and_keeps_ids(model_dir, tmp_path):
    first, second = make_images(12, seed=6), make_images(8, seed=7)
    write_folder(tmp_path / "first", first)
    (tmp_path / "second").mkdir()
    for i, image in enumerate(second + first[:5]):  # five images already indexed, under new names
        (tmp_path / "second" / f"new{i:02d}.png").write_bytes(encode(image, "png"))
    (tmp_path / "second" / "zz-copy.png").write_bytes(
        encode(second[0], "png")
    )  # a duplicate within the source

    build_index(tmp_path / "first", tmp_path / "index", model=model_dir, batch_size=5)
    before = RetrievalIndex(tmp_path / "index")
    old_records, old_vectors = before.records(range(12)), [before.reconstruct(i) for i in range(12)]
    before.close()

    report = add_to_index(tmp_path / "index", tmp_path / "second", batch_size=4, workers=2)
    assert (report.count, report.added, report.duplicates) == (20, 8, 6)
    after, encoder = open_index(tmp_path / "index")
    assert after.records(range(12)) == old_records
    for i in range(12):
        np.testing.assert_array_equal(after.reconstruct(i), old_vectors[i])
    new = after.records(range(12, 20))
    assert sorted(r.uri for r in new.values()) == [f"new{i:02d}.png" for i in range(8)]
    expected = encoder.encode_images([second[3]])[0]
    np.testing.assert_allclose(after.reconstruct(next(i for i, r in new.items() if r.uri == "new03.png")), expected,
                               atol=1e-6)  # fmt: skip
    manifest = read_manifest(tmp_path / "index")
    assert [s["added"] for s in manifest["sources"]] == [12, 8] and manifest["generation"] == 2
    assert sorted(os.listdir(tmp_path / "index")) == [
        ".lock",
        "index.json",
        "metadata.2.sqlite",
        "vectors.2.faiss",
    ]

    again = add_to_index(tmp_path / "index", tmp_path / "second")
    assert (again.added, again.duplicates, again.count) == (0, 14, 20)
    assert read_manifest(tmp_path / "index")["generation"] == 2  # nothing new: nothing written


def test_undecodable_images_are_skipped_and_reported(model_dir, tmp_path, capsys):
    write_folder(tmp_path / "images", make_images(3, seed=8))
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    code = main(["index", "build", "--model", str(model_dir), "--images", str(tmp_path / "images"),
                 "--out", str(tmp_path / "index"), "--workers", "0"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "3 images (3 added, 0 already indexed, 1 undecodable image(s) skipped)" in captured.out
    assert read_manifest(tmp_path / "index")["sources"][0]["skipped"] == 1


def test_a_different_model_is_refused_in_one_line(model_dir, other_model_dir, tmp_path, capsys):
    write_folder(tmp_path / "images", make_images(4, seed=9))
    build_index(tmp_path / "images", tmp_path / "index", model=model_dir)
    with pytest.raises(ClipkitError, match="is not the model .* was built with"):
        open_index(tmp_path / "index", model=other_model_dir)
    for argv in (
        ["serve", "--index", str(tmp_path / "index"), "--model", str(other_model_dir), "--port", "0"],
        ["index", "add", "--index", str(tmp_path / "index"), "--images", str(tmp_path / "images"),
         "--model", str(other_model_dir)],
    ):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "fingerprint" in err and str(model_dir.resolve()) in err
    # The right model, named explicitly, is accepted
    index, _ = open_index(tmp_path / "index", model=f"local-dir:{model_dir}")
    assert index.count == 4
    # A config without weights builds a new random model each time: its index cannot be served again.
    build_index(tmp_path / "images", tmp_path / "random-index", model="tiny")
    with pytest.raises(ClipkitError, match="the same source now gives other weights"):
        open_index(tmp_path / "random-index")


@pytest.mark.parametrize(
    "case",
    ["missing source", "empty folder", "existing index", "non-empty out", "url in table", "no such column",
     "ivf too small", "no index", "bad batch size"],
)  # fmt: skip
def test_bad_input_is_one_clear_line(model_dir, tmp_path, capsys, case):
    images = tmp_path / "images"
    write_folder(images, make_images(3, seed=10))
    build_index(images, tmp_path / "built", model=model_dir)
    (tmp_path / "empty").mkdir()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("")
    (tmp_path / "urls.csv").write_text("image,caption\nhttps://example.com/a.jpg,a\n")
    build = ["index", "build", "--model", str(model_dir), "--workers", "0"]
    argv, expected = {
        "missing source": (build + ["--images", str(tmp_path / "nope"), "--out", str(tmp_path / "i")], "not found"),
        "empty folder": (build + ["--images", str(tmp_path / "empty"), "--out", str(tmp_path / "i")], "holds no images"),
        "existing index": (build + ["--images", str(images), "--out", str(tmp_path / "built")], "--overwrite"),
        "non-empty out": (build + ["--images", str(images), "--out", str(tmp_path / "busy")], "not empty"),
        "url in table": (build + ["--images", str(tmp_path / "urls.csv"), "--out", str(tmp_path / "i")], "local files"),
        "no such column": (
            build + ["--images", str(tmp_path / "urls.csv"), "--out", str(tmp_path / "i"), "--image-column", "path"],
            "no column 'path'",
        ),
        "ivf too small": (build + ["--images", str(images), "--out", str(tmp_path / "i"), "--index", "ivf"], "--index flat"),
        "no index": (["index", "add", "--index", str(tmp_path / "empty"), "--images", str(images)], "holds no index"),
        "bad batch size": (build + ["--images", str(images), "--out", str(tmp_path / "i"), "--batch-size", "0"],
                           "--batch-size"),
    }[case]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "i" / "index.json").exists()


def test_decoding_workers_give_the_same_index(model_dir, tmp_path):
    write_folder(tmp_path / "images", make_images(25, seed=11))
    build_index(tmp_path / "images", tmp_path / "serial", model=model_dir, batch_size=7, workers=0)
    build_index(tmp_path / "images", tmp_path / "parallel", model=model_dir, batch_size=7, workers=2)
    serial, parallel = RetrievalIndex(tmp_path / "serial"), RetrievalIndex(tmp_path / "parallel")
    assert serial.records(range(25)) == parallel.records(range(25))
    for i in range(25):
        np.testing.assert_array_equal(serial.reconstruct(i), parallel.reconstruct(i))


def start_index_command(tmp_path, *argv):
    return subprocess.Popen(
        [sys.executable, "-m", "clipkit", "index", *argv, "--batch-size", "1", "--workers", "0"],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as in a terminal, even when the tests run from a shell's background job (which ignores
        # SIGINT, and a child Python started with SIGINT ignored keeps ignoring it).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_staged_files(process, index_dir, timeout=120):
    """Until the writer has staged files in `index_dir` (it is then mid-write)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if index_dir.is_dir() and any(p.name.startswith(".tmp-") for p in index_dir.iterdir()):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError("the writer never staged its files")


def many_images(folder, count, seed):
    folder.mkdir(parents=True)
    for i, image in enumerate(make_images(count, seed=seed, size=(24, 24))):
        image.save(folder / f"{i:04d}.png")


@pytest.mark.slow  # two subprocess runs of a few hundred single-image batches each
def test_interrupted_writes_leave_the_index_as_it_was(model_dir, tmp_path):
    many_images(tmp_path / "many", 600, seed=12)
    write_folder(tmp_path / "few", make_images(5, seed=13))

    # Ctrl-C during a first build: no index, and no files left behind.
    build = start_index_command(tmp_path, "build", "--model", str(model_dir), "--images", str(tmp_path / "many"),
                                "--out", str(tmp_path / "index"))  # fmt: skip
    wait_for_staged_files(build, tmp_path / "index")
    build.send_signal(signal.SIGINT)
    _, err = build.communicate(timeout=60)
    assert build.returncode == 130, err
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [".lock"]
    with pytest.raises(ClipkitError, match="holds no index"):
        RetrievalIndex(tmp_path / "index")

    # A build into that folder works; then an add killed outright (no cleanup at all) changes nothing.
    build_index(tmp_path / "few", tmp_path / "index", model=model_dir)
    before = sorted(os.listdir(tmp_path / "index"))
    add = start_index_command(
        tmp_path, "add", "--index", str(tmp_path / "index"), "--images", str(tmp_path / "many")
    )
    wait_for_staged_files(add, tmp_path / "index")
    add.kill()
    add.communicate(timeout=60)
    assert add.returncode == -signal.SIGKILL
    leftovers = sorted(os.listdir(tmp_path / "index"))
    assert set(before) < set(leftovers)  # the killed writer's staged files are still there
    index = RetrievalIndex(tmp_path / "index")
    assert index.count == 5 and read_manifest(tmp_path / "index")["generation"] == 1
    index.close()

    # The next writer removes them and appends normally.
    report = add_to_index(tmp_path / "index", tmp_path / "few")
    assert report.added == 0
    write_folder(tmp_path / "more", make_images(2, seed=14))
    assert add_to_index(tmp_path / "index", tmp_path / "more").count == 7
    assert sorted(os.listdir(tmp_path / "index")) == [
        ".lock",
        "index.json",
        "metadata.2.sqlite",
        "vectors.2.faiss",
    ]


def test_shard_members_are_indexed_in_place(model_dir, tmp_path):
    images = make_images(6, seed=15)
    samples = [
        {"__key__": f"k{i}", "webp": encode(im, "webp"), "txt": f"cap {i}".encode()}
        for i, im in enumerate(images)
    ]
    write_tar(tmp_path / "shards" / "0.tar", samples)
    build_index(tmp_path / "shards", tmp_path / "index", model=model_dir)
    index = RetrievalIndex(tmp_path / "index")
    record = index.record(4)
    assert record.uri == "0.tar#k4" and record.caption == "cap 4" and record.media_type == "image/webp"
    with tarfile.open(tmp_path / "shards" / "0.tar") as tar:
        assert read_item_bytes(record.path, record.offset, record.length) == tar.extractfile("k4.webp").read()
    assert Image.open(io.BytesIO(read_item_bytes(record.path, record.offset, record.length))).size == (40, 36)


def test_an_open_index_keeps_answering_while_an_add_replaces_its_files(model_dir, tmp_path):
    write_folder(tmp_path / "first", make_images(6, seed=16))
    write_folder(tmp_path / "second", make_images(3, seed=17))
    build_index(tmp_path / "first", tmp_path / "index", model=model_dir)
    serving, encoder = open_index(tmp_path / "index")
    query = encoder.encode_texts(["anything"])
    before = serving.search(query, 6), serving.records(range(6))
    add_to_index(tmp_path / "index", tmp_path / "second")
    assert (tmp_path / "index" / "metadata.1.sqlite").exists()  # the generation it opened stays while open
    after = serving.search(query, 6), serving.records(range(6))
    np.testing.assert_array_equal(after[0][1], before[0][1])
    assert after[1] == before[1] and serving.count == 6
    assert RetrievalIndex(tmp_path / "index").count == 9
