"""clipkit and clip-retrieval's tools both ways: `clipkit embed` writes clip-retrieval's metadata columns (and
indexes still build from the older layout), `clipkit index build --from-embeddings` reads clip-retrieval's
inference output, and `clipkit serve` answers clip-retrieval's /knn-service as its back end does.

The tests at the end run the real tools (clip-retrieval 2.45, autofaiss 2.18, img2dataset 1.47) in their own
virtualenv (scripts/interop/make_venv.sh, built once per machine; they pin numpy < 2)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from clipkit.retrieval import (
    RetrievalIndex,
    build_index,
    build_index_from_embeddings,
    list_images,
    load_encoder,
    open_index,
)
from clipkit.retrieval.embed import embed_items
from clipkit.serve import ServeConfig, create_app
from conftest import REPO_ROOT, run_clipkit, subprocess_env
from test_eval_datasets import encode, export_small_model, make_images, write_tar
from test_retrieval_embed import read_embeddings


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_small_model(tmp_path_factory.mktemp("model") / "small", seed=5)


def img2dataset_like_shards(root: Path, count: int, *, seed: int) -> list[dict]:
    """Two shards laid out as img2dataset writes them: KEY.jpg, KEY.txt, KEY.json (url, caption, key, width...)."""
    samples = []
    for i, image in enumerate(make_images(count, seed=seed)):
        fields = {"url": f"https://example.com/{i}.jpg", "caption": f"photo {i}", "key": f"{i:09d}",
                  "status": "success", "error_message": None, "width": image.width, "height": image.height,
                  "exif": "{}", "source": {"site": "example", "page": i}, "tags": ["a", str(i)]}  # fmt: skip
        samples.append({"__key__": f"{i:09d}", "jpg": encode(image, "jpg"), "txt": f"photo {i}".encode(),
                        "json": json.dumps(fields).encode()})  # fmt: skip
    write_tar(root / "00000.tar", samples[: count // 2])
    write_tar(root / "00001.tar", samples[count // 2 :])
    return samples


def as_version_1(emb: Path) -> None:
    """Rewrite a `clipkit embed` folder in the layout clipkit wrote before clip-retrieval's columns: the shard in
    image_path, the fields in the metadata JSON only."""
    old_schema = pa.schema([("key", pa.string()), ("shard", pa.string()), ("image_path", pa.string()),
                            ("offset", pa.int64()), ("length", pa.int64()), ("sha256", pa.string()),
                            ("media_type", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                            ("caption", pa.string()), ("metadata", pa.string())])  # fmt: skip
    for parquet in sorted((emb / "metadata").glob("*.parquet")):
        table = pq.read_table(parquet)
        rows = [
            {
                **{n: row.get(n) for n in old_schema.names},
                "image_path": row.get("shard_path") or row["image_path"],
            }
            for row in table.to_pylist()
        ]
        old = pa.Table.from_pylist(rows, schema=old_schema).replace_schema_metadata(table.schema.metadata)
        pq.write_table(old, parquet)
    job = json.loads((emb / "embeddings.json").read_text())
    (emb / "embeddings.json").write_text(json.dumps({**job, "version": 1}))


def cli(capsys, *args: str) -> tuple[int, str]:
    """`clipkit ARGS` in this process (the commands' own code, without a Python start-up): (exit code, stderr)."""
    from clipkit.cli.main import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def test_embed_writes_clip_retrievals_columns_and_old_folders_still_build(model_dir, tmp_path, capsys):
    shards = tmp_path / "shards"
    samples = img2dataset_like_shards(shards, 10, seed=1)
    emb = tmp_path / "emb"
    code, err = cli(capsys, "embed", "--model", str(model_dir), "--images", str(shards), "--out", str(emb),
                    "--part-size", "4", "--workers", "0")  # fmt: skip
    assert code == 0, err
    _, rows = read_embeddings(emb)
    first = rows[0]
    # clip-retrieval's back end opens a non-empty image_path as an image: a shard sample has none.
    assert "image_path" not in first
    assert (first["shard"], first["key"], first["shard_path"]) == (
        "00000.tar",
        "000000000",
        str(shards.resolve() / "00000.tar"),
    )
    # KEY.json flattened as clip-retrieval's writer (pandas.json_normalize) flattens it; clipkit's own columns
    # (key, width, height, caption) keep clipkit's values, the JSON keeps everything.
    assert (first["url"], first["status"], first["source.site"], first["source.page"]) == (
        "https://example.com/0.jpg", "success", "example", 0)  # fmt: skip
    assert json.loads(first["tags"]) == ["a", "0"] and first["error_message"] is None
    assert json.loads(first["metadata"]) == json.loads(samples[0]["json"])
    assert [r["caption"] for r in rows] == [f"photo {i}" for i in range(10)]

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(make_images(1, seed=2)[0], "png"))
    assert cli(capsys, "embed", "--model", str(model_dir), "--images", str(folder), "--out",
               str(tmp_path / "emb_files"), "--workers", "0")[0] == 0  # fmt: skip
    assert read_embeddings(tmp_path / "emb_files")[1][0]["image_path"] == str((folder / "a.png").resolve())

    # Existing folders (format 1) still build, into the same index as format 2 and as the images themselves.
    old = tmp_path / "emb_v1"
    old.mkdir()
    for sub in ("img_emb", "metadata"):
        (old / sub).mkdir()
        for f in (emb / sub).iterdir():
            (old / sub / f.name).write_bytes(f.read_bytes())
    (old / "embeddings.json").write_text((emb / "embeddings.json").read_text())
    as_version_1(old)
    assert "shard_path" not in read_embeddings(old)[1][0]
    build_index_from_embeddings(emb, tmp_path / "idx_v2")
    build_index_from_embeddings(old, tmp_path / "idx_v1")
    build_index(shards, tmp_path / "idx_images", model=model_dir)
    indexes = [RetrievalIndex(tmp_path / name) for name in ("idx_v2", "idx_v1", "idx_images")]
    try:
        records = [index.records(range(10)) for index in indexes]
        assert records[0] == records[1] == records[2]
        assert records[0][3].metadata["url"] == "https://example.com/3.jpg"
    finally:
        for index in indexes:
            index.close()
    # Resuming a format-1 job with this clipkit would mix two layouts in one folder.
    code, err = cli(capsys, "embed", "--model", str(model_dir), "--images", str(shards), "--out", str(old),
                    "--part-size", "4")  # fmt: skip
    assert code == 2 and "embeddings format version 1" in err


def write_clip_retrieval_output(out: Path, vectors: np.ndarray, rows: list[dict], *, part_size: int) -> None:
    """A folder as clip-retrieval inference writes one: img_emb/img_emb_N.npy (float16, names unpadded for
    fewer than 10 parts) and metadata/metadata_N.parquet with its columns, no embeddings.json."""
    (out / "img_emb").mkdir(parents=True)
    (out / "metadata").mkdir()
    columns = list(dict.fromkeys(name for row in rows for name in row))  # every part has every column
    for part, start in enumerate(range(0, len(rows), part_size)):
        np.save(
            out / "img_emb" / f"img_emb_{part}.npy", vectors[start : start + part_size].astype(np.float16)
        )
        table = pa.Table.from_pylist(
            [{n: row.get(n) for n in columns} for row in rows[start : start + part_size]]
        )
        pq.write_table(table, out / "metadata" / f"metadata_{part}.parquet")


def test_an_index_builds_from_clip_retrieval_inference_output(model_dir, tmp_path, capsys):
    images = make_images(9, seed=3)
    files = tmp_path / "images"
    files.mkdir()
    for i, image in enumerate(images):
        (files / f"{i}.png").write_bytes(encode(image, "png"))
    encoder, _ = load_encoder(model_dir)
    import torch

    pixels = torch.stack([encoder.bundle.eval_transform(image) for image in images])
    vectors = encoder.encode_pixels(pixels)  # (9, D)
    # Images 0-4 by path (as `--input_format files` writes image_path); 5-8 by webdataset key, with a url.
    rows = [{"image_path": str(files / f"{i}.png"), "caption": f"photo {i}"} for i in range(5)]
    rows += [{"image_path": f"{i:09d}", "caption": f"photo {i}", "url": f"https://example.com/{i}.jpg",
              "width": 40} for i in range(5, 9)]  # fmt: skip
    crout = tmp_path / "crout"
    write_clip_retrieval_output(crout, vectors, rows, part_size=4)

    code, err = cli(capsys, "index", "build", "--from-embeddings", str(crout), "--out", str(tmp_path / "x"))
    assert code == 2 and "name that model with --model" in err
    other = export_small_model(tmp_path / "other", seed=6)
    wrong_dim = tmp_path / "wrong"
    write_clip_retrieval_output(wrong_dim, np.zeros((2, vectors.shape[1] + 1)), rows[:2], part_size=4)
    code, err = cli(capsys, "index", "build", "--from-embeddings", str(wrong_dim), "--model", str(other), "--out",
                    str(tmp_path / "y"))  # fmt: skip
    assert code == 2 and "name the model the embeddings were made with" in err

    code, err = cli(capsys, "index", "build", "--from-embeddings", str(crout), "--model", str(model_dir), "--out",
                    str(tmp_path / "idx"))  # fmt: skip
    assert code == 0, err
    index, encoder = open_index(tmp_path / "idx")
    try:
        assert index.count == 9
        np.testing.assert_allclose(index.reconstruct(6), vectors[6], atol=2e-3)  # float16 widened
        record = index.record(6)
        assert (record.uri, record.caption, record.metadata["url"], record.path) == (
            "000000006", "photo 6", "https://example.com/6.jpg", "")  # fmt: skip
        with TestClient(create_app(index, encoder, ServeConfig()), base_url="http://127.0.0.1") as client:
            assert (
                client.get("/v1/images/2").content == (files / "2.png").read_bytes()
            )  # a readable file: served
            assert client.get("/v1/images/6").status_code == 404  # a key: nothing to serve
            found = client.post("/knn-service", json={"embedding_input": vectors[7].tolist(), "num_images": 1,
                                                      "indice_name": "idx", "modality": "image"}).json()  # fmt: skip
            assert (found[0]["id"], found[0]["url"], found[0]["caption"]) == (
                7,
                "https://example.com/7.jpg",
                "photo 7",
            )
            assert "image" not in found[0]
    finally:
        index.close()


@pytest.fixture(scope="module")
def served_index(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    images = make_images(12, seed=4)
    samples = [
        {"__key__": f"k{i:02d}", "png": encode(image, "png"), "txt": f"photo {i}".encode()}
        for i, image in enumerate(images)
    ]
    for i in range(6):  # half the collection has a url, as img2dataset's shards do
        samples[i]["json"] = json.dumps({"url": f"https://example.com/{i}.png"}).encode()
    write_tar(root / "shards" / "a.tar", samples)
    build_index(root / "shards", root / "digits", model=model_dir, kind="flat")
    return root / "digits", samples


def test_knn_service_answers_as_clip_retrievals_back_end(served_index):
    index_dir, samples = served_index
    index, encoder = open_index(index_dir)
    try:
        with TestClient(create_app(index, encoder, ServeConfig()), base_url="http://127.0.0.1") as client:
            assert client.get("/indices-list").json() == ["digits"]
            ask = {"indice_name": "digits", "modality": "image", "num_images": 3, "deduplicate": False,
                   "use_safety_model": True, "use_violence_detector": True, "aesthetic_score": 9,
                   "aesthetic_weight": 0.5, "use_mclip": False}  # fmt: skip
            # ClipClient posts JSON without a Content-Type.
            by_text = client.post("/knn-service", content=json.dumps({**ask, "text": "photo 3"}))
            assert by_text.status_code == 200, by_text.text
            ours = client.post("/v1/search", json={"query": "photo 3", "k": 3}).json()["results"]
            assert [r["id"] for r in by_text.json()] == [r["id"] for r in ours]
            np.testing.assert_allclose(
                [r["similarity"] for r in by_text.json()], [r["score"] for r in ours], atol=1e-5
            )
            ignored = by_text.headers["x-clipkit-ignored"]
            assert ignored == "use_safety_model, use_violence_detector, aesthetic_score, aesthetic_weight"

            image = base64.b64encode(samples[8]["png"]).decode()
            by_image = client.post("/knn-service", json={**ask, "image": image}).json()
            assert by_image[0]["id"] == 8 and by_image[0]["similarity"] > 0.999
            assert by_image[0]["caption"] == "photo 8" and by_image[0]["url"] is None
            assert base64.b64decode(by_image[0]["image"]) == samples[8]["png"]  # no url: the image itself
            by_vector = client.post(
                "/knn-service", json={**ask, "embedding_input": (3 * index.reconstruct(2)).tolist()}
            )
            top = by_vector.json()[0]
            assert (top["id"], top["url"], "image" in top) == (2, "https://example.com/2.png", False)
            assert "x-clipkit-ignored" in by_vector.headers
            with_images = client.post("/knn-service", json={**ask, "embedding_input": index.reconstruct(2).tolist(),
                                                            "return_images": True}).json()  # fmt: skip
            assert base64.b64decode(with_images[0]["image"]) == samples[2]["png"]

            everything = client.post("/knn-service", json={**ask, "text": "photo", "num_images": 12}).json()
            deduplicated = client.post(
                "/knn-service", json={**ask, "text": "photo", "num_images": 12, "deduplicate": True}
            ).json()
            kept = np.stack([index.reconstruct(r["id"]) for r in deduplicated])
            similar = kept @ kept.T
            assert (similar[~np.eye(len(kept), dtype=bool)] < 0.94).all()
            assert [r["id"] for r in deduplicated] == [
                r["id"] for r in everything if r["id"] in {d["id"] for d in deduplicated}
            ]
            assert len(deduplicated) < len(everything) == 12  # the small model's image vectors are close

            meta = client.post(
                "/metadata", content=json.dumps({"ids": [1, 9], "indice_name": "digits"})
            ).json()
            assert [(m["id"], m["metadata"]["caption"], m["metadata"]["url"]) for m in meta] == [
                (1, "photo 1", "https://example.com/1.png"), (9, "photo 9", None)]  # fmt: skip

            refusals = {
                "image_url": (
                    {**ask, "image_url": "http://127.0.0.1:1/x.png"},
                    422,
                    "makes no outbound requests",
                ),
                "text modality": ({**ask, "text": "x", "modality": "text"}, 422, "image embeddings only"),
                "other index": (
                    {**ask, "text": "x", "indice_name": "laion5B"},
                    404,
                    "this server has 'digits'",
                ),
                "no query": (ask, 422, "send one of text, image"),
                "bad vector": ({**ask, "embedding_input": [1.0, 2.0]}, 422, f"{index.dim} finite numbers"),
                "not an image": ({**ask, "image": base64.b64encode(b"text").decode()}, 415, "not an image"),
                "too many": ({**ask, "text": "x", "num_images": 5000}, 422, "less than or equal to 1000"),
            }
            for name, (body, status, message) in refusals.items():
                answer = client.post("/knn-service", json=body)
                assert (answer.status_code, message in answer.text) == (status, True), (name, answer.text)
    finally:
        index.close()


def test_knn_service_needs_the_api_key_when_the_server_has_one(served_index):
    index, encoder = open_index(served_index[0])
    try:
        with TestClient(
            create_app(index, encoder, ServeConfig(api_key="s3cret")), base_url="http://127.0.0.1"
        ) as client:
            body = {"text": "photo", "num_images": 2, "modality": "image"}
            refused = client.post("/knn-service", json=body)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert client.get("/indices-list").status_code == 401
            answer = client.post("/knn-service", json=body, headers={"Authorization": "Bearer s3cret"})
            assert answer.status_code == 200 and len(answer.json()) == 2
    finally:
        index.close()


# ---------------------------------------------------------------------------------------------------------
# The real tools, in their own virtualenv


@pytest.fixture(scope="session")
def interop_venv() -> Path:
    """clip-retrieval / autofaiss / img2dataset's virtualenv, built once per machine (CLIPKIT_INTEROP_VENV)."""
    venv = Path(os.environ.get("CLIPKIT_INTEROP_VENV", Path.home() / ".cache" / "clipkit" / "interop-venv"))
    built = subprocess.run(["bash", str(REPO_ROOT / "scripts/interop/make_venv.sh"), str(venv)],
                           capture_output=True, text=True, timeout=900, env=subprocess_env())  # fmt: skip
    if built.returncode != 0:
        message = f"scripts/interop/make_venv.sh failed (needs PyPI): {built.stderr[-2000:]}"
        if os.environ.get("CLIPKIT_CI"):
            pytest.fail(message)
        pytest.skip(message)
    return venv


def tool_env(**extra: str) -> dict[str, str]:
    # Nothing goes out: albumentations checks for updates unless told not to, wandb is off.
    return subprocess_env(NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", **extra)


def run_tool(venv: Path, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=tool_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def img2dataset_shards(interop_venv, tmp_path_factory) -> tuple[Path, list[Path]]:
    """Shards img2dataset 1.47 made by the README's commands, as typed: from a URL list (file:// URLs of local
    photos, with captions) into shards/, and from local files into local-shards/."""
    from test_retrieval_readme import blocks

    root = tmp_path_factory.mktemp("i2d")
    (root / "photos").mkdir()
    files = []
    for i, image in enumerate(make_images(12, seed=9)):
        files.append(root / "photos" / f"{i:02d}.jpg")
        files[-1].write_bytes(encode(image, "jpg"))
    lines = ["url\tcaption", *(f"{f.resolve().as_uri()}\tphoto {i}" for i, f in enumerate(files))]
    (root / "urls.tsv").write_text("\n".join(lines) + "\n")
    url_list, local_files = blocks("bash")[3], blocks("bash")[4]
    assert url_list.startswith("img2dataset --url_list urls.tsv") and "local.tsv" in local_files
    for command in [*url_list.splitlines(), *local_files.splitlines()]:
        done = subprocess.run(command, shell=True, cwd=root, capture_output=True, text=True, timeout=600,
                              env=tool_env(PATH=f"{interop_venv / 'bin'}{os.pathsep}{os.environ['PATH']}"))  # fmt: skip
        assert done.returncode == 0, (command, done.stderr[-3000:])
    for folder in ("shards", "local-shards"):
        assert sorted(p.name for p in (root / folder).glob("*.tar")) == ["00000.tar"]
        assert len(list_images(root / folder).items) == 12  # file:// URLs: nothing left out
    return root / "shards", files


@contextlib.contextmanager
def clip_back(venv: Path, model_dir: Path, indices: dict[str, Path], root: Path):
    """clip-retrieval's own back end on a loopback port with `model_dir` registered; yields its base URL."""
    (root / "indices.json").write_text(json.dumps({name: str(path) for name, path in indices.items()}))
    port = _free_port()
    log = (root / "back.log").open("w")
    process = subprocess.Popen(
        [str(venv / "bin/python"), str(REPO_ROOT / "scripts/interop/with_local_model.py"), str(model_dir), "back",
         "--indices_paths", "indices.json", "--port", str(port), "--clip_model", "open_clip:clipkit-local",
         "--use_jit", "False", "--enable_mclip_option", "False", "--provide_aesthetic_embeddings", "False"],
        cwd=root, env=tool_env(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait_until_answering(f"http://127.0.0.1:{port}/indices-list", process, root / "back.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_answering(url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{url} did not answer: {log.read_text()[-3000:]}"
        time.sleep(0.5)


def clip_client(venv: Path, url: str, index_name: str, queries: list[dict], cwd: Path) -> list:
    """clip-retrieval's ClipClient, run in its virtualenv: each query's results."""
    program = (
        "import json, sys\nfrom clip_retrieval.clip_client import ClipClient, Modality\n"
        "url, name, queries = json.load(sys.stdin)\n"
        "client = ClipClient(url=url, indice_name=name, num_images=3, deduplicate=False, modality=Modality.IMAGE)\n"
        "print(json.dumps([client.query(**q) for q in queries]))\n"
    )
    done = subprocess.run([str(venv / "bin/python"), "-c", program], input=json.dumps([url, index_name, queries]),
                          capture_output=True, text=True, timeout=300, cwd=cwd, env=tool_env())  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.interop
@pytest.mark.slow  # ~2 min: the venv (once), img2dataset, autofaiss and clip-retrieval's back end starting
def test_clip_retrievals_back_end_serves_clipkits_embeddings_of_img2dataset_shards(
    interop_venv, img2dataset_shards, model_dir, tmp_path
):
    shards, files = img2dataset_shards
    embedded = run_clipkit("embed", "--model", str(model_dir), "--images", str(shards), "--out", str(tmp_path / "emb"),
                           "--workers", "0")  # fmt: skip
    assert embedded.returncode == 0, embedded.stderr
    run_tool(interop_venv, "clip-retrieval", "index", "--embeddings_folder", "emb", "--index_folder", "idx",
             "--nb_cores", "1", cwd=tmp_path)  # fmt: skip
    vectors, rows = read_embeddings(tmp_path / "emb")
    with clip_back(interop_venv, model_dir, {"digits": tmp_path / "idx"}, tmp_path) as url:
        by_text, by_vector = clip_client(interop_venv, f"{url}/knn-service", "digits",
                                         [{"text": "photo 3"}, {"embedding_input": vectors[5].tolist()}], tmp_path)  # fmt: skip
    assert len(by_text) == 3 and all(set(r) >= {"id", "similarity", "url", "caption"} for r in by_text)
    assert {r["url"] for r in by_text} <= {f.resolve().as_uri() for f in files}
    assert (by_vector[0]["id"], by_vector[0]["url"], by_vector[0]["caption"]) == (
        5,
        rows[5]["url"],
        rows[5]["caption"],
    )
    assert rows[5]["url"] == files[int(rows[5]["caption"].split()[1])].resolve().as_uri()


# What `clip-retrieval inference --input_format webdataset --enable_metadata True` hands its writer per sample
# (its reader.py: the key as image_filename, KEY.json's text as metadata; its mapper: float16 embeddings),
# written by its own NumpyWriter. (The whole `clip-retrieval inference` run takes minutes here, mostly idle.)
_WRITE_AS_INFERENCE = """
import json, sys, tarfile
import numpy as np
from clip_retrieval.clip_inference.writer import NumpyWriter
shard, images, texts, out = sys.argv[1], np.load(sys.argv[2]), np.load(sys.argv[3]), sys.argv[4]
samples = {}
with tarfile.open(shard) as tar:
    for member in tar:
        key, ext = member.name.split(".", 1)
        samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
keys = sorted(k for k in samples if "jpg" in samples[k])
writer = NumpyWriter(partition_id=0, output_folder=out, enable_text=True, enable_image=True, enable_metadata=True,
                     output_partition_count=1)
writer({"image_embs": images.astype(np.float16), "image_filename": keys, "text_embs": texts.astype(np.float16),
        "text": [samples[k]["txt"].decode("utf-8") for k in keys],
        "metadata": [samples[k]["json"].decode("utf-8") for k in keys]})
writer.flush()
"""


@pytest.mark.interop
@pytest.mark.slow  # ~30 s: clip-retrieval's writer in its venv, an index build
def test_clipkit_indexes_what_clip_retrieval_inference_writes(
    interop_venv, img2dataset_shards, model_dir, tmp_path
):
    shards, files = img2dataset_shards
    listing = list_images(shards)
    encoder, _ = load_encoder(model_dir)
    vectors = np.concatenate([batch.vectors for batch in embed_items(listing.items, encoder)])  # (12, D)
    np.save(tmp_path / "vectors.npy", vectors)
    np.save(tmp_path / "texts.npy", encoder.encode_texts([item.caption for item in listing.items]))
    subprocess.run([str(interop_venv / "bin/python"), "-c", _WRITE_AS_INFERENCE, str(shards / "00000.tar"),
                    str(tmp_path / "vectors.npy"), str(tmp_path / "texts.npy"), str(tmp_path / "crout")],
                   cwd=tmp_path, env=tool_env(), check=True, timeout=300)  # fmt: skip
    crout = tmp_path / "crout"
    assert sorted(p.name for p in (crout / "img_emb").iterdir()) == ["img_emb_0.npy"]  # unpadded
    assert np.load(crout / "img_emb" / "img_emb_0.npy").dtype == np.float16
    assert {"image_path", "url", "width", "status"} <= set(
        pq.read_schema(crout / "metadata" / "metadata_0.parquet").names
    )
    built = run_clipkit("index", "build", "--from-embeddings", str(crout), "--model", str(model_dir), "--out",
                        str(tmp_path / "idx"))  # fmt: skip
    assert built.returncode == 0, built.stderr
    index, encoder = open_index(tmp_path / "idx")
    try:
        assert index.count == 12
        with TestClient(create_app(index, encoder, ServeConfig()), base_url="http://127.0.0.1") as client:
            found = client.post("/knn-service", json={"embedding_input": vectors[3].tolist(), "num_images": 12,
                                                      "modality": "image"}).json()  # fmt: skip
        urls = {f.resolve().as_uri(): i for i, f in enumerate(files)}
        assert len(found) == 12 and all(r["caption"] == f"photo {urls[r['url']]}" for r in found)
        assert found[0]["id"] == 3 and "image" not in found[0]  # image_path is a key, not a file: no image
    finally:
        index.close()


@pytest.mark.interop
@pytest.mark.slow  # ~1 min: clipkit serve, then ClipClient in its venv
def test_clip_client_queries_clipkit_serve(interop_venv, served_index, tmp_path):
    from test_serve_e2e import running_server

    index_dir, samples = served_index
    (tmp_path / "query.png").write_bytes(samples[4]["png"])
    index = RetrievalIndex(index_dir)
    vector = index.reconstruct(7).tolist()
    index.close()
    with running_server(index_dir, tmp_path / "serve.log") as (_, base_url):
        by_text, by_image, by_vector = clip_client(interop_venv, f"{base_url}/knn-service", "digits",
                                                   [{"text": "photo 1"}, {"image": "query.png"},
                                                    {"embedding_input": vector}], tmp_path)  # fmt: skip
    assert len(by_text) == 3 and all(set(r) >= {"id", "similarity", "url", "caption"} for r in by_text)
    assert by_image[0]["id"] == 4 and by_image[0]["caption"] == "photo 4"
    assert (by_vector[0]["id"], by_vector[0]["url"]) == (7, None)
