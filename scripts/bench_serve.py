"""Latency and queries/s of `clipkit serve`'s /v1/search under 1, 8 and 32 concurrent clients, with and
without micro-batching; text encoding with and without padding; and exact vs HNSW (and IVF) search on
100k random 512-d vectors.

Serving: one index (a model with fixed random weights, a few generated images) is served twice on
loopback, by `clipkit serve` with micro-batching (default settings) and with `--max-batch 1` (each query
encoded alone: the peer). Each concurrency level runs on one server, then the other, then the next level,
so drift on a shared machine hits both alike. Every level is bounded: `--requests` per level (after a
short warm-up) or `--level-seconds`, whichever ends first. The load generator (httpx, asyncio) runs in
this process on the same cores as the server, as a client on the same machine would.

Scale (--scale-vectors 1000000): a tiny model trained on the digits embeds augmented digit images with
`clipkit embed` in 1 and 2 processes (the throughput figures); those embeddings are grown into N vectors
(points between two embeddings of the same digit, plus noise) and indexed with `clipkit index build
--from-embeddings` (index type, tuning, build time, bytes); then recall@10 against exact search and latency
of vector search alone, and of end-to-end text queries through `clipkit serve`, at 1, 8, 32 and 128 clients.

    python scripts/bench_serve.py --skip-serving --skip-vectors --scale-vectors 1000000 --out scale.json

Vector search: clipkit's own `create_vector_index` with the parameters an index build records, on
seeded random unit vectors; recall@10 against exact search, and per-query latency one query at a time.

    python scripts/bench_serve.py --out bench_serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))  # before _report, which imports clipkit: this checkout's

from _report import write_report  # noqa: E402

QUERY_WORDS = (
    "red",
    "green",
    "blue",
    "small",
    "large",
    "circle",
    "square",
    "dog",
    "cat",
    "street",
    "beach",
    "night",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="ViT-B-32", help="open_clip architecture or conf/model name (random weights)"
    )
    parser.add_argument("--images", type=int, default=64, help="images in the served index")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    parser.add_argument(
        "--requests", type=int, default=300, help="requests per level and server (after warm-up)"
    )
    parser.add_argument("--level-seconds", type=float, default=40.0, help="time limit per level and server")
    parser.add_argument("--vectors", type=int, default=100_000, help="vectors for the exact vs HNSW part")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=500, help="queries for recall and latency")
    parser.add_argument("--encoder-repeats", type=int, default=15, help="timed text batches per path")
    parser.add_argument(
        "--scale-vectors",
        type=int,
        default=0,
        help="build an index of this many vectors from a trained model's embeddings (0: skip)",
    )
    parser.add_argument(
        "--scale-model", help="trained model for the scale part (default: train digits, ~3 min)"
    )
    parser.add_argument(
        "--scale-images", type=int, default=3000, help="digit images embedded for the scale part"
    )
    parser.add_argument(
        "--scale-searches", type=int, default=4000, help="vector searches per concurrency level"
    )
    parser.add_argument("--clients-scale", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--skip-vectors", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    return parser.parse_args()


# ------------------------------------------------------------------------------------------------------------
# Serving


def build_served_index(work: Path, model_name: str, images: int) -> Path:
    import torch
    from PIL import Image

    from clipkit.models import build_model, export_model
    from clipkit.retrieval import build_index

    torch.manual_seed(0)
    model = export_model(build_model(model_name), work / "model", overwrite=True)
    rng = np.random.default_rng(0)
    (work / "images").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        pixels = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
            (128, 128), Image.BICUBIC
        )
        pixels.save(work / "images" / f"{i:05d}.jpg", quality=90)
    build_index(work / "images", work / "index", model=model, batch_size=32)
    return work / "index"


def start_server(index: Path, log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    env = dict(
        os.environ, PYTHONPATH=str(REPO_ROOT / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "clipkit", "serve", "--index", str(index), "--port", "0", "--log-level", "warning",
             *args],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (match := re.search(r"at (http://127\.0\.0\.1:\d+)/", log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return process, match.group(1)


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def queries(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(QUERY_WORDS, size=3)) + f" {i}" for i, _ in enumerate(range(count))]


async def load(base_url: str, clients: int, requests: int, seconds: float, seed: int) -> dict:
    """`clients` loops, each sending its next search as soon as the last one is answered."""
    import httpx

    texts = queries(requests + clients, seed)
    latencies: list[float] = []
    failures = 0
    next_query = 0
    stop_at = time.perf_counter() + seconds

    async def client_loop(client) -> None:
        nonlocal next_query, failures
        while next_query < requests and time.perf_counter() < stop_at:
            text = texts[next_query]
            next_query += 1
            start = time.perf_counter()
            response = await client.post("/v1/search", json={"query": text, "k": 10})
            latencies.append(time.perf_counter() - start)
            failures += response.status_code != 200

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=120) as client:
        for text in texts[:clients]:  # warm-up: open the connections, first forward passes
            await client.post("/v1/search", json={"query": text, "k": 10})
        metrics_before = batch_metrics((await client.get("/metrics")).text)
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        elapsed = time.perf_counter() - start
        metrics_after = batch_metrics((await client.get("/metrics")).text)
    batches = metrics_after[0] - metrics_before[0]
    quantiles = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    return {
        "clients": clients,
        "requests": len(latencies),
        "failures": failures,
        "seconds": round(elapsed, 3),
        "queries_per_s": round(len(latencies) / elapsed, 2),
        "p50_ms": round(float(quantiles[0]), 2),
        "p95_ms": round(float(quantiles[1]), 2),
        "p99_ms": round(float(quantiles[2]), 2),
        "mean_batch": round((metrics_after[1] - metrics_before[1]) / batches, 2) if batches else None,
    }


def batch_metrics(text: str) -> tuple[float, float]:
    count = re.search(r'^clipkit_batch_size_count\{batcher="search"\} (\S+)$', text, re.M)
    total = re.search(r'^clipkit_batch_size_sum\{batcher="search"\} (\S+)$', text, re.M)
    return float(count.group(1)), float(total.group(1))


def bench_serving(args, work: Path) -> dict:
    index = build_served_index(work, args.model, args.images)
    servers = {
        "micro-batching": start_server(index, work / "batching.log"),
        "one query per forward pass": start_server(index, work / "single.log", "--max-batch", "1"),
    }
    levels = []
    try:
        for clients in args.clients:
            for name, (_, url) in servers.items():
                result = asyncio.run(load(url, clients, args.requests, args.level_seconds, seed=clients))
                levels.append({"server": name, **result})
                print(json.dumps(levels[-1]), file=sys.stderr)
    finally:
        for process, _ in servers.values():
            stop_server(process)

    def rate(server: str, clients: int) -> float:
        return next(r["queries_per_s"] for r in levels if r["server"] == server and r["clients"] == clients)

    top, bottom = max(args.clients), min(args.clients)
    return {
        "model": args.model,
        "index_images": args.images,
        "levels": levels,
        "summary": {
            f"micro-batching qps {top} / {bottom} clients": round(
                rate("micro-batching", top) / rate("micro-batching", bottom), 2
            ),
            f"micro-batching / one per pass, qps at {top} clients": round(
                rate("micro-batching", top) / rate("one query per forward pass", top), 2
            ),
        },
    }


def bench_text_encoder(args) -> dict:
    """Milliseconds per text batch: open_clip's `encode_text` (padded to the context length) against clipkit's
    padding-free path, interleaved, medians of `repeats`."""
    import torch

    from clipkit.models import build_model
    from clipkit.retrieval.encoder import encode_text_without_padding

    torch.manual_seed(0)
    bundle = build_model(args.model)
    model = bundle.model.eval()
    rows = []
    for batch in (1, 16):
        tokens = bundle.tokenizer(queries(batch, seed=batch))
        padded, trimmed = [], []
        with torch.inference_mode():
            model.encode_text(tokens), encode_text_without_padding(model, tokens)  # warm-up
            for _ in range(args.encoder_repeats):
                start = time.perf_counter()
                model.encode_text(tokens)
                padded.append(time.perf_counter() - start)
                start = time.perf_counter()
                encode_text_without_padding(model, tokens)
                trimmed.append(time.perf_counter() - start)
        rows.append(
            {
                "batch": batch,
                "tokens_kept": int(tokens.argmax(dim=1).max()) + 1,
                "context_length": tokens.shape[1],
                "encode_text_ms": round(statistics.median(padded) * 1000, 2),
                "without_padding_ms": round(statistics.median(trimmed) * 1000, 2),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return {"model": args.model, "repeats": args.encoder_repeats, "results": rows}


# ------------------------------------------------------------------------------------------------------------
# Vector search


def bench_vectors(args) -> dict:
    import faiss

    from clipkit.retrieval.store import apply_search_params, create_vector_index, default_index_params

    rng = np.random.default_rng(0)
    vectors = unit_rows(rng.standard_normal((args.vectors, args.dim), dtype=np.float32))  # (N, D)
    query_sets = {
        # Unrelated random queries: every cosine is ~0 +- 0.04, the hardest case for approximate search.
        "random": unit_rows(rng.standard_normal((args.queries, args.dim), dtype=np.float32)),
        # Queries with a true neighbour (cosine 0.8 to one indexed vector), as real text-image queries have.
        "near an indexed vector": unit_rows(
            vectors[rng.choice(args.vectors, args.queries, replace=False)]
            + 0.75 * unit_rows(rng.standard_normal((args.queries, args.dim), dtype=np.float32))
        ),
    }

    results, exact_ids = [], {}
    for kind in ("flat", "hnsw", "ivf"):
        params = default_index_params(kind, args.vectors)
        start = time.perf_counter()
        index = create_vector_index(kind, args.dim, vectors, params)
        build_s = time.perf_counter() - start
        if kind == "hnsw":
            sweeps = [{"ef_search": ef} for ef in (32, 64, params["ef_search"], 256)]
        elif kind == "ivf":
            sweeps = [
                {"nprobe": n} for n in (max(1, params["nprobe"] // 4), params["nprobe"], 4 * params["nprobe"])
            ]
        else:
            sweeps = [{}]
        for setting in sweeps:
            searched = {**params, **setting}
            apply_search_params(index, kind, searched)
            for query_name, query_vectors in query_sets.items():
                _, ids = index.search(query_vectors, 10)  # (Q, 10), all queries at once
                if kind == "flat":
                    exact_ids[query_name] = ids
                one_at_a_time = []
                for query in query_vectors[: min(200, args.queries)]:
                    start = time.perf_counter()
                    index.search(query[None], 10)
                    one_at_a_time.append(time.perf_counter() - start)
                truth = exact_ids[query_name]
                recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids, truth, strict=True)])
                recall_1 = np.mean(ids[:, 0] == truth[:, 0])  # the best match found first
                results.append(
                    {
                        "index": kind,
                        "queries": query_name,
                        "params": searched,
                        "default": searched == params,
                        "build_s": round(build_s, 2),
                        "recall_at_10": round(float(recall), 4),
                        "top1_found": round(float(recall_1), 4),
                        "latency_p50_ms": round(statistics.median(one_at_a_time) * 1000, 3),
                        "latency_p99_ms": round(float(np.percentile(one_at_a_time, 99)) * 1000, 3),
                    }
                )
                print(json.dumps(results[-1]), file=sys.stderr)
    return {"vectors": args.vectors, "dim": args.dim, "queries": args.queries, "faiss": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads(), "results": results}  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# Scale: embedding throughput, and a 1,000,000-vector index built from a trained model's embeddings


def bench_scale(args, work: Path) -> dict:
    """Embed augmented digits with a trained tiny model (1 and 2 processes), grow them into --scale-vectors
    embeddings, build an index from them with `clipkit index build --from-embeddings`, and measure recall and
    latency of vector search alone and of end-to-end text queries under concurrent clients."""
    model = Path(args.scale_model) if args.scale_model else train_digits_model(work)
    images = write_augmented_digits(work / "images", args.scale_images)
    embedding = {n: embed_images(model, images, work / f"embeddings-{n}", processes=n) for n in (1, 2)}
    vectors, rows = grow_embeddings(work / "embeddings-2", args.scale_vectors, seed=0)
    write_grown_parts(work / "embeddings-1", work / "grown", vectors, rows)
    started = time.perf_counter()
    built = run_clipkit(
        "index", "build", "--from-embeddings", str(work / "grown"), "--out", str(work / "index")
    )
    build_s = time.perf_counter() - started
    manifest = json.loads((work / "index" / "index.json").read_text())
    print(
        json.dumps({"index": manifest["kind"], "params": manifest["params"], "build_s": build_s}),
        file=sys.stderr,
    )
    del built
    held_out, _ = grow_embeddings(work / "embeddings-2", 1000, seed=1)  # image-like queries, never indexed
    query_sets = {
        "text captions": encode_captions(model),
        "other phrasings": encode_captions(model, OTHER_PHRASINGS),  # not in the collection, not tuned on
        "held-out image embeddings": held_out,
    }
    vector_search = bench_vector_search(work / "index", vectors, query_sets, args)
    del vectors
    end_to_end = bench_end_to_end(work / "index", args)
    return {
        "how the vectors were made": (
            f"a tiny model trained on scikit-learn's digits embeds {args.scale_images} augmented digit images "
            "(shift, ink, noise); each indexed vector is a random point between two of those embeddings of the "
            "same digit, plus Gaussian noise (sigma 0.01 a dimension), re-normalised"
        ),
        "model": str(model),
        "embedding": embedding,
        "index": {
            "vectors": args.scale_vectors,
            "dim": manifest["dim"],
            "kind": manifest["kind"],
            "params": manifest["params"],
            "build_command_s": round(build_s, 1),
            "tuning": manifest["tuning"],
            "index_bytes": (work / "index" / manifest["vectors_file"]).stat().st_size,
            "metadata_bytes": (work / "index" / manifest["metadata_file"]).stat().st_size,
        },
        "vector_search": vector_search,
        "end_to_end": end_to_end,
    }


def run_clipkit(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=str(REPO_ROOT / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    command = launcher or [sys.executable, "-m", "clipkit"]
    result = subprocess.run([*command, *args], env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed:\n{result.stderr[-3000:]}")
    return result


def train_digits_model(work: Path) -> Path:
    started = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    subprocess.run(
        [sys.executable, "-m", "clipkit.train", "experiment=digits", "train.steps=300", "train.eval_every=0",
         "train.checkpoint_every=100000", f"output_dir={work / 'run'}", f"data.generate.dir={work / 'digits'}"],
        cwd=REPO_ROOT, env=env, check=True, capture_output=True,
    )  # fmt: skip
    print(json.dumps({"trained digits model s": round(time.perf_counter() - started, 1)}), file=sys.stderr)
    return work / "run"


def write_augmented_digits(folder: Path, count: int) -> Path:
    """`count` PNGs of the digits (shifted, inked and noised at random), named LABEL_NNNNN.png, with a caption."""
    from PIL import Image

    from clipkit.data.digits import CAPTION_TEMPLATES, CLASSNAMES, load_digits_arrays

    digits, labels = load_digits_arrays()
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        j = int(rng.integers(len(digits)))
        ink = np.roll(digits[j] / 16.0, shift=tuple(rng.integers(-1, 2, size=2)), axis=(0, 1))
        ink = np.clip(ink * rng.uniform(0.6, 1.0) + rng.normal(0, 0.05, ink.shape), 0, 1)
        image = Image.fromarray((255 * (1 - ink)).astype(np.uint8)).resize((32, 32), Image.Resampling.BICUBIC)
        image.convert("RGB").save(folder / f"{labels[j]}_{i:05d}.png")
        template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]  # as the digits dataset does
        (folder / f"{labels[j]}_{i:05d}.txt").write_text(
            template.format(name=CLASSNAMES[labels[j]], numeral=labels[j])
        )
    return folder


def embed_images(model: Path, images: Path, out: Path, *, processes: int) -> dict:
    args = ["--model", str(model), "--images", str(images), "--out", str(out), "--batch-size", "256",
            "--workers", "1", "--part-size", "1000", "--no-progress"]  # fmt: skip
    launcher = None
    if processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(REPO_ROOT / "conf/accelerate/cpu-2proc.yaml"), "-m", "clipkit.embed"]  # fmt: skip
    started = time.perf_counter()
    result = run_clipkit(*(["embed"] if launcher is None else []), *args, launcher=launcher)
    wall = time.perf_counter() - started
    count = json.loads((out / "embeddings.json").read_text())["embedded"]
    rate = re.search(r"at ([\d.]+) images/s", result.stdout)
    row = {"processes": processes, "images": count, "command_s": round(wall, 1),
           "images_per_s_whole_command": round(count / wall, 1),
           "images_per_s_embedding_main_process": float(rate.group(1)) if rate else None}  # fmt: skip
    print(json.dumps(row), file=sys.stderr)
    return row


def grow_embeddings(
    folder: Path, count: int, *, seed: int
) -> tuple[np.ndarray, list[tuple[int, int, float]]]:
    """`count` unit vectors, each between two embeddings of the same digit in `folder` (with a little noise);
    (vectors (count, D), [(first, second, t)] per vector)."""
    from clipkit.retrieval.parts import read_job

    parts = list(read_job(folder).iter_parts())
    base = np.concatenate([v for v, _, _ in parts])  # (B, D)
    labels = np.array([int(row["key"].split("_")[0]) for _, rows, _ in parts for row in rows])
    rng = np.random.default_rng(seed)
    by_label = [np.flatnonzero(labels == label) for label in range(10)]
    label = rng.integers(0, 10, size=count)
    first = np.array([rng.choice(by_label[c]) for c in label[: min(count, 50_000)]])
    first = np.resize(first, count) if count > 50_000 else first
    second = np.array([by_label[c][i % len(by_label[c])] for c, i in
                       zip(label, rng.integers(0, 1 << 30, size=count), strict=True)])  # fmt: skip
    second = np.where(labels[second] == labels[first], second, first)
    t = rng.uniform(0, 1, size=(count, 1)).astype(np.float32)
    vectors = (
        (1 - t) * base[first]
        + t * base[second]
        + rng.normal(0, 0.01, (count, base.shape[1])).astype(np.float32)
    )
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors, dtype=np.float32), list(
        zip(first.tolist(), second.tolist(), t[:, 0].tolist(), strict=True)
    )


def write_grown_parts(source: Path, out: Path, vectors: np.ndarray, grown: list) -> None:
    """The grown vectors as a `clipkit embed` folder: each row points at the image its first parent came from."""
    import hashlib

    from clipkit.retrieval.parts import read_job, write_job, write_part

    job = read_job(source)
    base_rows = [row for _, rows, _ in job.iter_parts() for row in rows]
    part_size = 100_000
    for part in range(-(-len(vectors) // part_size)):
        rows = []
        for i in range(part * part_size, min(len(vectors), (part + 1) * part_size)):
            parent = base_rows[grown[i][0]]
            rows.append({**parent, "key": f"grown/{i:07d}", "sha256": hashlib.sha256(b"grown %d" % i).hexdigest(),
                         "metadata": json.dumps({"parents": grown[i][:2], "t": round(grown[i][2], 3)})})  # fmt: skip
        write_part(out, part, vectors[part * part_size : (part + 1) * part_size], rows, [])
    parts = -(-len(vectors) // part_size)
    write_job(out, {**job.manifest, "images": len(vectors), "part_size": part_size, "parts": parts,
                    "embedded": len(vectors), "skipped": [], "source": "grown from " + str(source)})  # fmt: skip


OTHER_PHRASINGS = ("a photo of the number {name}", "{name}", "the digit {numeral}", "a drawing of a {name}",
                   "number {numeral}")  # fmt: skip


def encode_captions(model: Path, templates=None) -> np.ndarray:
    """The 50 digit captions (the collection's own, which the index tunes on), or other `templates`."""
    from clipkit.data.digits import CAPTION_TEMPLATES, CLASSNAMES
    from clipkit.retrieval import load_encoder

    encoder, _ = load_encoder(model)
    texts = [t.format(name=name, numeral=i) for t in templates or CAPTION_TEMPLATES
             for i, name in enumerate(CLASSNAMES)]  # fmt: skip
    return encoder.encode_texts(texts)  # (Q, D)


def bench_vector_search(index_dir: Path, vectors: np.ndarray, query_sets: dict, args) -> dict:
    """Recall@10 against exact search, then per-query latency with N clients searching at once (threads: FAISS
    releases the GIL), as the server's search calls do."""
    import faiss

    from clipkit.retrieval import RetrievalIndex

    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    index = RetrievalIndex(index_dir)
    recall = {}
    for name, queries in query_sets.items():
        truth = exact.search(queries, 10)[1]
        found = index.search(queries, 10)[1]
        recall[name] = round(
            float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, truth, strict=True)])), 4
        )
    ladder = []  # recall and one-client latency at other search settings than the tuned one
    if index.kind == "hnsw":
        truths = {name: exact.search(q, 10)[1] for name, q in query_sets.items()}
        tuned = index.vectors.hnsw.efSearch
        for ef in (32, 64, 128, 256, 512, 1024, 1536):
            index.vectors.hnsw.efSearch = ef
            row = {"ef_search": ef}
            for name, q in query_sets.items():
                found = index.search(q, 10)[1]
                row[name] = round(float(np.mean([len(set(a) & set(e)) / 10
                                                 for a, e in zip(found, truths[name], strict=True)])), 4)  # fmt: skip
            row.update(concurrent_searches(index, np.concatenate(list(query_sets.values())), 1, 300))
            ladder.append(row)
            print(json.dumps(row), file=sys.stderr)
        index.vectors.hnsw.efSearch = tuned
    del exact
    queries = np.concatenate(list(query_sets.values()))
    levels = []
    default_threads = faiss.omp_get_max_threads()
    # FAISS's default OpenMP team per search call, and one thread per call (the clients are the parallelism).
    for threads in (default_threads, 1):
        faiss.omp_set_num_threads(threads)
        for clients in args.clients_scale:
            searched = concurrent_searches(index, queries, clients, args.scale_searches)
            levels.append({"faiss_threads": threads, "clients": clients, **searched})
            print(json.dumps(levels[-1]), file=sys.stderr)
    faiss.omp_set_num_threads(default_threads)
    batched = []
    for clients in args.clients_scale:
        batched.append({"clients": clients, **asyncio.run(micro_batched_searches(index, queries, clients,
                                                                                 args.scale_searches))})  # fmt: skip
        print(json.dumps({"micro_batched": batched[-1]}), file=sys.stderr)
    index.close()
    return {"recall_at_10": recall, "ef_search_ladder": ladder, "levels": levels, "micro_batched": batched}


async def micro_batched_searches(index, queries: np.ndarray, clients: int, total: int) -> dict:
    """Vector search as `clipkit serve` runs it: N clients (coroutines) submit one query each to the server's
    MicroBatcher (its default settings), which makes one FAISS call per batch in an executor thread."""
    from concurrent.futures import ThreadPoolExecutor

    from clipkit.serve import ServeConfig
    from clipkit.serve.batching import MicroBatcher

    config, sizes = ServeConfig(), []
    executor = ThreadPoolExecutor(1)
    batcher = MicroBatcher(lambda rows: list(index.search(np.stack(rows), 10)[1]), executor=executor,
                           max_batch=config.max_batch, max_wait_s=config.batch_wait_ms / 1000,
                           max_queue=max(config.max_queue, clients), on_batch=sizes.append)  # fmt: skip
    batcher.start()
    per_client = max(1, total // clients)

    async def client(seed: int) -> list[float]:
        rng = np.random.default_rng(seed)
        times = []
        for _ in range(per_client):
            start = time.perf_counter()
            await batcher.submit(queries[rng.integers(len(queries))])
            times.append(time.perf_counter() - start)
        return times

    started = time.perf_counter()
    times = [t for ts in await asyncio.gather(*(client(i) for i in range(clients))) for t in ts]
    elapsed = time.perf_counter() - started
    await batcher.stop()
    executor.shutdown()
    p50, p99 = np.percentile(np.array(times) * 1000, [50, 99])
    return {"searches": len(times), "searches_per_s": round(len(times) / elapsed, 1),
            "p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3),
            "mean_batch": round(float(np.mean(sizes)), 2) if sizes else None}  # fmt: skip


def concurrent_searches(index, queries: np.ndarray, clients: int, total: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    per_client = max(1, total // clients)

    def client(seed: int) -> list[float]:
        rng = np.random.default_rng(seed)
        times = []
        for _ in range(per_client):
            query = queries[rng.integers(len(queries))][None]
            start = time.perf_counter()
            index.search(query, 10)
            times.append(time.perf_counter() - start)
        return times

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        times = [t for ts in pool.map(client, range(clients)) for t in ts]
    elapsed = time.perf_counter() - started
    p50, p99 = np.percentile(np.array(times) * 1000, [50, 99])
    return {"searches": len(times), "searches_per_s": round(len(times) / elapsed, 1),
            "p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}  # fmt: skip


def bench_end_to_end(index_dir: Path, args) -> dict:
    process, url = start_server(index_dir, index_dir.parent / "scale-serve.log")
    levels = []
    try:
        for clients in args.clients_scale:
            levels.append(asyncio.run(load(url, clients, args.requests, args.level_seconds, seed=clients)))
            print(json.dumps(levels[-1]), file=sys.stderr)
    finally:
        stop_server(process)
    return {"server": "clipkit serve (default settings, micro-batching)", "levels": levels}


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    args = parse_args()
    import torch

    report = {
        "benchmark": "clipkit serve /v1/search under load; exact vs approximate vector search",
        "command": "python scripts/bench_serve.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "fastapi": metadata.version("fastapi"),
            "uvicorn": metadata.version("uvicorn"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {k: v for k, v in vars(args).items() if k != "out"},
    }
    started = time.perf_counter()
    if not args.skip_serving:
        with tempfile.TemporaryDirectory(prefix="bench_serve.") as tmp:
            report["serving"] = bench_serving(args, Path(tmp))
        report["text_encoder"] = bench_text_encoder(args)
    if not args.skip_vectors:
        report["vector_search"] = bench_vectors(args)
    if args.scale_vectors:
        with tempfile.TemporaryDirectory(prefix="bench_scale.") as tmp:
            report["scale"] = bench_scale(args, Path(tmp))
    report["total_s"] = round(time.perf_counter() - started, 1)
    print(write_report(report, args.out))


if __name__ == "__main__":
    main()
