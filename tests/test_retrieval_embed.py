"""`clipkit embed` (one process and `accelerate launch -m clipkit.embed`), resuming a killed job, and indexes
built from its embeddings: their choice, tuning and appends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient

from clipkit.models import build_model
from clipkit.retrieval import (
    RetrievalIndex,
    add_to_index,
    build_index,
    build_index_from_embeddings,
    list_images,
    open_index,
    read_manifest,
)
from clipkit.retrieval.index_choice import (
    EF_SEARCH_STEPS,
    NPROBE_STEPS,
    choose_index,
    parse_memory,
    tune_search,
)
from clipkit.retrieval.store import apply_search_params, create_vector_index
from clipkit.serve import ServeConfig, create_app
from conftest import REPO_ROOT, run_clipkit, subprocess_env
from test_eval_datasets import encode, export_small_model, make_images, write_tar


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_small_model(tmp_path_factory.mktemp("model") / "small", seed=5)


def write_images(root: Path, count: int, *, seed: int, bad: bool = True) -> Path:
    """A folder of PNGs (captions beside some) and, with `bad`, one file that is not an image."""
    root.mkdir(parents=True)
    for i, image in enumerate(make_images(count, seed=seed)):
        (root / f"img{i:03d}.png").write_bytes(encode(image, "png"))
        if i % 3 == 0:
            (root / f"img{i:03d}.txt").write_text(f"caption {i}")
    if bad:
        (root / "broken.png").write_bytes(b"not an image")
    return root


def read_embeddings(out: Path) -> tuple[np.ndarray, list[dict]]:
    """Every part in file-name order, as clip-retrieval's and autofaiss's readers take them."""
    npys = sorted((out / "img_emb").glob("img_emb_*.npy"))
    parquets = sorted((out / "metadata").glob("metadata_*.parquet"))
    assert [p.stem[len("img_emb_") :] for p in npys] == [p.stem[len("metadata_") :] for p in parquets]
    vectors = np.concatenate([np.load(p) for p in npys])
    rows = [row for p in parquets for row in pq.read_table(p).to_pylist()]
    assert len(vectors) == len(rows)
    return vectors, rows


def reference_embeddings(model_dir: Path, source: Path) -> dict[str, np.ndarray]:
    """uri -> the image's embedding by open_clip's model directly (float64, normalised)."""
    from PIL import Image

    bundle = build_model(model_dir)
    model = bundle.model.eval()
    out = {}
    for item in list_images(source).items:
        try:
            image = Image.open(item.path).convert("RGB")
        except Exception:
            continue
        with torch.no_grad():
            features = model.encode_image(bundle.eval_transform(image)[None]).double()[0]
        out[item.uri] = (features / features.norm()).numpy()
    return out


def accelerate_launch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(REPO_ROOT / "conf/accelerate/cpu-2proc.yaml"), "-m", "clipkit.embed", *args]  # fmt: skip
    return subprocess.run(command, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)  # fmt: skip


@pytest.mark.slow  # ~40 s: a 2-process launch and a 1-process run
def test_two_processes_embed_what_one_process_embeds_each_image_once(model_dir, tmp_path):
    source = write_images(tmp_path / "images", 23, seed=1)
    common = ["--model", str(model_dir), "--images", str(source), "--part-size", "4", "--workers", "0"]
    one = run_clipkit("embed", *common, "--out", str(tmp_path / "one"), OMP_NUM_THREADS="1")
    assert one.returncode == 0, one.stderr
    two = accelerate_launch(*common, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    assert "this process did 3 part(s)" in two.stdout  # rank 0 took parts 0, 2, 4 of 6

    vectors_one, rows_one = read_embeddings(tmp_path / "one")
    vectors_two, rows_two = read_embeddings(tmp_path / "two")
    assert rows_two == rows_one
    np.testing.assert_allclose(vectors_two, vectors_one, atol=1e-6)
    uris = [row["key"] for row in rows_two]
    assert sorted(uris) == [f"img{i:03d}.png" for i in range(23)]  # every image once, the broken one not
    reference = reference_embeddings(model_dir, source)
    np.testing.assert_allclose(vectors_two, np.stack([reference[u] for u in uris]), atol=1e-5)
    captions = {row["key"]: row["caption"] for row in rows_two}
    assert captions["img003.png"] == "caption 3" and captions["img004.png"] is None
    job = json.loads((tmp_path / "two" / "embeddings.json").read_text())
    assert job["complete"] and job["embedded"] == 23 and job["dim"] == vectors_two.shape[1]
    assert [uri for uri, _ in job["skipped"]] == ["broken.png"]
    assert job["model"]["fingerprint"] == json.loads((tmp_path / "one" / "embeddings.json").read_text())[
        "model"]["fingerprint"]  # fmt: skip


@pytest.mark.slow  # ~35 s: two runs of a 90-image job
def test_a_killed_job_restarted_embeds_each_image_once(model_dir, tmp_path):
    source = write_images(tmp_path / "images", 90, seed=2, bad=False)
    out = tmp_path / "emb"
    args = ["embed", "--model", str(model_dir), "--images", str(source), "--out", str(out),
            "--part-size", "3", "--workers", "0", "--batch-size", "3"]  # fmt: skip
    job = subprocess.Popen([sys.executable, "-m", "clipkit", *args], env=subprocess_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "img_emb").glob("img_emb_*.npy"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(job.pid, signal.SIGKILL)
    finally:
        job.wait()
    finished_before = {p.name: p.stat().st_mtime_ns for p in (out / "img_emb").glob("img_emb_*.npy")}
    assert 2 <= len(finished_before) < 30, "the job was not stopped mid-way"
    assert not json.loads((out / "embeddings.json").read_text())["complete"]
    # What a writer killed between its two renames leaves: a renamed parquet and a temporary .npy.
    (out / "img_emb" / ".tmp-img_emb_0029.npy").write_bytes(b"partial")

    again = run_clipkit(*args)
    assert again.returncode == 0, again.stderr
    vectors, rows = read_embeddings(out)
    assert sorted(row["key"] for row in rows) == [f"img{i:03d}.png" for i in range(90)]
    assert not list(out.rglob(".tmp-*"))
    for name, mtime in finished_before.items():  # finished parts were kept, not redone
        assert (out / "img_emb" / name).stat().st_mtime_ns == mtime
    reference = reference_embeddings(model_dir, source)
    np.testing.assert_allclose(vectors, np.stack([reference[row["key"]] for row in rows]), atol=1e-5)
    assert json.loads((out / "embeddings.json").read_text())["complete"]


def test_an_index_from_embeddings_serves_like_one_built_from_images(model_dir, tmp_path):
    images = make_images(20, seed=3)
    samples = [{"__key__": f"k{i:02d}", "jpg": encode(im, "jpg"), "txt": f"photo {i}".encode(),
                "json": json.dumps({"n": i}).encode()} for i, im in enumerate(images)]  # fmt: skip
    samples.append({"__key__": "k05dup", "jpg": samples[5]["jpg"]})  # same content: indexed once
    write_tar(tmp_path / "shards" / "a.tar", samples[:11])
    write_tar(tmp_path / "shards" / "b.tar", samples[11:])
    source = tmp_path / "shards"
    assert run_clipkit("embed", "--model", str(model_dir), "--images", str(source), "--out",
                       str(tmp_path / "emb"), "--part-size", "6").returncode == 0  # fmt: skip
    rows = read_embeddings(tmp_path / "emb")[1]
    assert (rows[0]["key"], rows[0]["shard"]) == ("k00", "a.tar")
    # clip-retrieval's columns: no image_path for a shard sample (its back end would open the tar as an image),
    # KEY.json's fields as columns; where the bytes are in clipkit's own columns.
    assert "image_path" not in rows[0] and rows[0]["n"] == 0 and rows[0]["offset"] > 0
    assert rows[0]["shard_path"] == str((source / "a.tar").resolve())

    built = run_clipkit(
        "index", "build", "--from-embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "from_emb")
    )
    assert built.returncode == 0, built.stderr
    build_index(source, tmp_path / "from_images", model=model_dir)
    a, b = RetrievalIndex(tmp_path / "from_emb"), RetrievalIndex(tmp_path / "from_images")
    try:
        assert a.count == b.count == 20
        assert a.model == b.model
        assert a.records(range(20)) == b.records(
            range(20)
        )  # uri, path, offset, sha256, caption, metadata ...
    finally:
        a.close(), b.close()

    responses = []
    for name in ("from_emb", "from_images"):
        index, encoder = open_index(tmp_path / name)  # the model the index records
        with TestClient(create_app(index, encoder, ServeConfig()), base_url="http://127.0.0.1") as client:
            found = [client.post("/v1/search", json={"query": f"photo {i}", "k": 5}).json()["results"]
                     for i in range(4)]  # fmt: skip
            image = client.get("/v1/images/7")
            responses.append((found, image.content, image.headers["content-type"]))
        index.close()
    (found_a, bytes_a, type_a), (found_b, bytes_b, type_b) = responses
    assert [[(r["id"], r["uri"]) for r in q] for q in found_a] == [
        [(r["id"], r["uri"]) for r in q] for q in found_b
    ]
    for qa, qb in zip(found_a, found_b, strict=True):
        np.testing.assert_allclose([r["score"] for r in qa], [r["score"] for r in qb], atol=1e-5)
    assert bytes_a == bytes_b == samples[7]["jpg"] and type_a == type_b == "image/jpeg"


def test_an_unfinished_or_foreign_embeddings_folder_is_refused(model_dir, tmp_path, capsys):
    from clipkit.cli.main import main

    source = write_images(tmp_path / "images", 5, seed=4, bad=False)
    out = tmp_path / "emb"
    assert (
        main(
            ["embed", "--model", str(model_dir), "--images", str(source), "--out", str(out), "--workers", "0"]
        )
        == 0
    )
    job = json.loads((out / "embeddings.json").read_text())
    (out / "embeddings.json").write_text(json.dumps({**job, "complete": False}))
    capsys.readouterr()
    assert main(["index", "build", "--from-embeddings", str(out), "--out", str(tmp_path / "idx")]) == 2
    assert "unfinished `clipkit embed` job; rerun the same command" in capsys.readouterr().err
    assert main(["embed", "--model", str(model_dir), "--images", str(source), "--out", str(out),
                 "--part-size", "2"]) == 2  # fmt: skip
    assert "part_size=10000, this one has 2" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------
# Index choice and tuning


def test_index_choice_follows_size_and_memory():
    dim = 128
    assert choose_index(500, dim, max_memory=parse_memory("8GiB")).kind == "flat"
    assert choose_index(5_000, dim, max_memory=parse_memory("8GiB")).kind == "hnsw"
    roomy = choose_index(1_000_000, dim, max_memory=parse_memory("8GiB"))
    assert (roomy.kind, roomy.params["m"]) == ("hnsw", 32)
    # 4 (D + 2 M) bytes a vector: 600 MB fits M = 11 links for 1M vectors of 128.
    assert choose_index(1_000_000, dim, max_memory=parse_memory("600MB")).params["m"] == 11
    # HNSW with 8 links would take 288 MB; IVF-Flat takes 4 D + 8 bytes a vector (260 MB) + 2048 centroids.
    tight = choose_index(500_000, dim, max_memory=parse_memory("270MB"))
    assert tight.kind == "ivf" and tight.params["nlist"] == 2048 and not tight.params.get("mmap")
    compressed = choose_index(2_000_000, dim, max_memory=parse_memory("200MB"))
    assert (
        compressed.kind == "ivfpq" and compressed.params["pq"] == 64
    )  # 72 bytes a vector: 144 MB + centroids
    on_disk = choose_index(2_000_000, dim, max_memory=parse_memory("10MB"))
    assert on_disk.kind == "ivf" and on_disk.params["mmap"]
    for choice, budget in ((roomy, "8GiB"), (tight, "270MB"), (compressed, "200MB"), (on_disk, "10MB")):
        assert choice.estimated_bytes <= parse_memory(budget)
    assert parse_memory("1.5GB") == 1_500_000_000 and parse_memory("2GiB") == 2 * 1024**3


def clustered_vectors(count: int, dim: int, *, seed: int) -> np.ndarray:
    """Normalised points around 200 centres: neighbourhoods like embeddings have, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(200, dim))
    points = centres[rng.integers(0, 200, size=count)] + 0.6 * rng.normal(size=(count, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
    "kind", ["hnsw", "ivf", pytest.param("ivfpq", marks=pytest.mark.slow)]
)  # ivfpq: ~50 s
def test_tuning_picks_the_smallest_setting_that_reaches_the_target_recall(kind):
    from clipkit.retrieval.index_choice import params_for

    count = 4_000 if kind == "ivfpq" else 20_000  # OPQ training is slow
    vectors, queries = np.split(clustered_vectors(count + 300, 32, seed=0), [count])  # queries: never indexed
    params = params_for(kind, len(vectors), 32)
    index = create_vector_index(kind, 32, vectors, params)
    target = 0.8 if kind == "ivfpq" else 0.95  # 16-byte codes of 32 dims cap what ivfpq reaches (0.88)
    searched, record = tune_search(index, kind, vectors, target_recall=target)
    name, steps = ("ef_search", EF_SEARCH_STEPS) if kind == "hnsw" else ("nprobe", NPROBE_STEPS)
    assert record["reached"] and record["recall_at_10"] >= target

    # Recall on other queries (not indexed at all) against float64 brute force, at the tuned setting.
    exact = np.argsort(-(queries.astype(np.float64) @ vectors.T.astype(np.float64)), axis=1)[:, :10]
    apply_search_params(index, kind, searched)
    found = index.search(queries, 10)[1]
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
    assert recall >= target - 0.03
    # The ladder up to the first step that reaches the target, then a bisection below it: every setting tried
    # under the tuned one fell short, so it is the smallest that reaches it (to within 1/16).
    tried = [value for value, _ in record["tried"]]
    ladder = [s for s in steps if s in tried]
    assert tried[: len(ladder)] == ladder == [s for s in steps if s <= ladder[-1]]
    assert record["tried"][len(ladder) - 1][1] >= target
    assert all(recall < target for value, recall in record["tried"] if value < searched[name])
    assert dict(map(tuple, record["tried"]))[searched[name]] == record["recall_at_10"]
    short = [v for v in tried if v < searched[name]]
    assert not short or searched[name] - max(short) <= max(1, max(short) // 16)


def test_tuning_queries_are_the_collections_captions_encoded_by_its_model(model_dir, tmp_path):
    from clipkit.retrieval import load_encoder

    captioned, bare = tmp_path / "captioned", tmp_path / "bare"
    for folder in (captioned, bare):
        folder.mkdir()
    for i, image in enumerate(make_images(60, seed=21)):
        (captioned / f"img{i:03d}.png").write_bytes(encode(image, "png"))
        (captioned / f"img{i:03d}.txt").write_text(f"photo number {i % 30}")  # 30 distinct captions
        (bare / f"img{i:03d}.png").write_bytes(encode(image, "png"))
    build_index(captioned, tmp_path / "idx", model=model_dir, kind="hnsw")
    tuning = read_manifest(tmp_path / "idx")["tuning"]
    by_queries = tuning["recall_at_10_by_queries"]
    assert set(by_queries) == {"indexed, held out", "30 captions of the collection, encoded by its model"}

    # The recorded caption recall is the recall of those captions, encoded by the model, against float64
    # brute force over the indexed vectors, at the tuned setting.
    encoder, _ = load_encoder(model_dir)
    queries = encoder.encode_texts([f"photo number {i}" for i in range(30)]).astype(np.float64)  # (30, D)
    index = RetrievalIndex(tmp_path / "idx")
    try:
        vectors = np.stack([index.reconstruct(i) for i in range(index.count)]).astype(np.float64)  # (60, D)
        exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
        found = index.search(queries.astype(np.float32), 10)[1]
    finally:
        index.close()
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
    assert by_queries["30 captions of the collection, encoded by its model"] == pytest.approx(
        recall, abs=0.0034
    )

    # From embeddings, the model the embeddings name encodes the captions; without captions, the stand-in.
    assert run_clipkit("embed", "--model", str(model_dir), "--images", str(captioned), "--out",
                       str(tmp_path / "emb")).returncode == 0  # fmt: skip
    built = run_clipkit("index", "build", "--from-embeddings", str(tmp_path / "emb"), "--out",
                        str(tmp_path / "from_emb"), "--index", "hnsw")  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert read_manifest(tmp_path / "from_emb")["tuning"]["recall_at_10_by_queries"] == by_queries
    build_index(bare, tmp_path / "bare_idx", model=model_dir, kind="hnsw")
    assert set(read_manifest(tmp_path / "bare_idx")["tuning"]["recall_at_10_by_queries"]) == {
        "indexed, held out",
        "70 degrees off the collection",
    }


def test_an_ivf_index_is_retrained_when_appends_outgrow_its_clusters(model_dir, tmp_path):
    write_images(tmp_path / "first", 40, seed=5, bad=False)
    write_images(tmp_path / "more", 130, seed=6, bad=False)
    write_images(tmp_path / "few", 20, seed=7, bad=False)
    build_index(tmp_path / "first", tmp_path / "idx", model=model_dir, kind="ivf")
    first = read_manifest(tmp_path / "idx")
    assert (first["params"]["nlist"], first["params"]["trained_on"]) == (1, 40)
    add_to_index(tmp_path / "idx", tmp_path / "more")  # 40 -> 170 vectors: 4x what the clusters saw
    grown = read_manifest(tmp_path / "idx")
    assert (grown["params"]["nlist"], grown["params"]["trained_on"], grown["count"]) == (4, 170, 170)
    assert grown["tuning"]["reached"]
    add_to_index(tmp_path / "idx", tmp_path / "few")  # 190 < 4 x 170: clusters kept
    kept = read_manifest(tmp_path / "idx")
    assert (kept["params"]["nlist"], kept["params"]["trained_on"], kept["count"]) == (4, 170, 190)

    index = RetrievalIndex(tmp_path / "idx", search_params={"nprobe": 4})  # every cluster: exact
    try:
        stored = np.stack([index.reconstruct(i) for i in range(190)])
        exact = faiss.IndexFlatIP(stored.shape[1])
        exact.add(stored)
        np.testing.assert_array_equal(index.search(stored[:20], 5)[1], exact.search(stored[:20], 5)[1])
        assert [index.record(i).uri for i in (0, 40, 170)] == ["img000.png", "img000.png", "img000.png"]
    finally:
        index.close()


def test_a_collection_over_the_memory_budget_is_searched_from_disk(model_dir, tmp_path):
    """12,000 embeddings with 100 kB to spare: no compressed code fits, so an IVF index is memory-mapped."""
    import hashlib

    from clipkit.retrieval import load_encoder
    from clipkit.retrieval.parts import write_job, write_part

    _, identity = load_encoder(model_dir)
    vectors = clustered_vectors(12_000, identity["embed_dim"], seed=3)
    image = tmp_path / "one.png"
    image.write_bytes(encode(make_images(1, seed=8)[0], "png"))
    rows = [{"key": f"v{i}", "shard": None, "image_path": str(image), "offset": None, "length": image.stat().st_size,
             "sha256": hashlib.sha256(b"%d" % i).hexdigest(), "media_type": "image/png", "width": 40, "height": 36,
             "caption": None, "metadata": "{}"} for i in range(len(vectors))]  # fmt: skip
    emb = tmp_path / "emb"
    for part in range(2):
        write_part(
            emb, part, vectors[part * 6000 : (part + 1) * 6000], rows[part * 6000 : (part + 1) * 6000], []
        )
    write_job(emb, {"format": "clipkit-embeddings", "version": 1, "model": identity, "dim": identity["embed_dim"],
                    "source": "synthetic", "images": 12_000, "part_size": 6000, "parts": 2, "complete": True,
                    "embedded": 12_000, "skipped": []})  # fmt: skip

    build_index_from_embeddings(emb, tmp_path / "idx", max_memory="100kB")
    manifest = read_manifest(tmp_path / "idx")
    assert manifest["kind"] == "ivf" and manifest["params"]["mmap"] and manifest["tuning"]["reached"]
    index = RetrievalIndex(tmp_path / "idx", search_params={"nprobe": manifest["params"]["nlist"]})
    try:
        assert isinstance(index.vectors, faiss.IndexIVFFlat) and index.count == 12_000
        queries = vectors[:50]
        np.testing.assert_array_equal(
            index.search(queries, 10)[1], np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
        )
        assert index.record(11_999).uri == "v11999"
    finally:
        index.close()
