"""Latency and queries/s of `clipkit serve`'s /v1/search under 1, 8 and 32 concurrent clients, with and
without micro-batching; text encoding with and without padding; and exact vs HNSW (and IVF) search on
100k random 512-d vectors.

Serving: one index (a model with fixed random weights, a few generated images) is served twice on
loopback, by `clipkit serve` with micro-batching (default settings) and with `--max-batch 1` (each query
encoded alone: the peer). Each concurrency level runs on one server, then the other, then the next level,
so drift on a shared machine hits both alike. Every level is bounded: `--requests` per level (after a
short warm-up) or `--level-seconds`, whichever ends first. The load generator (httpx, asyncio) runs in
this process on the same cores as the server, as a client on the same machine would.

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

from _report import write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

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
    report["total_s"] = round(time.perf_counter() - started, 1)
    print(write_report(report, args.out))


if __name__ == "__main__":
    main()
