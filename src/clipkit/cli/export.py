"""Write a model in open_clip's local-dir layout (default) or as a Hugging Face transformers model.

SOURCE is a clipkit run directory, an exported directory, hf-hub:ORG/NAME, a transformers CLIP/SigLIP
directory or hf:ORG/NAME, a config name under conf/model, or an open_clip architecture name with --pretrained
(a weights file, an open_clip tag, hf-hub:ORG/NAME).
--format open_clip (default): open_clip_config.json + open_clip_model.safetensors; load with
open_clip.create_model_and_transforms("local-dir:DIR"). --format hf: a transformers CLIPModel (native
towers) or SiglipModel (timm-tower SigLIP) with tokenizer, image processor and model card; load with
transformers' from_pretrained(DIR) or pipeline("zero-shot-image-classification", model=DIR).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clipkit.errors import ClipkitError


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
        "--pretrained",
        help="weights for an architecture or config SOURCE: a .safetensors / .pt file, an open_clip tag (laion2b_s34b_b79k), hf-hub:ORG/NAME",
    )
    parser.add_argument(
        "--ema", action="store_true",
        help="SOURCE is a training checkpoint (RUN/checkpoints/step_N): export its EMA of the weights "
        "(train.ema_decay), as a finished run's model/ is, instead of the optimizer's weights",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")


def run(args: argparse.Namespace) -> int:
    from clipkit.models import build_model, export_model

    bundle = build_model(args.source, pretrained=args.pretrained)
    _choose_weights(bundle, args)
    if args.format == "hf":
        from clipkit.models.hf_export import export_transformers

        out = export_transformers(bundle, args.out, overwrite=args.overwrite, run_dir=args.source)
        print(f"exported {bundle.name} to {out} (load with transformers: from_pretrained('{out}'))")
        return 0
    out = export_model(bundle, args.out, overwrite=args.overwrite)
    print(f"exported {bundle.name} to {out} (load with open_clip: 'local-dir:{out}')")
    return 0


def _choose_weights(bundle, args: argparse.Namespace) -> None:
    """With --ema, a checkpoint's EMA replaces the weights just loaded; without it, a checkpoint that has one
    says so (the run's final model/ is the EMA, so the two exports differ)."""
    from clipkit.models.weights import find_ema_weights, load_state_dict_into, read_ema_weights

    source = Path(args.source)
    if args.ema:
        if args.pretrained is not None or not source.is_dir():
            raise ClipkitError(
                "--ema reads a training checkpoint directory (RUN/checkpoints/step_N) as SOURCE"
            )
        # The EMA averages the parameters; buffers (if the model keeps any) stay as the checkpoint has them.
        state = {**bundle.model.state_dict(), **read_ema_weights(source)}
        load_state_dict_into(bundle.model, state, origin=f"{source} (EMA)")
        bundle.name = f"{bundle.name} (EMA)"
    elif source.is_dir() and find_ema_weights(source) is not None:
        print(f"note: {source} also holds an EMA of the weights (train.ema_decay); this export is the "
              "optimizer's weights, add --ema for the EMA (what the run exports as model/)")  # fmt: skip
