"""Write a model in open_clip's local-dir layout (open_clip_config.json + open_clip_model.safetensors).

SOURCE is a clipkit run directory, an exported directory, hf-hub:ORG/NAME, a config name under conf/model,
or an open_clip architecture name with --pretrained (a weights file, an open_clip tag, hf-hub:ORG/NAME). Load the result with
open_clip.create_model_and_transforms("local-dir:DIR").
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="run dir, model dir, conf/model name or open_clip architecture")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument(
        "--pretrained",
        help="weights for an architecture or config SOURCE: a .safetensors / .pt file, an open_clip tag (laion2b_s34b_b79k), hf-hub:ORG/NAME",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")


def run(args: argparse.Namespace) -> int:
    from clipkit.models import build_model, export_model

    bundle = build_model(args.source, pretrained=args.pretrained)
    out = export_model(bundle, args.out, overwrite=args.overwrite)
    print(f"exported {bundle.name} to {out} (load with open_clip: 'local-dir:{out}')")
    return 0
