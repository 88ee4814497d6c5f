"""Interpolate two models of one architecture in weight space (WiSE-FT) and export the result.

A and B are any models `--model` takes (run directories, exported directories, hf-hub:ORG/NAME, ...);
typically A is the model fine-tuning started from and B the fine-tuned one. The result is
(1 - alpha) * A + alpha * B, written in open_clip's layout with A's preprocessing and tokenizer.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="the model at alpha 0 (e.g. the pretrained start)")
    parser.add_argument("b", metavar="B", help="the model at alpha 1 (e.g. the fine-tuned model)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of B (default: 0.5)")
    parser.add_argument("--out", required=True, help="output directory (open_clip local-dir layout)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    from clipkit.errors import ClipkitError
    from clipkit.models import build_model, export_model
    from clipkit.models.merge import merge_models

    if not 0.0 <= args.alpha <= 1.0:
        raise ClipkitError(f"--alpha {args.alpha} must be in [0, 1] (0: A, 1: B)")
    merged = merge_models(build_model(args.a), build_model(args.b), args.alpha)
    out = export_model(merged, args.out, overwrite=args.overwrite)
    print(
        f"{out}: (1 - {args.alpha:g}) * {args.a} + {args.alpha:g} * {args.b} (load with open_clip: 'local-dir:{out}')"
    )
    return 0
