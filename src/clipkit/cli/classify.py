"""Zero-shot classify images against labels you name: prints each image's top labels with probabilities.

IMAGE arguments are files, folders (searched recursively for images) or globs. Each label becomes the
prompt "a photo of a {label}." unless --templates gives others; the text classifier is cached like
`clipkit zeroshot`'s. Probabilities are the model's own: a softmax over labels of its scaled cosine
similarities (CLIP), or an independent sigmoid per label when the model has a logit bias (SigLIP).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a photo of a {c}."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or globs")
    parser.add_argument(
        "--model", required=True, help="run dir, exported dir, local-dir:PATH, hf:ORG/NAME or architecture"
    )
    parser.add_argument(
        "--pretrained", help="weights (.safetensors / .pt) for an architecture or config MODEL"
    )
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='comma-separated labels, e.g. "cat,dog,bird"')
    labels.add_argument("--labels-file", help="labels, one per line")
    parser.add_argument(
        "--templates", help=f"prompt templates file with {{c}} (default: '{DEFAULT_TEMPLATE}')"
    )
    parser.add_argument("--top-k", type=int, default=3, help="labels shown per image")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument(
        "--cache-dir", help="text classifier cache (default: $CLIPKIT_CACHE, else ~/.cache/clipkit)"
    )
    parser.add_argument("--no-cache", action="store_true", help="compute the text classifier without caching")


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from clipkit.errors import ClipkitError
    from clipkit.eval import default_cache_dir, load_or_build_zeroshot_classifier
    from clipkit.eval.classifier import eval_mode
    from clipkit.eval.datasets import check_templates, read_classnames, read_templates
    from clipkit.eval.loader import read_image
    from clipkit.models import build_model

    if args.top_k < 1:
        raise ClipkitError(f"--top-k must be at least 1, got {args.top_k}")
    labels = read_classnames(args.labels_file) if args.labels_file else parse_labels(args.labels)
    templates = read_templates(args.templates) if args.templates else [DEFAULT_TEMPLATE]
    check_templates(templates, labels, origin=args.templates or "default template")
    paths = expand_image_arguments(args.images)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bundle = build_model(args.model, pretrained=args.pretrained, device=device)
    model = bundle.model
    classifier = load_or_build_zeroshot_classifier(
        model, bundle.tokenizer, labels, templates, device=device,
        cache_dir=None if args.no_cache else Path(args.cache_dir or default_cache_dir()),
    ).classifier  # fmt: skip

    results, skipped = [], []
    top_k = min(args.top_k, len(labels))
    for start in range(0, len(paths), args.batch_size):
        images, names = [], []
        for path in paths[start : start + args.batch_size]:
            image, reason = read_image(path)
            if image is None:
                skipped.append({"image": str(path), "reason": reason})
                print(f"skipped {path}: {reason}", file=sys.stderr)
                continue
            images.append(bundle.eval_transform(image))
            names.append(str(path))
        if not images:
            continue
        with torch.inference_mode(), eval_mode(model):
            features = F.normalize(model.encode_image(torch.stack(images).to(device)), dim=-1)  # (B, D)
            probabilities = label_probabilities(model, features, classifier)  # (B, L)
        values, indices = probabilities.topk(top_k, dim=1)
        for name, row_values, row_indices in zip(names, values.tolist(), indices.tolist(), strict=True):
            top = [
                {"label": labels[i], "probability": p} for p, i in zip(row_values, row_indices, strict=True)
            ]
            results.append({"image": name, "top": top})

    if args.json:
        print(
            json.dumps(
                {"model": args.model, "labels": labels, "results": results, "skipped": skipped}, indent=2
            )
        )
    else:
        width = max((len(r["image"]) for r in results), default=0)
        for r in results:
            print(
                f"{r['image']:<{width}}  "
                + "  ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"])
            )
        if skipped:
            print(
                f"{len(results)} image(s) classified, {len(skipped)} skipped (undecodable)", file=sys.stderr
            )
    if not results:
        raise ClipkitError(f"none of the {len(paths)} image(s) could be decoded")
    return 0


def label_probabilities(model, image_features, classifier):
    """(B, L): softmax of logit_scale x cosine (CLIP), or sigmoid(scale x cosine + bias) with a logit bias."""
    import torch

    logits = model.logit_scale.exp() * image_features @ classifier.to(image_features.dtype)  # (B, L)
    if getattr(model, "logit_bias", None) is not None:  # SigLIP scores each label on its own
        return torch.sigmoid(logits + model.logit_bias)
    return logits.softmax(dim=1)


def parse_labels(text: str) -> list[str]:
    from clipkit.errors import ClipkitError

    labels = [label.strip() for label in text.split(",") if label.strip()]
    if not labels:
        raise ClipkitError(
            '--labels names no labels; give them comma-separated, e.g. --labels "cat,dog,bird"'
        )
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ClipkitError(f"--labels repeats {duplicates}; give each label once")
    return labels


def expand_image_arguments(arguments: list[str]) -> list[Path]:
    """Files as given, folders searched recursively for images, globs expanded (sorted)."""
    from clipkit.errors import ClipkitError
    from clipkit.eval.datasets import IMAGE_EXTENSIONS, is_image_file

    paths: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_file():
            paths.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if is_image_file(p))
            if not found:
                raise ClipkitError(f"folder {argument} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(found)
        elif any(ch in argument for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(argument, recursive=True) if is_image_file(Path(p)))
            if not found:
                raise ClipkitError(f"no images match {argument}")
            paths.extend(found)
        else:
            raise ClipkitError(f"image {argument} not found (give files, folders or globs)")
    return paths
