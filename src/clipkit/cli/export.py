"""Write a model in open_clip's local-dir layout (default) or as a Hugging Face transformers model.

SOURCE is a clipkit run directory, an exported directory, a transformers CLIP/SigLIP directory or
hf:ORG/NAME, a config name under conf/model, or an open_clip architecture name with --pretrained FILE.
--format open_clip (default): open_clip_config.json + open_clip_model.safetensors; load with
open_clip.create_model_and_transforms("local-dir:DIR"). --format hf: a transformers CLIPModel (native
towers) or SiglipModel (timm-tower SigLIP) with tokenizer, image processor and model card; load with
transformers' from_pretrained(DIR) or pipeline("zero-shot-image-classification", model=DIR).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help="run dir, model dir, hf:ORG/NAME, conf/model name or open_clip architecture"
    )
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument(
        "--format", choices=("open_clip", "hf"), default="open_clip",
        help="open_clip: open_clip's local-dir layout (default); hf: a Hugging Face transformers model",
    )  # fmt: skip
    parser.add_argument(
        "--pretrained", help="weights (.safetensors / .pt) for an architecture or config SOURCE"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")


def run(args: argparse.Namespace) -> int:
    from clipkit.models import build_model, export_model

    bundle = build_model(args.source, pretrained=args.pretrained)
    if args.format == "hf":
        from clipkit.models.hf_export import export_transformers

        out = export_transformers(bundle, args.out, overwrite=args.overwrite, run_dir=args.source)
        print(f"exported {bundle.name} to {out} (load with transformers: from_pretrained('{out}'))")
        return 0
    out = export_model(bundle, args.out, overwrite=args.overwrite)
    print(f"exported {bundle.name} to {out} (load with open_clip: 'local-dir:{out}')")
    return 0
