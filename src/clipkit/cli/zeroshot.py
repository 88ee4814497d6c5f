"""Zero-shot classification (or retrieval) of a model on a labelled dataset, with CLIP_benchmark's metrics.

MODEL is a clipkit run directory, an exported directory, local-dir:PATH, a transformers checkpoint (dir or
hf:ORG/NAME), a conf/model name, or an open_clip architecture with --pretrained FILE. DATASET is a
CLIP_benchmark wds directory, a folder of class sub-folders, or webdataset shards with KEY.json labels
(plus --classnames); with --task retrieval, captioned shards (KEY.jpg + KEY.txt) or a CLIP_benchmark
retrieval directory. The text classifier is computed once per model and prompt set and cached (--cache-dir).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from clipkit.files import write_text_atomic

log = logging.getLogger(__name__)

MAX_SKIPPED_LISTED = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="run dir, exported dir, local-dir:PATH, hf:ORG/NAME or architecture"
    )
    parser.add_argument(
        "--pretrained", help="weights (.safetensors / .pt) for an architecture or config MODEL"
    )
    parser.add_argument("--dataset", required=True, help="dataset directory, shard file or shard pattern")
    parser.add_argument(
        "--task", choices=("auto", "classification", "retrieval"), default="auto",
        help="auto: retrieval for CLIP_benchmark retrieval dirs and shards with captions but no labels",
    )  # fmt: skip
    parser.add_argument("--split", default="test", help="split folder of a CLIP_benchmark directory")
    parser.add_argument("--classnames", help="class names file, one per line (line i names label i)")
    parser.add_argument("--templates", help="prompt templates file, one per line with {c}, or a JSON file")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype"
    )
    parser.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10], help="retrieval recall@k")
    parser.add_argument("--output", help="write the results as JSON (CLIP_benchmark's keys and more)")
    parser.add_argument("--plot", help="draw the confusion matrix to this image file (.png, .pdf, .svg)")
    parser.add_argument(
        "--cache-dir", help="text classifier cache (default: $CLIPKIT_CACHE, else ~/.cache/clipkit)"
    )
    parser.add_argument("--no-cache", action="store_true", help="compute the text classifier without caching")


def run(args: argparse.Namespace) -> int:
    import torch

    from clipkit.errors import ClipkitError
    from clipkit.eval import (
        default_cache_dir,
        evaluate_retrieval,
        evaluate_zeroshot,
        load_or_build_zeroshot_classifier,
        open_eval_dataset,
    )
    from clipkit.models import build_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dataset = open_eval_dataset(
        args.dataset, task=args.task, split=args.split, classnames=args.classnames, templates=args.templates
    )
    if args.plot and dataset.task == "retrieval":
        raise ClipkitError("--plot draws a classification confusion matrix; drop it for retrieval")
    bundle = build_model(args.model, pretrained=args.pretrained, device=device)
    options = dict(device=device, batch_size=args.batch_size, workers=args.workers, precision=args.precision)
    report = {"dataset": args.dataset, "model": args.model, "pretrained": args.pretrained}
    if dataset.task == "retrieval":
        result = evaluate_retrieval(
            bundle.model, bundle.tokenizer, dataset, transform=bundle.eval_transform, ks=args.recall_k,
            progress=True, **options,
        )  # fmt: skip
        report.update(task="zeroshot_retrieval", metrics=result.metrics, num_texts=result.num_texts)
    else:
        cached = load_or_build_zeroshot_classifier(
            bundle.model, bundle.tokenizer, dataset.classnames, dataset.templates, device=device,
            cache_dir=None if args.no_cache else Path(args.cache_dir or default_cache_dir()),
            precision=args.precision, progress=True,
        )  # fmt: skip
        if cached.path is not None:
            log.info("text classifier %s %s", "read from" if cached.from_cache else "cached at", cached.path)
        result = evaluate_zeroshot(
            bundle.model, bundle.tokenizer, dataset, transform=bundle.eval_transform,
            classifier=cached.classifier, progress=True, **options,
        )  # fmt: skip
        metrics = dict(result.metrics)
        report.update(
            task="zeroshot_classification",
            metrics={k: metrics.pop(k) for k in ("acc1", "acc5", "mean_per_class_recall") if k in metrics},
            classnames=dataset.classnames,
            **metrics,  # per_class_recall, confusion_matrix
            text_classifier={
                "cache": str(cached.path) if cached.path else None,
                "from_cache": cached.from_cache,
            },
        )
    report.update(
        layout=dataset.layout,
        num_images=result.num_images,
        skipped_images=len(result.skipped),
        skipped=[{"key": s.key, "reason": s.reason} for s in result.skipped[:MAX_SKIPPED_LISTED]],
    )
    print(format_table(report, dataset.describe()))
    if args.output:
        write_text_atomic(args.output, json.dumps(report, indent=2) + "\n")
        log.info("results written to %s", args.output)
    if args.plot:
        from clipkit.eval.plot import plot_confusion_matrix

        plot_confusion_matrix(
            report["confusion_matrix"], dataset.classnames, args.plot, title=f"{args.model} on {args.dataset}"
        )
        log.info("confusion matrix drawn to %s", args.plot)
    return 0


def format_table(report: dict, description: str) -> str:
    lines = [
        f"{report['dataset']} ({description}): {report['num_images']} images"
        + (f", {report['num_texts']} captions" if "num_texts" in report else "")
        + f", {report['skipped_images']} skipped (undecodable)"
    ]
    width = max(len(k) for k in report["metrics"])
    lines += [f"  {key:<{width}}  {value:.4f}" for key, value in report["metrics"].items()]
    if report["skipped"]:
        lines.append(f"  skipped, e.g. {report['skipped'][0]['key']}: {report['skipped'][0]['reason']}")
    return "\n".join(lines)
