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
    from clipkit.cli.embed import run_collection_job
    from clipkit.cli.index import describe_skipped
    from clipkit.curate.score import score_collection

    state, report = run_collection_job(args, score_collection)  # as `clipkit embed`, plus the scores
    if state.is_main_process:
        embedded = report.embedded
        skipped = describe_skipped(embedded.skipped, listed_in=f"{embedded.out_dir}/embeddings.json")
        print(
            f"{embedded.out_dir}: {embedded.images} images scored in {embedded.parts} part(s){skipped}; "
            f"choose what to keep with: clipkit filter --scores {embedded.out_dir} --top-fraction 0.5 --out KEYS.txt"
        )
    return 0
