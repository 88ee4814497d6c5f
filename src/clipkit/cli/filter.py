"""Keep a subset of a scored collection (`clipkit score`) by a rule over its columns, written as a key list that
training reads (`--out KEYS.txt`, then `clipkit train data.keep_keys=KEYS.txt`) or as new shards
(`--reshard DIR`: the same layout, the image bytes unchanged, the counts in DIR/_info.json).

The rule, applied in this order: bounds on columns (--min-score, caption-length bounds, --min/--max
COLUMN=VALUE); --top-fraction of the whole collection by CLIP score (with --neighbours K, by the
neighbour score: the caption against its image and the image's K nearest images); --dedup: of each group of near-duplicate
images (cosine of their embeddings >= THRESHOLD; exact search up to 50,000 images, k-means clusters as SemDeDup
above), the highest-scoring one is kept, ties by name. A summary of what was removed and why, with pictures
(score histogram with the cut, samples just above and below it, duplicate groups), goes to --summary
(default: OUT.summary/). A rule that keeps nothing writes nothing.
"""

from __future__ import annotations

import argparse


def _bound(text: str) -> tuple[str, float]:
    column, sep, value = text.partition("=")
    try:
        if not sep or not column:
            raise ValueError
        return column, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected COLUMN=NUMBER, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, metavar="DIR", help="a `clipkit score` folder")
    output = parser.add_mutually_exclusive_group(required=True)
    output.add_argument(
        "--out", metavar="FILE", help="key list to write (SHARD#KEY per line) for data.keep_keys"
    )
    output.add_argument("--reshard", metavar="DIR", help="write the kept samples as new training shards here")
    parser.add_argument(
        "--top-fraction", type=float, help="keep this fraction of the collection, highest CLIP score first"
    )
    parser.add_argument("--min-score", type=float, help="keep samples whose CLIP score is at least this")
    parser.add_argument(
        "--neighbours",
        type=int,
        metavar="K",
        help="rank by neighbour_score instead of clip_score (--top-fraction, --dedup's keeper): the caption's "
        "mean CLIP score with its image and the image's K nearest images, which a scorer trained on these very "
        "pairs cannot raise by having memorised them (10 is a good start; docs/BENCHMARKS.md, Curation)",
    )
    parser.add_argument(
        "--dedup", type=float, metavar="THRESHOLD", help="remove near-duplicates at this cosine (e.g. 0.95)"
    )
    parser.add_argument(
        "--dedup-center",
        action="store_true",
        help="compare embeddings less their mean (for a model whose embeddings all sit in a narrow cone)",
    )
    parser.add_argument("--min-caption-length", type=float, help="fewest caption characters kept")
    parser.add_argument("--max-caption-length", type=float, help="most caption characters kept")
    parser.add_argument(
        "--min",
        type=_bound,
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="a lower bound on any numeric column (repeatable)",
    )
    parser.add_argument(
        "--max",
        type=_bound,
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="an upper bound on any numeric column (repeatable)",
    )
    parser.add_argument(
        "--model", help="the model the scores must come from (refused if they were made by another)"
    )
    parser.add_argument("--pretrained", help="weights for an architecture or config --model")
    parser.add_argument(
        "--summary", metavar="DIR", help="summary.json and pictures (default: OUT.summary or DIR.summary)"
    )
    parser.add_argument(
        "--samples-per-shard", type=int, default=10_000, help="with --reshard (default: 10000)"
    )


def rule_from_args(args: argparse.Namespace):
    from clipkit.curate.select import Bound, Rule

    bounds = [Bound("clip_score", True, args.min_score)] if args.min_score is not None else []
    if args.min_caption_length is not None:
        bounds.append(Bound("caption_length", True, args.min_caption_length))
    if args.max_caption_length is not None:
        bounds.append(Bound("caption_length", False, args.max_caption_length))
    bounds += [Bound(column, True, value) for column, value in args.min]
    bounds += [Bound(column, False, value) for column, value in args.max]
    return Rule(
        bounds=bounds,
        top_fraction=args.top_fraction,
        dedup=args.dedup,
        dedup_center=args.dedup_center,
        neighbours=args.neighbours,
    )


def check_model(scores_model: dict, model: str, pretrained: str | None, where: str) -> None:
    from clipkit.errors import ClipkitError
    from clipkit.models import build_model
    from clipkit.retrieval.encoder import model_fingerprint

    fingerprint = model_fingerprint(build_model(model, pretrained=pretrained))
    if scores_model.get("fingerprint") != fingerprint:
        raise ClipkitError(
            f"{where} was scored by another model ({scores_model.get('name')}, fingerprint "
            f"{str(scores_model.get('fingerprint'))[:12]}) than --model {model} ({fingerprint[:12]}); rescore with "
            "`clipkit score --model` or name the model that scored them"
        )


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import logging

    from clipkit.curate.output import check_not_empty, write_key_list, write_reshard, write_summary
    from clipkit.curate.score import read_scores
    from clipkit.curate.select import select

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    rule = rule_from_args(args)
    collection = read_scores(args.scores)
    if rule.neighbours is not None:
        from clipkit.curate.neighbours import add_neighbour_score

        add_neighbour_score(collection, rule.neighbours)
    rule.check(list(collection.columns))
    if args.model:
        check_model(collection.manifest["model"], args.model, args.pretrained, args.scores)
    selection = select(collection, rule)
    check_not_empty(selection, len(collection))
    target = args.out or args.reshard
    described = {**dataclasses.asdict(rule)}
    if args.out:
        kept = write_key_list(collection, selection, args.out)
        written = f"{kept} keys to {args.out}; train on them with data.keep_keys={args.out}"
    else:
        result = write_reshard(collection, selection, args.reshard, samples_per_shard=args.samples_per_shard)
        written = f"{result['samples']} samples in {result['shards']} shard(s) to {args.reshard}"
    summary_dir = args.summary or f"{str(target).rstrip('/')}.summary"
    write_summary(collection, selection, described, summary_dir)
    reasons = "; ".join(f"{n} {reason}" for reason, n in selection.removed_by().items()) or "none removed"
    print(
        f"kept {int(selection.kept.sum())} of {len(collection)} ({reasons}): {written}; summary in {summary_dir}"
    )
    return 0
