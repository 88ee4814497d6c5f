"""The end of a run, for the person who started it: a short summary, pictures, and what to try next.

Written by the main process after the final evaluation and export, into `output_dir/pictures/`:
`curves.png` (loss and evaluation metrics against step, from metrics.jsonl), and, when the run has a
zero-shot dataset of at most `MAX_REPORT_IMAGES` images, `confusion_matrix.png` and `top_images.png`
(the best-scoring held-out images for a few class prompts, framed green when they show that class).
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipkit.data import DataConfig
from clipkit.eval import EvalLoader, build_zeroshot_classifier, classification_metrics, open_eval_dataset
from clipkit.eval.plot import plot_confusion_matrix, plot_top_images, plot_training_curves
from clipkit.eval.zeroshot import CLASSIFICATION_LOGIT_SCALE
from clipkit.models import ModelBundle

log = logging.getLogger(__name__)

MAX_REPORT_IMAGES = 2000  # more would only slow the end of a large run for a picture
QUERIES_SHOWN = 6
IMAGES_PER_QUERY = 8
PICTURES = "pictures"


@dataclass
class ClassPromptResults:
    """Text-to-image search over the held-out images with one prompt per class."""

    queries: list[str]
    precision_at_k: float  # mean over classes of the share of the top-k images that show the class
    pictures: list[Path]
    num_images: int
    data_dir: Path | None  # the dataset's local directory, for the next commands
    examples: Path  # a folder with one held-out image per class


def write_run_report(
    *,
    output_dir: Path,
    exported: Path,
    bundle: ModelBundle,
    data: DataConfig,
    metrics: dict[str, Any],
    steps: int,
    samples: int,
    elapsed_s: float,
    device: torch.device | str = "cpu",
) -> str:
    """Draw the pictures and return the summary to print (pictures that fail are logged, not fatal)."""
    pictures: list[Path] = []
    records = _read_metrics(output_dir / "metrics.jsonl")
    if records:
        try:
            pictures.append(plot_training_curves(records, output_dir / PICTURES / "curves.png"))
        except Exception as e:  # a picture must never cost the user the run's result
            log.warning("could not draw the training curves (%s: %s)", type(e).__name__, e)
    prompts = None
    if data.zeroshot_dataset:
        try:
            prompts = _class_prompt_pictures(bundle, data.zeroshot_dataset, output_dir / PICTURES, device)
        except Exception as e:  # a picture must never cost the user the run's result
            log.warning("could not draw the zero-shot pictures (%s: %s)", type(e).__name__, e)
    if prompts is not None:
        pictures.extend(prompts.pictures)
    return _summary(
        output_dir=output_dir,
        exported=exported,
        metrics=metrics,
        steps=steps,
        samples=samples,
        elapsed_s=elapsed_s,
        prompts=prompts,
        pictures=pictures,
        classnames=_classnames(data),
    )


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _classnames(data: DataConfig) -> list[str] | None:
    if not data.zeroshot_dataset:
        return None
    try:
        return open_eval_dataset(data.zeroshot_dataset).classnames
    except Exception:
        return None


@torch.no_grad()
def _class_prompt_pictures(
    bundle: ModelBundle, source: str, folder: Path, device: torch.device | str
) -> ClassPromptResults | None:
    dataset = open_eval_dataset(source)
    total = dataset.count_samples()
    if dataset.classnames is None or (total is not None and total > MAX_REPORT_IMAGES):
        return None
    model = bundle.model
    was_training = model.training
    model.eval()
    try:
        loader = EvalLoader(dataset, transform=bundle.eval_transform, batch_size=256)
        features, labels, thumbnails = [], [], []
        for batch in loader:
            images = batch.images.to(device)
            features.append(F.normalize(model.encode_image(images).float(), dim=-1).cpu())  # (B, D)
            labels.append(batch.labels)
            thumbnails.append(_displayable(batch.images, bundle.preprocess_cfg))
            if (
                sum(len(t) for t in thumbnails) >= MAX_REPORT_IMAGES
            ):  # size unknown up front (remote, unreadable)
                break
        if not features:
            return None
        image_features, image_labels = torch.cat(features), torch.cat(labels)  # (N, D), (N,)
        thumbs = torch.cat(thumbnails)  # (N, H, W, 3) in [0, 1]
        classnames = dataset.classnames
        templates = dataset.templates or ["a photo of a {c}."]
        classifier = build_zeroshot_classifier(model, bundle.tokenizer, classnames, templates, device=device)
        # The zero-shot evaluation's own logits and metrics (clipkit.eval), not a copy of them.
        logits = CLASSIFICATION_LOGIT_SCALE * image_features @ classifier.float().cpu()  # (N, C)
        zeroshot = classification_metrics(logits, image_labels)
        accuracy = zeroshot["acc1"]
        confusion_path = plot_confusion_matrix(
            zeroshot["confusion_matrix"],
            classnames,
            folder / "confusion_matrix.png",
            title=f"zero-shot top-1 {accuracy:.1%} on {len(image_labels)} held-out images",
        )

        # One prompt per class, searched over the held-out images as a text query.
        queries = [_first_prompt(templates, name) for name in classnames]
        tokens = bundle.tokenizer(queries).to(device)
        text_features = F.normalize(model.encode_text(tokens).float(), dim=-1).cpu()  # (C, D)
        k = min(IMAGES_PER_QUERY, len(image_labels))
        top = (text_features @ image_features.T).topk(k, dim=1).indices  # (C, k)
        hits = image_labels[top] == torch.arange(len(classnames))[:, None]  # (C, k)
        shown = sorted(
            {round(i * (len(classnames) - 1) / max(QUERIES_SHOWN - 1, 1)) for i in range(QUERIES_SHOWN)}
        )
        examples = _write_examples(thumbs, image_labels, classnames, folder / "examples")
        grid_path = plot_top_images(
            [queries[c] for c in shown],
            [[thumbs[i].numpy() for i in top[c].tolist()] for c in shown],
            [hits[c].tolist() for c in shown],
            folder / "top_images.png",
            title="best-scoring held-out images for each text query (green: the queried class)",
        )
    finally:
        model.train(was_training)
    data_dir = Path(source) if Path(source).is_dir() else None
    return ClassPromptResults(
        queries=queries,
        precision_at_k=hits.float().mean().item(),
        pictures=[confusion_path, grid_path],
        num_images=len(image_labels),
        data_dir=data_dir,
        examples=examples,
    )


def _write_examples(thumbs: torch.Tensor, labels: torch.Tensor, classnames: list[str], folder: Path) -> Path:
    """One held-out image per class (the first of each) as PNG files, for `clipkit classify` to try."""
    from PIL import Image

    from clipkit.files import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    for label, name in enumerate(classnames[:20]):
        matches = (labels == label).nonzero()
        if len(matches):
            pixels = (thumbs[int(matches[0])] * 255).round().to(torch.uint8).numpy()
            target = folder / f"{label:02d}-{name.replace(' ', '_').replace('/', '_')}.png"
            with atomic_path(target) as temporary:
                Image.fromarray(pixels).save(temporary, format="PNG")
    return folder


def _first_prompt(templates, classname: str) -> str:
    if isinstance(templates, dict):
        return templates[classname][0]
    return templates[0].replace("{c}", classname)


def _displayable(images: torch.Tensor, preprocess_cfg: dict[str, Any]) -> torch.Tensor:
    """(B, 3, H, W) normalised model inputs -> (B, H, W, 3) in [0, 1], at most 64 px, for pictures."""
    mean = torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1)
    images = (images.float().cpu() * std + mean).clamp(0, 1)
    if images.shape[-1] > 64:
        images = F.interpolate(images, size=(64, 64), mode="bilinear", antialias=True)
    return images.permute(0, 2, 3, 1)


def _summary(
    *,
    output_dir: Path,
    exported: Path,
    metrics: dict[str, Any],
    steps: int,
    samples: int,
    elapsed_s: float,
    prompts: ClassPromptResults | None,
    pictures: list[Path],
    classnames: list[str] | None,
) -> str:
    minutes, seconds = divmod(round(elapsed_s), 60)
    lines = ["", f"Trained {steps} steps ({samples:,} image-text pairs) in {minutes}m{seconds:02d}s."]
    if "zeroshot/acc1" in metrics:
        chance = f" (chance {1 / len(classnames):.0%})" if classnames else ""
        lines.append(f"  zero-shot top-1 on the held-out images: {metrics['zeroshot/acc1']:.1%}{chance}")
    if "retrieval/image_retrieval_recall@1" in metrics:
        lines.append(
            f"  text-to-image recall@1 on held-out captions: {metrics['retrieval/image_retrieval_recall@1']:.1%}"
            f" (recall@10 {metrics.get('retrieval/image_retrieval_recall@10', float('nan')):.1%}; a caption's own "
            "image must come first)"
        )
    if prompts is not None:
        lines.append(
            f"  text-to-image search with one prompt per class: {prompts.precision_at_k:.1%} of the top "
            f"{IMAGES_PER_QUERY} images show the class"
        )
    lines.append(f"  model: {exported} (open_clip: create_model_and_transforms('local-dir:{exported}'))")
    if pictures:
        lines.append(f"  pictures: {', '.join(str(p) for p in pictures)}")
    lines += ["", "Next, try:"]
    model = shlex.quote(str(exported))
    labels = ",".join(classnames[:10]) if classnames else "cat,dog,car"
    data_dir = prompts.data_dir if prompts is not None else None
    if data_dir is not None and (data_dir / "zeroshot_classification_templates.txt").is_file():
        templates = f" --templates {shlex.quote(str(data_dir / 'zeroshot_classification_templates.txt'))}"
    else:
        templates = ""
    examples = shlex.quote(str(prompts.examples)) + "/" if prompts is not None else "YOUR_IMAGES/"
    lines.append(f"  clipkit classify --model {model} --labels {shlex.quote(labels)}{templates} {examples}")
    images = shlex.quote(str(data_dir / "test")) if data_dir is not None else "YOUR_IMAGES/"
    index = shlex.quote(str(output_dir / "index"))
    lines.append(f"  clipkit index build --model {model} --images {images} --out {index}")
    lines.append(f"  clipkit serve --index {index}   # then open http://127.0.0.1:8000/")
    return "\n".join(lines)
