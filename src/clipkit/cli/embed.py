"""Embed a collection's images into clip-retrieval's layout: DIR/img_emb/img_emb_NNNN.npy and
DIR/metadata/metadata_NNNN.parquet in pairs, row for row, plus DIR/embeddings.json (model, dimension, counts).
The metadata has clip-retrieval's columns (image_path for image files, caption, KEY.json / table fields such as
url flattened into columns), so `clip-retrieval back` serves the index autofaiss builds from it.

Runs in one process, or across processes, GPUs and machines with the same arguments under
`accelerate launch -m clipkit.embed`: the source is cut into parts of --part-size images and each process
embeds its share, so every image is embedded once. Each part is written under a temporary name and renamed;
rerunning a stopped job finishes only the parts that are missing. Build an index from the result with
`clipkit index build --from-embeddings DIR`.
"""

from __future__ import annotations

import argparse

from clipkit.cli.index import add_encoding_options, describe_skipped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="run dir, exported dir, local-dir:PATH, config or architecture"
    )
    parser.add_argument(
        "--pretrained", help="weights (.safetensors / .pt) for an architecture or config MODEL"
    )
    parser.add_argument(
        "--images",
        required=True,
        metavar="SOURCE",
        help="image folder, shards, or a table (CSV, JSONL, Parquet)",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="folder for the embeddings (resumes a job there)"
    )
    parser.add_argument(
        "--part-size",
        type=int,
        default=10_000,
        help="images per img_emb / metadata file pair (default: 10000)",
    )
    add_encoding_options(parser)


def run(args: argparse.Namespace) -> int:
    from clipkit.retrieval.embed_job import embed_collection

    state, report = run_collection_job(args, embed_collection)
    if state.is_main_process:
        skipped = describe_skipped(report.skipped, listed_in=f"{report.out_dir}/embeddings.json")
        print(
            f"{report.out_dir}: {report.images} images embedded in {report.parts} part(s)"
            f"{skipped}; this process did {report.parts_done_here} part(s) at "
            f"{report.images_per_second:.1f} images/s; index them with: "
            f"clipkit index build --from-embeddings {report.out_dir} --out INDEX_DIR"
        )
    return 0


def run_collection_job(args: argparse.Namespace, collect):
    """Load `--model` on this process's device and run `collect` (embed_collection or one built on it, e.g.
    curate's score_collection) over `--images` into `--out` as this process's share; (state, report)."""
    import logging
    import sys

    import torch
    from accelerate import PartialState

    from clipkit.retrieval import load_encoder

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    # One process without a launcher; rank and world size under one. Without cpu=True, Accelerate under
    # torchrun on a GPU-less machine reports one process.
    state = PartialState(cpu=not torch.cuda.is_available())
    device = args.device or str(state.device)
    encoder, identity = load_encoder(
        args.model, pretrained=args.pretrained, device=device, precision=args.precision
    )
    report = collect(
        args.images,
        args.out,
        encoder=encoder,
        identity=identity,
        rank=state.process_index,
        world_size=state.num_processes,
        barrier=state.wait_for_everyone,
        part_size=args.part_size,
        batch_size=args.batch_size,
        workers=args.workers,
        image_column=args.image_column,
        caption_column=args.caption_column,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    return state, report
