"""Benchmark models on a suite of datasets: zero-shot classification, retrieval, linear and few-shot probes.

MODEL (repeat --model) is any source `clipkit zeroshot` takes; --pretrained applies to the --model before
it. With --checkpoints all, a run directory stands for every checkpoint it kept plus its final model.
SUITE is a YAML file or a name under conf/benchmark/ (local, clip_benchmark, datacomp). Every dataset is
checked before any model runs. Results per (model, dataset) are kept under OUT/raw/ as they finish, so an
interrupted benchmark resumes; image features are cached (--cache-dir), so a second model, task or run
reads no image twice. Prints a table with 95% bootstrap intervals and paired differences from the first
model (* = significant), and writes OUT/results.{md,csv,json}, OUT/bars.png (and OUT/steps.png for a
run's checkpoints). Several processes: accelerate launch -m clipkit.benchmark (same arguments).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class _AddModel(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        namespace.models = [*(namespace.models or []), {"source": values, "pretrained": None}]


class _SetPretrained(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if not namespace.models:
            parser.error("--pretrained names the weights of the --model before it; give --model first")
        namespace.models[-1]["pretrained"] = values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", dest="models", action=_AddModel, required=True, metavar="MODEL",
                        help="a model to benchmark (repeat for several; the first is the baseline of comparisons)")  # fmt: skip
    parser.add_argument("--pretrained", action=_SetPretrained, metavar="WEIGHTS",
                        help="weights for the --model before it (architecture or config MODEL)")  # fmt: skip
    parser.add_argument("--checkpoints", choices=("final", "all"), default="final",
                        help="all: a run directory MODEL stands for each kept checkpoint and the final model")  # fmt: skip
    parser.add_argument("--suite", required=True, help="suite YAML file, or a name under conf/benchmark/")
    parser.add_argument("--out", required=True, help="results directory (finished results there are reused)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype"
    )
    parser.add_argument("--resamples", type=int, help="bootstrap resamples (default: the suite's, else 1000)")
    parser.add_argument(
        "--cache-dir", help="features and classifiers cache (default: $CLIPKIT_CACHE, else ~/.cache/clipkit)"
    )
    parser.add_argument("--no-cache", action="store_true", help="compute features without caching them")


def expand_models(specs: list[dict], checkpoints: str):
    """ModelEntry per --model; with checkpoints="all", a run directory's checkpoints and final model."""
    from clipkit.eval.benchmark import ModelEntry

    entries = []
    for spec in specs:
        source = spec["source"]
        run_dir = Path(source)
        if run_dir.exists():  # one name per model directory, however it was typed (results are keyed by it)
            source = str(run_dir.resolve())
        if checkpoints == "all" and (run_dir / "checkpoints").is_dir():
            from clipkit.train.checkpoint import list_checkpoints

            name = run_dir.name
            run_entries = []
            for checkpoint in list_checkpoints(run_dir):
                step = int(checkpoint.name.split("_")[1])
                run_entries.append(ModelEntry(label=f"{name}@{step}", source=str(checkpoint), step=step))
            if (run_dir / "model").is_dir():
                final_step = _final_step(run_dir)
                if (
                    run_entries and run_entries[-1].step == final_step
                ):  # the last checkpoint: keep model/ only
                    run_entries.pop()
                run_entries.append(ModelEntry(label=f"{name}@final", source=str(run_dir), step=final_step))
            entries.extend(run_entries)
        else:
            label = run_dir.resolve().name if run_dir.exists() else source
            if spec["pretrained"]:
                label += f":{Path(spec['pretrained']).name}"
            entries.append(ModelEntry(label=label, source=source, pretrained=spec["pretrained"]))
    labels = [e.label for e in entries]
    for i, entry in enumerate(entries):
        if labels.count(entry.label) > 1:
            entry.label = f"{entry.label}#{i + 1}"
    return entries


def _final_step(run_dir: Path) -> int | None:
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        return int(config["train"]["steps"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def run(
    args: argparse.Namespace,
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    device: str | None = None,
) -> int:
    import torch

    from clipkit.configs import cache_dir
    from clipkit.errors import ClipkitError
    from clipkit.eval.benchmark import RunOptions, run_benchmark
    from clipkit.eval.results import collect_results, format_table, write_outputs
    from clipkit.eval.suite import open_suite, read_suite

    suite = read_suite(args.suite)
    if args.resamples is not None:
        if args.resamples < 100:
            raise ClipkitError(
                f"--resamples {args.resamples} is too few for a 95% interval; use at least 100"
            )
        suite.resamples = args.resamples
    models = expand_models(args.models, args.checkpoints)
    if not models:
        raise ClipkitError(f"--checkpoints all: {args.models[0]['source']} has no checkpoints or model/")
    # Every dataset is opened and checked (generated once, by the main process first) before any model runs.
    if rank == 0:
        open_suite(suite)
    barrier()
    if rank != 0:
        open_suite(suite)
    out_dir = Path(args.out)
    options = RunOptions(
        device=device or args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        batch_size=args.batch_size,
        workers=args.workers,
        precision=args.precision,
        cache_dir=None if args.no_cache else Path(args.cache_dir or cache_dir()),
    )
    ran = run_benchmark(models, suite, out_dir, options, rank=rank, world_size=world_size)
    log.info(
        "benchmark: %d (model, dataset) pairs evaluated here, the rest reused from %s", len(ran), out_dir
    )
    barrier()
    if rank != 0:
        return 0
    results = collect_results(models, suite, out_dir)
    print(format_table(results))
    written = write_outputs(results, out_dir)
    log.info("written: %s", ", ".join(str(p) for p in written))
    return 0
