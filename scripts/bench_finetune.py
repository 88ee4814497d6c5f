"""Robust fine-tuning: what fine-tuning on dataset B costs on dataset A, and what EMA and WiSE-FT win back.

1. Train the `tiny` towers from scratch on A: scikit-learn's handwritten digits (10 classes; `--start-on
   shapes` swaps the two), with `experiment=digits`.
2. Fine-tune that model on B, clipkit's generated shapes (20 colour-shape classes), with `experiment=quickstart
   model.pretrained=A/model train.eval_at_start=true train.ema_decay=... train.wise_ft_alpha=0.5`.
3. Zero-shot accuracy on the held-out splits of A and B for: the start model, the fine-tuned model
   (model-raw/), its EMA (model/), and WiSE-FT (1 - alpha) * start + alpha * fine-tuned for alpha in
   {0.25, 0.5, 0.75} (clipkit.models.merge, as `clipkit merge` computes it).

Both trainings run as a user runs them (`python -m clipkit.train ...`, one CPU process), no download.

    python scripts/bench_finetune.py --threads 1 --workers 1 --out bench_finetune.json   # ~12 min, 2 loaded cores
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from _report import write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
ALPHAS = (0.25, 0.5, 0.75)
# --threads N: torch threads of the trainings (OMP_NUM_THREADS); on a machine shared with other jobs, 1 avoids
# oversubscription thrashing. Set by main().
THREADS: dict[str, str] = {}
EXPERIMENTS = {"digits": "digits", "shapes": "quickstart"}  # dataset -> the recipe that trains on it


def train(args: list[str], log_path: Path) -> float:
    """One `python -m clipkit.train` run; returns its wall time in seconds."""
    started = time.perf_counter()
    with log_path.open("w") as log:
        result = subprocess.run([sys.executable, "-m", "clipkit.train", *args], cwd=REPO_ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **THREADS})  # fmt: skip
    if result.returncode != 0:
        sys.exit(f"training failed (exit {result.returncode}); see {log_path}")
    return time.perf_counter() - started


def zeroshot_acc1(bundle, dataset_dir: Path, *, workers: int) -> float:
    from clipkit.eval import evaluate_zeroshot, load_or_build_zeroshot_classifier, open_eval_dataset

    dataset = open_eval_dataset(dataset_dir, task="classification")
    classifier = load_or_build_zeroshot_classifier(
        bundle.model, bundle.tokenizer, dataset.classnames, dataset.templates, device="cpu", cache_dir=None
    ).classifier
    result = evaluate_zeroshot(bundle.model, bundle.tokenizer, dataset, transform=bundle.eval_transform,
                               classifier=classifier, device="cpu", batch_size=256, workers=workers)  # fmt: skip
    return float(result.metrics["acc1"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/bench_finetune", help="data, runs and logs go here")
    parser.add_argument("--start-on", choices=tuple(EXPERIMENTS), default="digits", help="dataset A")
    parser.add_argument("--steps-a", type=int, default=200, help="training steps on A")
    parser.add_argument("--steps-b", type=int, default=100, help="fine-tuning steps on B")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of both trainings")
    parser.add_argument("--lr-b", type=float, default=1e-3, help="fine-tuning learning rate")
    parser.add_argument("--ema-decay", type=float, default=0.98)
    parser.add_argument("--workers", type=int, default=2, help="data loading processes per training")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per process (default: torch's)"
    )
    parser.add_argument("--out", help="write the JSON report here too")
    args = parser.parse_args()

    from clipkit.models import build_model
    from clipkit.models.merge import merge_models

    if args.threads:
        THREADS["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    name_a = args.start_on
    name_b = next(name for name in EXPERIMENTS if name != name_a)
    data = {name: work / f"data-{name}" for name in EXPERIMENTS}
    run_a, run_b = work / f"a-{name_a}", work / f"b-{name_b}"
    common = ["train.resume=none", "train.checkpoint_every=100000", "train.eval_every=0",
              f"data.workers={args.workers}", f"data.batch_size={args.batch_size}"]  # fmt: skip
    seconds_a = train([
        f"experiment={EXPERIMENTS[name_a]}", f"train.steps={args.steps_a}", f"output_dir={run_a}",
        f"data.generate.dir={data[name_a]}", *common,
    ], work / f"a-{name_a}.log")  # fmt: skip
    seconds_b = train([
        f"experiment={EXPERIMENTS[name_b]}", f"model.pretrained={run_a / 'model'}", f"train.steps={args.steps_b}",
        f"optim.lr={args.lr_b}", "optim.warmup_steps=20", "train.eval_at_start=true",
        f"train.ema_decay={args.ema_decay}", "train.wise_ft_alpha=0.5", f"output_dir={run_b}",
        f"data.generate.dir={data[name_b]}", *common,
    ], work / f"b-{name_b}.log")  # fmt: skip

    def start():
        return build_model(run_a / "model")

    def fine_tuned():
        return build_model(run_b / "model-raw")

    models = {"start": start, "fine-tuned": fine_tuned, "ema": lambda: build_model(run_b / "model")}
    for alpha in ALPHAS:
        models[f"wise-ft {alpha:g}"] = lambda alpha=alpha: merge_models(start(), fine_tuned(), alpha)
    results = []
    for name, load in models.items():
        bundle = load()
        bundle.model.eval()
        row = {
            "model": name,
            "shapes_acc1": zeroshot_acc1(bundle, data["shapes"], workers=args.workers),
            "digits_acc1": zeroshot_acc1(bundle, data["digits"], workers=args.workers),
        }
        results.append(row)
        print(
            f"{name:>14}: shapes {row['shapes_acc1']:.3f}  digits {row['digits_acc1']:.3f}", file=sys.stderr
        )

    report = {
        "benchmark": f"robust fine-tuning: tiny towers trained on {name_a} (A), fine-tuned on {name_b} (B)",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "settings": {
            "a": name_a,
            "b": name_b,
            "steps_a": args.steps_a,
            "steps_b": args.steps_b,
            "lr_b": args.lr_b,
            "ema_decay": args.ema_decay,
            "batch_size": args.batch_size,
            "chance": {"shapes": 1 / 20, "digits": 1 / 10},
        },  # fmt: skip
        "results": results,
        "train_seconds": {f"a_{name_a}": round(seconds_a, 1), f"b_{name_b}": round(seconds_b, 1)},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    print(write_report(report, args.out))


if __name__ == "__main__":
    main()
