#!/usr/bin/env python
"""Training throughput of clipkit against open_clip's own trainer, and digits accuracy after equal training.

Both trainers run as a user runs them, as whole processes, on the same shards, model, batch, precision and
worker count. Throughput is differential: each configuration runs for S1 and S2 optimizer steps and

    samples/s = (S2 - S1) * batch / (wall(S2) - wall(S1))

so start-up, data preparation, the final checkpoint and export cancel out. Runs are interleaved
(clipkit, open_clip, ...) and repeated; medians are reported. open_clip's trainer needs
`webdataset<=0.2.86`, so it runs from its own virtual environment (`--peer-python`):

    python -m venv /tmp/peer && /tmp/peer/bin/pip install "open_clip_torch[training]==3.3.0"
    python scripts/bench_train.py --peer-python /tmp/peer/bin/python --out bench_train.json

Prints JSON (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _report import write_report

REPO = Path(__file__).resolve().parents[1]
BATCH = 64


def run_timed(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:4])} ... failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
    return elapsed


def clipkit_cmd(model: str, shards: Path, steps: int, out: Path, workers: int, extra=()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "clipkit.train",
        f"model={model}",
        "data=shards",
        f"data.train_shards={shards}",
        "data.val_shards=null",
        "data.zeroshot_dataset=null",
        f"data.batch_size={BATCH}",
        f"data.workers={workers}",
        "data.resampled=true",
        f"train.steps={steps}",
        "train.precision=fp32",
        "train.log_every=1",
        "train.checkpoint_every=1000000",
        "train.resume=none",
        "optim.lr=1e-3",
        "optim.warmup_steps=50",
        "optim.weight_decay=0.1",
        f"output_dir={out}",
        *extra,
    ]


def open_clip_cmd(
    peer: str, model: str, data: str, steps: int, logs: Path, workers: int, extra=()
) -> list[str]:
    cmd = [
        peer,
        "-m",
        "open_clip_train.main",
        "--model",
        model,
        "--batch-size",
        str(BATCH),
        "--train-num-samples",
        str(BATCH * steps),
        "--epochs",
        "1",
        "--precision",
        "fp32",
        "--workers",
        str(workers),
        "--lr",
        "1e-3",
        "--warmup",
        "50",
        "--wd",
        "0.1",
        "--seed",
        "0",
        "--report-to",
        "",
        "--logs",
        str(logs),
        "--name",
        "run",
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        "1",
        *extra,
    ]
    if data == "synthetic":
        return [*cmd, "--dataset-type", "synthetic"]
    return [*cmd, "--dataset-type", "webdataset", "--dataset-resampled", "--train-data", data]


def shard_spec(directory: Path) -> str:
    """open_clip's trainer wants a brace pattern, not a directory."""
    tars = sorted(directory.glob("*.tar"))
    stems = [p.stem for p in tars]
    return str(directory / f"{{{stems[0]}..{stems[-1]}}}.tar") if len(tars) > 1 else str(tars[0])


def variant_command(
    args, variant: str, model_name: str, open_clip_model: str, data_dir: Path, steps: int, out: Path
) -> list[str]:
    """clipkit on the shards, open_clip's trainer on the same shards, or on its in-memory synthetic data."""
    if variant == "clipkit_shards":
        return clipkit_cmd(model_name, data_dir / "train", steps, out, args.workers)
    data = shard_spec(data_dir / "train") if variant == "open_clip_shards" else "synthetic"
    return open_clip_cmd(args.peer_python, open_clip_model, data, steps, out, args.workers)


def run_dir(work: Path, variant: str, model: str, steps: int, repeat: int) -> Path:
    return work / f"{variant}-{model}-{steps}-{repeat}"


def step_rates(variant: str, out: Path, skip: int) -> list[float]:
    """Samples/s of each optimizer step after the first `skip`, as the trainer itself logged it: the wall
    time from the end of one step to the end of the next (data wait included, logging excluded)."""
    if variant.startswith("clipkit"):
        lines = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
        rates = [m["samples_per_s"] for m in lines if "samples_per_s" in m]
    else:  # open_clip logs "Batch (t): SECONDS" per step with --log-every-n-steps 1 (its meters reset)
        log = (out / "run" / "out.log").read_text()
        rates = [BATCH / float(t) for t in re.findall(r"Batch \(t\): ([\d.]+)", log)]
    return rates[skip:]


def throughput(times_short: list[float], times_long: list[float], steps: tuple[int, int]) -> dict:
    """Median of the per-repeat rates, and the rate between the fastest short and fastest long run
    (noise on a shared machine only ever adds time, so the minimums are the steadier estimate)."""
    samples = (steps[1] - steps[0]) * BATCH
    rates = [samples / (b - a) for a, b in zip(times_short, times_long, strict=True)]
    return {
        "samples_per_s": statistics.median(rates),
        "samples_per_s_from_min": samples / (min(times_long) - min(times_short)),
        "runs": rates,
        "wall_s": {str(steps[0]): times_short, str(steps[1]): times_long},
    }


def bench_throughput(args, work: Path, env: dict[str, str]) -> dict:
    from clipkit.data.synthetic import write_synthetic_dataset
    from clipkit.models import build_model, export_model

    results = {}
    for model_name, open_clip_model, image_size, steps in (
        ("tiny", None, 32, tuple(args.tiny_steps)),
        ("vit-s-32-alt", "ViT-S-32-alt", 224, tuple(args.vit_steps)),
    ):
        if model_name not in args.models:
            continue
        data_dir = work / f"shapes-{image_size}px"
        if not data_dir.exists():
            write_synthetic_dataset(
                data_dir,
                seed=0,
                train_samples=2048,
                test_samples=64,
                image_size=image_size,
                samples_per_shard=256,
            )
        if open_clip_model is None:  # open_clip's trainer takes clipkit's tiny towers as an exported model
            export_dir = work / "tiny-export"
            if not export_dir.exists():
                export_model(build_model("tiny"), export_dir)
            open_clip_model = f"local-dir:{export_dir}"
        variants = ("clipkit_shards", "open_clip_shards", "open_clip_synthetic")
        timings = {name: {s: [] for s in steps} for name in variants}
        for repeat in range(args.repeats):
            for s in steps:
                for name in variants:  # interleaved, so drift hits every variant alike
                    out = run_dir(work, name, model_name, s, repeat)
                    shutil.rmtree(out, ignore_errors=True)  # open_clip's trainer exits 0 at once if it exists
                    cmd = variant_command(
                        args,
                        name,
                        model_name,
                        open_clip_model,
                        data_dir,
                        s,
                        out,
                    )
                    timings[name][s].append(run_timed(cmd, cwd=work, env=env))
                    print(
                        f"# {model_name} {name} steps={s} repeat={repeat}: {timings[name][s][-1]:.1f}s",
                        file=sys.stderr,
                        flush=True,
                    )
        model_result = {name: throughput(t[steps[0]], t[steps[1]], steps) for name, t in timings.items()}
        for name in variants:  # per-step rates of the long runs, warm-up steps left out
            rates = [
                rate
                for repeat in range(args.repeats)
                for rate in step_rates(
                    name, run_dir(work, name, model_name, steps[1], repeat), skip=max(2, steps[1] // 10)
                )
            ]
            model_result[name]["median_step_samples_per_s"] = statistics.median(rates)
            model_result[name]["steps_timed"] = len(rates)
        for key in ("samples_per_s", "samples_per_s_from_min", "median_step_samples_per_s"):
            model_result[f"clipkit_over_open_clip_shards_{key}"] = (
                model_result["clipkit_shards"][key] / model_result["open_clip_shards"][key]
            )
        model_result["steps"] = list(steps)
        model_result["image_size"] = image_size
        results[model_name] = model_result
    return results


def bench_digits(args, work: Path, env: dict[str, str]) -> dict:
    """600 steps of batch 64 on the digits train split by each trainer; both scored by `clipkit zeroshot`."""
    from clipkit.data.prepare import ensure_generated
    from clipkit.models import build_model, export_model

    # The dataset `experiment=digits` builds (conf/data/digits.yaml), built here so both trainers read it.
    digits = ensure_generated(
        {"name": "digits", "dir": str(work / "digits"), "seed": 0, "test_fraction": 0.3, "image_size": 32}
    )
    export_dir = work / "tiny-export"
    if not export_dir.exists():
        export_model(build_model("tiny"), export_dir)
    steps = args.digits_steps

    ck_run, oc_logs = work / "digits-clipkit", work / "digits-open_clip"
    for run_dir in (ck_run, oc_logs):
        shutil.rmtree(run_dir, ignore_errors=True)
    ck_time = run_timed(
        [
            sys.executable,
            "-m",
            "clipkit.train",
            "experiment=digits",
            f"data.generate.dir={digits}",
            f"train.steps={steps}",
            "train.eval_every=0",
            "train.resume=none",
            f"output_dir={ck_run}",
        ],
        cwd=work,
        env=env,
    )
    oc_time = run_timed(
        open_clip_cmd(
            args.peer_python,
            f"local-dir:{export_dir}",
            str(digits / "train" / "00000.tar"),
            steps,
            oc_logs,
            2,
        ),
        cwd=work,
        env=env,
    )
    oc_export = work / "digits-open_clip-export"
    run_timed(
        [
            sys.executable,
            "-m",
            "clipkit",
            "export",
            "tiny",
            "--pretrained",
            str(oc_logs / "run" / "checkpoints" / "epoch_1.pt"),
            "--out",
            str(oc_export),
            "--overwrite",
        ],
        cwd=work,
        env=env,
    )

    def zeroshot(model: Path) -> dict:
        out = work / f"{model.name}-zeroshot.json"
        run_timed(
            [
                sys.executable,
                "-m",
                "clipkit",
                "zeroshot",
                "--model",
                str(model),
                "--dataset",
                str(digits),
                "--output",
                str(out),
                "--no-cache",
            ],
            cwd=work,
            env=env,
        )
        return json.loads(out.read_text())["metrics"]

    return {
        "steps": steps,
        "batch_size": BATCH,
        "clipkit": {"acc1": zeroshot(ck_run)["acc1"], "wall_s": ck_time},
        "open_clip": {"acc1": zeroshot(oc_export)["acc1"], "wall_s": oc_time},
        "evaluator": "clipkit zeroshot (CLIP_benchmark's metric, parity-tested) on the held-out 30% test split",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--peer-python", required=True, help="python of a venv with open_clip_torch[training]"
    )
    parser.add_argument("--models", nargs="*", default=["tiny", "vit-s-32-alt"], help="none: digits only")
    parser.add_argument("--tiny-steps", nargs=2, type=int, default=[20, 120])
    parser.add_argument("--vit-steps", nargs=2, type=int, default=[2, 8])
    parser.add_argument("--digits-steps", type=int, default=600)
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work-dir", help="keep data and runs here (default: a temporary directory)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        env["CLIPKIT_CACHE"] = str(work / "cache")
        report = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "torch": torch.__version__,
                "device": "cuda" if torch.cuda.is_available() else "cpu",
            },
            "batch_size": BATCH,
            "precision": "fp32",
            "workers": args.workers,
        }
        if args.models:
            report["throughput"] = bench_throughput(args, work, env)
            write_report(report, args.out)  # a failure later keeps what was measured
        if not args.skip_digits:
            report["digits"] = bench_digits(args, work, env)
    print(write_report(report, args.out))


if __name__ == "__main__":
    main()
