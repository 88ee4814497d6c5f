"""Zero-shot evaluation: classifiers from prompts, evaluation datasets, metrics as CLIP_benchmark defines them.

Nothing here knows about processes beyond the `rank` / `world_size` an `EvalLoader` is given; a
training loop sums `classification_counts` (or gathers features) across processes itself.
"""

from clipkit.eval.classifier import (
    CachedClassifier,
    build_zeroshot_classifier,
    class_prompts,
    default_cache_dir,
    load_or_build_zeroshot_classifier,
)
from clipkit.eval.datasets import (
    SUPPORTED_LAYOUTS,
    EvalDataset,
    open_eval_dataset,
    openai_imagenet_templates,
    read_classnames,
    read_templates,
)
from clipkit.eval.loader import EvalBatch, EvalLoader, SkippedImage, SkippedShard
from clipkit.eval.metrics import (
    classification_counts,
    classification_metrics,
    classification_metrics_from_counts,
    retrieval_metrics,
)
from clipkit.eval.zeroshot import (
    RetrievalFeatures,
    ZeroshotResult,
    encode_retrieval_set,
    evaluate_retrieval,
    evaluate_zeroshot,
    zeroshot_classification_counts,
    zeroshot_logits,
)

__all__ = [
    "SUPPORTED_LAYOUTS",
    "CachedClassifier",
    "EvalBatch",
    "EvalDataset",
    "EvalLoader",
    "RetrievalFeatures",
    "SkippedImage",
    "SkippedShard",
    "ZeroshotResult",
    "build_zeroshot_classifier",
    "class_prompts",
    "classification_counts",
    "classification_metrics",
    "classification_metrics_from_counts",
    "default_cache_dir",
    "encode_retrieval_set",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "load_or_build_zeroshot_classifier",
    "open_eval_dataset",
    "openai_imagenet_templates",
    "read_classnames",
    "read_templates",
    "retrieval_metrics",
    "zeroshot_classification_counts",
    "zeroshot_logits",
]
