"""Write a model as a Hugging Face transformers directory: `CLIPModel` / `SiglipModel` that
`from_pretrained(DIR)` and `pipeline("zero-shot-image-classification", model=DIR)` load as they are.

DIR holds config.json + model.safetensors, the tokenizer's files (with the model's context length),
preprocessor_config.json (the model's eval preprocessing) and README.md (a model card). The weights and
config come from `hf_convert`; this module adds the files around them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from clipkit.errors import ClipkitError
from clipkit.models.export import check_export_target, local_sources, staged_directory
from clipkit.models.factory import ModelBundle
from clipkit.models.hf_convert import (
    CLIP_BPE_EOT,
    CLIP_BPE_VOCAB_SIZE,
    HF_LEGACY_ARGMAX_EOS_ID,
    hf_layout,
    require_transformers,
    to_hf_model,
)
from clipkit.redaction import redact_text

# open_clip / torchvision interpolation names -> PIL resample codes, which transformers' processors store.
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def export_transformers(
    bundle: ModelBundle, out_dir: str | Path, *, overwrite: bool = False, run_dir: str | Path | None = None
) -> Path:
    """Write `bundle` to `out_dir` as a transformers model (staged in a temporary sibling, then renamed).

    `run_dir`, when the model comes from a clipkit run, adds the run's data, steps and metrics to the card.
    """
    transformers = require_transformers()
    out_dir = Path(out_dir)
    check_export_target(out_dir, overwrite=overwrite, sources=local_sources(bundle))
    layout = hf_layout(bundle.model_cfg)  # fails early, before any file is written
    preprocessor = preprocessor_config(bundle.preprocess_cfg, layout)
    tokenizer, token_ids = hf_tokenizer(bundle, layout, transformers)
    hf_model = to_hf_model(bundle.model, bundle.model_cfg, **token_ids)
    with staged_directory(out_dir) as staging:
        hf_model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        _fix_tokenizer_config(staging, bundle.model_cfg["text_cfg"].get("context_length", 77), layout)
        (staging / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n", "utf-8")
        card = model_card(bundle, hf_model.config, layout, _run_summary(run_dir) if run_dir else None)
        (staging / "README.md").write_text(redact_text(card), encoding="utf-8")
    return out_dir


# -- tokenizer -------------------------------------------------------------------------------------
def hf_tokenizer(bundle: ModelBundle, layout: str, transformers) -> tuple[Any, dict[str, int | None]]:
    """A transformers tokenizer giving the model's token ids, and the ids the text config needs."""
    import open_clip

    from clipkit.models.tokenizer import SentencePieceTokenizer

    tokenizer = bundle.tokenizer
    text_cfg = bundle.model_cfg["text_cfg"]
    context_length = text_cfg.get("context_length", 77)
    if isinstance(tokenizer, open_clip.SimpleTokenizer):
        clean = (text_cfg.get("tokenizer_kwargs") or {}).get("clean", "lower")
        if clean != "lower":
            raise ClipkitError(
                f"text_cfg.tokenizer_kwargs.clean={clean!r}: transformers' CLIPTokenizer always lower-cases; "
                "only open_clip's default 'lower' cleaning exports"
            )
        # A SigLIP text tower pools the last position, padding included: pad with open_clip's id 0 there.
        pad = "!" if layout == "siglip" else "<|endoftext|>"
        hf = clip_bpe_tokenizer(tokenizer, context_length, transformers, pad_token=pad)
        # argmax pooling finds the end token when it is the largest id, as in the CLIP BPE vocabulary.
        argmax_eos = (
            CLIP_BPE_EOT if text_cfg.get("vocab_size", CLIP_BPE_VOCAB_SIZE) == CLIP_BPE_VOCAB_SIZE else None
        )
        ids = {"pad_token_id": hf.pad_token_id, "bos_token_id": hf.bos_token_id}
    elif isinstance(tokenizer, SentencePieceTokenizer):
        # Its own save_pretrained writes T5Tokenizer files, which give the same ids (models/tokenizer.py).
        hf, argmax_eos = tokenizer, None
        ids = {"pad_token_id": 0, "bos_token_id": None}
    elif isinstance(tokenizer, open_clip.tokenizer.HFTokenizer):
        hf, argmax_eos = tokenizer.tokenizer, None
        ids = {"pad_token_id": hf.pad_token_id, "bos_token_id": hf.bos_token_id}
    else:
        raise ClipkitError(f"tokenizer {type(tokenizer).__name__} has no transformers equivalent")
    if layout == "siglip":  # pooled at the last position: the end token only names the tokenizer's
        eos = getattr(hf, "eos_token_id", getattr(hf, "eos_id", None))
    elif text_cfg.get("pool_type", "argmax") == "eos":
        eos = text_cfg["eos_id"]
    else:  # transformers' legacy id 2 means "pool at the largest id", exactly open_clip's argmax
        eos = argmax_eos or HF_LEGACY_ARGMAX_EOS_ID
    return hf, {"eos_token_id": eos, **ids}


def clip_bpe_tokenizer(tokenizer, context_length: int, transformers, *, pad_token: str = "<|endoftext|>"):
    """open_clip's CLIP BPE as a transformers CLIPTokenizer: the same vocabulary and merges, with
    transformers' names for the start and end tokens (ids 49406 and 49407 in both)."""
    vocab = dict(tokenizer.encoder)
    for ours, theirs in (("<start_of_text>", "<|startoftext|>"), ("<end_of_text>", "<|endoftext|>")):
        vocab[theirs] = vocab.pop(ours)
    merges = [pair for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1])]
    return transformers.CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=context_length, pad_token=pad_token
    )


def _fix_tokenizer_config(directory: Path, context_length: int, layout: str) -> None:
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["model_max_length"] = context_length
    if layout == "siglip":
        # open_clip's SigLIP text tower attends to padding too; an attention mask would change its output.
        config["model_input_names"] = ["input_ids"]
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# -- image preprocessing ---------------------------------------------------------------------------
def preprocessor_config(preprocess_cfg: Mapping[str, Any], layout: str) -> dict[str, Any]:
    """transformers' image processor settings doing what open_clip's eval transform does."""
    size = preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    resize_mode = preprocess_cfg.get("resize_mode", "shortest")
    if interpolation not in _RESAMPLE or resize_mode not in ("shortest", "squash"):
        raise ClipkitError(
            f"preprocess_cfg interpolation={interpolation!r}, resize_mode={resize_mode!r}: transformers' image "
            "processors resize with nearest/bilinear/bicubic, by the shortest edge (then crop) or to the size"
        )
    common = {
        "do_resize": True,
        "resample": _RESAMPLE[interpolation],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocess_cfg["mean"]),
        "image_std": list(preprocess_cfg["std"]),
        "do_convert_rgb": True,
    }
    if resize_mode == "shortest":  # resize the shortest edge, centre-crop: CLIP's processor
        if height != width:
            raise ClipkitError(
                f"preprocess_cfg size={size}: shortest-edge resizing exports for square sizes only"
            )
        return {
            "image_processor_type": "CLIPImageProcessor",
            **common,
            "size": {"shortest_edge": height},
            "do_center_crop": True,
            "crop_size": {"height": height, "width": width},
        }
    processor = "SiglipImageProcessor" if layout == "siglip" else "CLIPImageProcessor"
    return {
        "image_processor_type": processor,
        **common,
        "size": {"height": height, "width": width},
        "do_center_crop": False,
    }


# -- model card ------------------------------------------------------------------------------------
def _run_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """Data, loss, steps and the last evaluation of a clipkit run directory; None if it is not one."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return None
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    summary: dict[str, Any] = {
        "data": {k: v for k, v in (config.get("data") or {}).items() if v not in (None, "", [], {})},
        "loss": (config.get("loss") or {}).get("_target_", "?").rsplit(".", 1)[-1],
        "steps": (config.get("train") or {}).get("steps"),
        "metrics": {},
    }
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            evaluated = {
                k: v for k, v in record.items() if k.startswith(("zeroshot/", "retrieval/")) and _is_number(v)
            }
            if evaluated:
                summary["metrics"] = {"step": record.get("step"), **evaluated}
    return summary


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def model_card(bundle: ModelBundle, config, layout: str, run: dict[str, Any] | None) -> str:
    model_class = "SiglipModel" if layout == "siglip" else "CLIPModel"
    vision, text = config.vision_config, config.text_config
    logit_scale = float(bundle.model.logit_scale.detach().reshape(()))
    bias = getattr(bundle.model, "logit_bias", None)
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: zero-shot-image-classification",
        f"tags: [clipkit, open_clip, {'siglip' if layout == 'siglip' else 'clip'}]",
        "---",
        f"# {bundle.name}",
        "",
        f"A contrastive image-text model on open_clip towers, exported by clipkit as a transformers "
        f"`{model_class}`. Below, DIR is this directory (or its name on the Hugging Face hub).",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| image tower | ViT, width {vision.hidden_size}, {vision.num_hidden_layers} layers, "
        f"{vision.num_attention_heads} heads, patch {vision.patch_size}, image {vision.image_size} px |",
        f"| text tower | width {text.hidden_size}, {text.num_hidden_layers} layers, {text.num_attention_heads} "
        f"heads, context {text.max_position_embeddings}, vocabulary {text.vocab_size} |",
        f"| embedding | {bundle.model_cfg['embed_dim']} |",
        f"| logit scale | exp({logit_scale:.4f}) = {pow(2.718281828459045, logit_scale):.2f} |",
    ]
    if bias is not None:
        lines.append(f"| logit bias | {float(bias.detach().reshape(())):.4f} |")
    lines += ["", "open_clip config:", "", "```json", json.dumps(bundle.model_cfg, indent=2), "```", ""]
    if bias is not None and layout == "clip":
        lines += [
            "Trained with the sigmoid (SigLIP) loss: image-text probabilities are "
            "`sigmoid(logits_per_image + logit_bias)`, with `logit_bias` from config.json. "
            "transformers' `CLIPModel` has no bias, so its pipeline shows a softmax over the labels instead "
            "(same ranking).",
            "",
        ]
    lines += ["## Training", ""]
    if run:
        lines += [f"- loss: {run['loss']}", f"- steps: {run['steps']}"]
        lines += [f"- data `{key}`: `{value}`" for key, value in run["data"].items()]
    else:
        lines.append("Not recorded (exported from a model directory or config, not a clipkit run).")
    lines += ["", "## Evaluation", ""]
    metrics = dict((run or {}).get("metrics") or {})
    if metrics:
        step = metrics.pop("step", None)
        lines += [f"At step {step}:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4f} |" for key, value in metrics.items()]
    else:
        lines.append("No evaluation recorded with this model.")
    template = "This is a photo of {}."
    lines += [
        "",
        "## Use",
        "",
        "transformers:",
        "",
        "```python",
        "from transformers import pipeline",
        'classify = pipeline("zero-shot-image-classification", model="DIR")',
        f'classify("image.jpg", candidate_labels=["cat", "dog"], hypothesis_template="{template}")',
        "```",
        "",
        "open_clip (convert back to open_clip's layout with clipkit, then load it):",
        "",
        "```bash",
        "clipkit export DIR --out DIR-open_clip",
        "```",
        "",
        "```python",
        "import open_clip",
        'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR-open_clip")',
        'tokenizer = open_clip.get_tokenizer("local-dir:DIR-open_clip")',
        "```",
        "",
    ]
    return "\n".join(lines)
