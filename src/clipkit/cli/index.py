"""Build a text-to-image search index of a collection, or add images to one; serve it with `clipkit serve`.

SOURCE is a folder of images (searched recursively; IMAGE.txt beside an image is its caption),
webdataset shards (FILE.tar, a folder of .tar files, or a glob / {000..009} pattern), or a CSV / TSV /
JSONL / Parquet table with an image path column (paths relative to the table) and optional caption and metadata
columns. Images with the same content are indexed once; undecodable ones are skipped and listed, and so is a
damaged shard (truncated or corrupt), whose samples before the damage are kept.
`--from-embeddings DIR` builds from what `clipkit embed` (or `clip-retrieval inference`, with --model naming its
model) wrote to DIR instead, without embedding again.
The index type follows the collection's size and --max-memory (flat, HNSW, IVF-Flat, OPQ + IVF-PQ, or an
IVF index memory-mapped from disk), and its search setting is tuned to --target-recall recall@10 against
exact search; index.json records the measured recall and latency.
The index folder holds a FAISS index, an SQLite metadata table and index.json (which records the model);
every write goes to temporary files renamed at the end, so an interrupted build or add changes nothing.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="embed a collection and write a new index", description=__doc__)
    build.add_argument(
        "--model",
        help="run dir, exported dir, local-dir:PATH, config or architecture (with --from-embeddings: checked "
        "against the embeddings' model; required for clip-retrieval's, which do not name theirs)",
    )
    inputs = build.add_mutually_exclusive_group(required=True)
    inputs.add_argument(
        "--images", metavar="SOURCE", help="image folder, shards, or a table (CSV, JSONL, Parquet)"
    )
    inputs.add_argument(
        "--from-embeddings",
        metavar="DIR",
        help="embeddings written by `clipkit embed` or `clip-retrieval inference`",
    )
    build.add_argument("--out", required=True, metavar="INDEX_DIR", help="folder to write the index to")
    build.add_argument(
        "--index", choices=("auto", "flat", "hnsw", "ivf", "ivfpq"), default="auto",
        help="auto: chosen for the collection's size and --max-memory (default); flat: exact; "
        "hnsw / ivf / ivfpq: approximate",
    )  # fmt: skip
    build.add_argument(
        "--max-memory", default="8GiB", metavar="SIZE", help="memory the index may take (default: 8GiB)"
    )
    build.add_argument(
        "--target-recall", type=float, default=0.95,
        help="recall@10 against exact search that efSearch / nprobe are tuned to (default: 0.95)",
    )  # fmt: skip
    build.add_argument("--overwrite", action="store_true", help="replace an index already in --out")
    _common(build)

    add = actions.add_parser("add", help="append new images to an index (skips ones already in it)")
    add.add_argument("--index", required=True, metavar="INDEX_DIR", help="the index to add to")
    add.add_argument(
        "--images",
        required=True,
        metavar="SOURCE",
        help="image folder, shards, or a table (CSV, JSONL, Parquet)",
    )
    add.add_argument("--model", help="default: the model the index records; a different one is refused")
    _common(add)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pretrained",
        help="weights for an architecture or config MODEL: a .safetensors / .pt file, an open_clip tag (laion2b_s34b_b79k), hf-hub:ORG/NAME",
    )
    add_encoding_options(parser)


def add_encoding_options(parser: argparse.ArgumentParser) -> None:
    """How images are read and embedded: shared by `clipkit index build/add` and `clipkit embed`."""
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="decoding processes per process (0: decode in the process itself)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cuda, cuda:1, cpu (default: this process's GPU when there is one, else cpu)",
    )
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast (default: fp32)"
    )
    parser.add_argument(
        "--image-column", default="image", help="table column with image paths (default: image)"
    )
    parser.add_argument(
        "--caption-column", default="caption", help="table column with captions (default: caption)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    import torch

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU feature probing is noise

    from clipkit.errors import ClipkitError
    from clipkit.retrieval import add_to_index, build_index, build_index_from_embeddings

    common = {
        "pretrained": args.pretrained,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "precision": args.precision,
        "image_column": args.image_column,
        "caption_column": args.caption_column,
        "progress": not args.no_progress and sys.stderr.isatty(),
    }
    if args.action == "build" and args.from_embeddings:
        report = build_index_from_embeddings(
            args.from_embeddings, args.out, model=args.model, pretrained=args.pretrained, kind=args.index,
            max_memory=args.max_memory, target_recall=args.target_recall, overwrite=args.overwrite,
        )  # fmt: skip
    elif args.action == "build":
        if args.model is None:
            raise ClipkitError("--model is required with --images (it embeds them)")
        report = build_index(
            args.images, args.out, model=args.model, kind=args.index, max_memory=args.max_memory,
            target_recall=args.target_recall, overwrite=args.overwrite, **common,
        )  # fmt: skip
    else:
        report = add_to_index(args.index, args.images, model=args.model, **common)
    from clipkit.retrieval import read_manifest

    manifest = read_manifest(report.index_dir)
    tuning = manifest.get("tuning", {})
    if "recall_at_10" in tuning:
        searched = {k: v for k, v in manifest["params"].items() if k in ("ef_search", "nprobe")}
        print(
            f"{manifest['kind']} index {searched or ''}: recall@10 {tuning['recall_at_10']:.3f} against exact search "
            f"(target {tuning['target_recall']}), {tuning['latency_ms']['p50']:.2f} ms per query (p50)"
        )
    print(
        f"{report.index_dir}: {report.count} images ({report.added} added, "
        f"{report.duplicates} already indexed{describe_skipped(report.skipped)}); "
        f"serve it with: clipkit serve --index {report.index_dir}"
    )
    return 0


def describe_skipped(skipped: list[tuple[str, str]], *, listed_in: str | None = None) -> str:
    """', 2 undecodable images and 1 damaged shard skipped (...)' for a command's summary line; '' for none.
    Damaged shards are named (the first few), as the fix is to re-copy them."""
    from clipkit.retrieval.sources import is_damaged_shard

    if not skipped:
        return ""
    shards = [uri for uri, reason in skipped if is_damaged_shard((uri, reason))]
    images = len(skipped) - len(shards)
    parts = [f"{images} undecodable image(s)"] if images else []
    if shards:
        named = ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
        parts.append(f"{len(shards)} damaged shard(s) (re-copy {named})")
    where = f", listed in {listed_in}" if listed_in else ""
    return f", {' and '.join(parts)} skipped{where}"
