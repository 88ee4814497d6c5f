"""Images/s of `clipkit zeroshot` against CLIP_benchmark's `clip_benchmark eval`, interleaved in one run.

Both commands evaluate the same exported model (open_clip architecture, fixed random weights) on the
same generated CLIP_benchmark wds dataset, with the same batch size, decoding workers and precision
(fp32: CLIP_benchmark's --no_amp). Each run is timed end to end as a user sees it (process start to
exit: imports, model load, text classifier, images); clipkit starts with an empty classifier cache each
time. Runs alternate ABBA so drift on a shared machine hits both tools alike; the JSON reports every
run, the medians and the median of the per-pair ratios.

    python scripts/bench_zeroshot.py --out bench_zeroshot.json

CLIP_benchmark 1.6.2's `accuracy` fails on NumPy >= 2.4 (float() of a 1-element array), after all
images are encoded; its CLI runs here through a two-line wrapper that swaps in the same function
with `.item()`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _report import write_report

REPO_ROOT = Path(__file__).resolve().parents[1]

CLIP_BENCHMARK_CLI = """
import sys
from clip_benchmark.metrics import zeroshot_classification


def accuracy(output, target, topk=(1,)):  # CLIP_benchmark 1.6.2's, with .item() for NumPy >= 2.4
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]


zeroshot_classification.accuracy = accuracy
from clip_benchmark.cli import main

sys.argv[0] = "clip_benchmark"
sys.exit(main())
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=40,
        help="8 shards by default: CLIP_benchmark splits shards over workers",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs (ABBA order)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", help="keep the model and dataset here (default: a temporary directory)")
    parser.add_argument("--out", help="also write the JSON here")
    return parser.parse_args()


def export_random_model(arch: str, out: Path) -> Path:
    sys.path.insert(0, str(REPO_ROOT / "src"))
    from clipkit.models import build_model, export_model

    torch.manual_seed(0)
    return export_model(build_model(arch), out, overwrite=True)


def generate_dataset(root: Path, *, images: int, classes: int, size: int, shard_size: int) -> Path:
    """A CLIP_benchmark wds directory of smooth random JPEGs (photo-like to decode), labels round-robin."""
    rng = np.random.default_rng(0)
    shards = math.ceil(images / shard_size)
    (root / "test").mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tar:
            for i in range(shard * shard_size, min(images, (shard + 1) * shard_size)):
                coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
                    (size, size), Image.BICUBIC
                )
                pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 6, (size, size, 3))
                buffer = io.BytesIO()
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    buffer, format="JPEG", quality=90
                )
                for name, data in (
                    (f"s{i:06d}.jpg", buffer.getvalue()),
                    (f"s{i:06d}.cls", str(i % classes).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text(str(shards))
    (root / "classnames.txt").write_text("\n".join(f"object number {c}" for c in range(classes)) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text(
        "a photo of a {c}.\na blurry photo of the {c}.\n"
    )
    return root


def clipkit_command(args, model: Path, dataset: Path, out: Path, cache: Path) -> list[str]:
    return [
        sys.executable, "-m", "clipkit", "zeroshot", "--model", str(model), "--dataset", str(dataset),
        "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", args.device,
        "--precision", "fp32", "--output", str(out), "--cache-dir", str(cache),
    ]  # fmt: skip


def clip_benchmark_command(args, model: Path, dataset: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-c", CLIP_BENCHMARK_CLI, "eval", "--dataset", "wds/bench", "--dataset_root", str(dataset),
        "--task", "zeroshot_classification", "--model", f"local-dir:{model}", "--pretrained", "none",
        "--batch_size", str(args.batch_size), "--num_workers", str(args.workers), "--no_amp", "--output", str(out),
    ]  # fmt: skip


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{command[:4]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    args = parse_args()
    env = dict(
        os.environ, PYTHONPATH=str(REPO_ROOT / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    with tempfile.TemporaryDirectory(prefix="bench_zeroshot.") as tmp:
        work = Path(args.workdir or tmp)
        model = export_random_model(args.model, work / "model")
        dataset = generate_dataset(
            work / "dataset",
            images=args.images,
            classes=args.classes,
            size=args.image_size,
            shard_size=args.shard_size,
        )
        runs, outputs = [], {}
        for repeat in range(args.repeats):
            order = ("clipkit", "clip_benchmark") if repeat % 2 == 0 else ("clip_benchmark", "clipkit")
            for tool in order:
                out = work / f"{tool}-{repeat}.json"
                if tool == "clipkit":
                    command = clipkit_command(args, model, dataset, out, cache=work / f"cache-{repeat}")
                else:
                    command = clip_benchmark_command(args, model, dataset, out)
                seconds = timed(command, env)
                runs.append(
                    {
                        "tool": tool,
                        "repeat": repeat,
                        "seconds": round(seconds, 3),
                        "images_per_s": round(args.images / seconds, 3),
                    }
                )
                outputs[tool] = json.loads(out.read_text())["metrics"]
                print(json.dumps(runs[-1]), file=sys.stderr)

    def median_rate(tool: str) -> float:
        return statistics.median(r["images_per_s"] for r in runs if r["tool"] == tool)

    ratios = []
    for repeat in range(args.repeats):
        pair = {r["tool"]: r["images_per_s"] for r in runs if r["repeat"] == repeat}
        ratios.append(pair["clipkit"] / pair["clip_benchmark"])
    report = {
        "benchmark": "zeroshot classification, end-to-end images/s (process start to exit)",
        "command": "python scripts/bench_zeroshot.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "open_clip": metadata.version("open_clip_torch"),
            "clip_benchmark": metadata.version("clip_benchmark"),
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
        },
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        "runs": runs,
        "clipkit_images_per_s": median_rate("clipkit"),
        "clip_benchmark_images_per_s": median_rate("clip_benchmark"),
        "ratio_clipkit_over_clip_benchmark": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "metrics": outputs,
        "metrics_agree": all(
            abs(outputs["clipkit"][k] - outputs["clip_benchmark"][k]) <= 1e-6
            for k in ("acc1", "acc5", "mean_per_class_recall")
        ),
    }
    print(write_report(report, args.out))


if __name__ == "__main__":
    main()
