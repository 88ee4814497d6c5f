"""Score a collection for curation: `clipkit embed`'s image embeddings and metadata (clip-retrieval's layout),
plus caption embeddings (DIR/text_emb/) and per-sample columns (DIR/scores/): the CLIP score (cosine of the
image and caption embeddings), caption length in characters and words, image width and height; DIR/scores.json
records the model. Resumable and multi-process as `clipkit embed` is (`accelerate launch -m clipkit.score`).
Choose what to keep with `clipkit filter --scores DIR`.
"""

from __future__ import annotations

import argparse

from clipkit.cli.embed import add_arguments as add_embed_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_embed_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    import torch
    from accelerate import PartialState

    from clipkit.cli.index import describe_skipped
    from clipkit.curate.score import score_collection
    from clipkit.retrieval import load_encoder

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    state = PartialState(cpu=not torch.cuda.is_available())  # as `clipkit embed`
    device = args.device or str(state.device)
    encoder, identity = load_encoder(
        args.model, pretrained=args.pretrained, device=device, precision=args.precision
    )
    report = score_collection(
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
    if state.is_main_process:
        embedded = report.embedded
        skipped = describe_skipped(embedded.skipped, listed_in=f"{embedded.out_dir}/embeddings.json")
        print(
            f"{embedded.out_dir}: {embedded.images} images scored in {embedded.parts} part(s){skipped}; "
            f"choose what to keep with: clipkit filter --scores {embedded.out_dir} --top-fraction 0.5 --out KEYS.txt"
        )
    return 0
