"""The recipe study of docs/RECIPES.md: today's defaults, each knob alone and the small-batch recipes, CLIP and
SigLIP, on unsaturated real and generated datasets, over several seeds, at a fixed budget (and a multiple).

Every run is `python -m clipkit.train` in a subprocess, as a user types it: the tiny model at 32 px, batch 64,
600 optimizer steps (`--budget 4`: 2,400), evaluated zero-shot on the dataset's held-out split at the end.
A run already finished in --work (its metrics.jsonl has the final step's accuracy) is read, not repeated, so
the study can be stopped and continued, or extended with more seeds.

    nice -n 10 python scripts/recipe_study.py --out recipe_study.json                 # the 1x table
    nice -n 10 python scripts/recipe_study.py --budget 4 --variants core --out x4.json  # the 4x table
    python scripts/recipe_study.py --list                                              # what would run

The JSON report has every run (dataset, variant, seed, accuracy, seconds) and, per dataset and variant, the
mean, sample standard deviation, min, max and spread (max - min) of the zero-shot top-1 over the seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _report import write_report

REPO_ROOT = Path(__file__).resolve().parents[1]

# The fixed budget: the tiny model at 32 px, 600 steps x batch 64 on one process, evaluated at the end only.
BUDGET = ("model=tiny", "data.batch_size=64", "train.steps=600", "train.eval_every=0", "train.log_every=100",
          "train.checkpoint_every=100000", "train.keep_checkpoints=1")  # fmt: skip

# Datasets that today's defaults do not saturate at the budget (docs/RECIPES.md says why each is unsaturated).
DATASETS = {
    # The real 8x8 scans with 20% of them (~360, 36 a class) to train on: 30 epochs at the budget, so the
    # model overfits what it sees; the other 80% (1,437 scans) are the zero-shot test.
    "digits-20pct": ("data=digits", "data.generate.test_fraction=0.8"),
    # The same scans with a tenth of them (~180, 18 a class) to train on, 1,618 to test: a harder split, where
    # today's CLIP default is near the issue's held-back 84%, to check that the recipes carry over.
    "digits-10pct": ("data=digits", "data.generate.test_fraction=0.9"),
    # Generated shapes at 32 px, 2,000 training images (20 colour x shape classes, small ones only ~10 px):
    # colour and shape must both be read from few pixels, with captions that also name size and position.
    "shapes-2k": (
        "data=synthetic",
        "data.generate.image_size=32",
        "data.generate.train_samples=2000",
        "data.generate.test_samples=1000",
    ),  # fmt: skip
}

# Today's defaults: every key at its clipkit default except the budget (lr 5e-4, wd 0.2, 100 warmup steps,
# cosine, CLIP temperature 0.07, SigLIP scale 10 and bias -10, open_clip's crop scale (0.9, 1)).
DEFAULT = {"clip": ("loss=clip",), "siglip": ("loss=siglip",)}
RECIPE = {"clip": ("experiment=scratch-clip-small",), "siglip": ("experiment=scratch-siglip-small",)}
# What each recipe sets, as the knob combination screened below (a test holds the two equal): the study's
# `clip+light+lr1e-3+cc` runs are `clip-recipe` runs.
RECIPE_KNOBS = {"clip": "light+lr1e-3+cc+ema0.98+pd0.1", "siglip": "light+bias-auto+lr1e-3+cc+pd0.25"}
# One knob at a time on top of today's default (what each contributes to the recipe).
KNOBS = {
    "lr1e-3-wd0.1": ("optim.lr=1e-3", "optim.weight_decay=0.1", "optim.warmup_steps=50"),
    "lr2e-3": ("optim.lr=2e-3",),
    "warmup10pct": ("optim.warmup_fraction=0.1",),
    "const-cooldown": ("optim.schedule=constant_cooldown",),
    "aug-light": ("data.augmentation=light",),
    "aug-strong": ("data.augmentation=strong",),
    "aug-none": ("data.augmentation=none",),
    "ema": ("train.ema_decay=0.995",),
    "patch-dropout-0.5": ("+model.vision_cfg.patch_dropout=0.5",),
    "label-smoothing-0.1": ("loss.label_smoothing=0.1",),
    "bias-auto": ("loss.init_logit_bias=auto",),
    "templates": ('data.caption_templates=["a photo of {}","{}","an image of {}"]',),
}
# The recipes' knobs (a later override of the same key wins, as on the command line).
_CLIP_CC = ("data.augmentation=light", "optim.lr=1e-3", "optim.schedule=constant_cooldown")
_SIGLIP_CC = _CLIP_CC + ("loss.init_logit_bias=auto",)
_EMA = "train.ema_decay=0.98"


def _pd(rate: float) -> str:
    return f"+model.vision_cfg.patch_dropout={rate}"


# Knob combinations screened for the recipes (run only when named: `--variants clip+light+ema,...`).
COMBOS = {
    "light+ls0.1": ("data.augmentation=light", "loss.label_smoothing=0.1"),
    "light+ema": ("data.augmentation=light", "train.ema_decay=0.995"),
    "light+wu10pct": ("data.augmentation=light", "optim.warmup_fraction=0.1"),
    "light+t0.1": ("data.augmentation=light", "loss.init_logit_scale=2.302585092994046"),
    "light+lr1e-3": ("data.augmentation=light", "optim.lr=1e-3"),
    "light+bias-auto": ("data.augmentation=light", "loss.init_logit_bias=auto"),
    "light+bias-auto+lr1e-3": ("data.augmentation=light", "loss.init_logit_bias=auto", "optim.lr=1e-3"),
    "light+bias-auto+ema": ("data.augmentation=light", "loss.init_logit_bias=auto", "train.ema_decay=0.995"),
    # Screened for SigLIP on shapes-2k, where light + bias auto + lr 1e-3 stays ~8 points under CLIP:
    "light+bias-auto+lr2e-3": ("data.augmentation=light", "loss.init_logit_bias=auto", "optim.lr=2e-3"),
    "light+bias-auto+lr1e-3+t0.07": (  # CLIP's start scale (1/0.07) instead of SigLIP's 10
        "data.augmentation=light",
        "loss.init_logit_bias=auto",
        "optim.lr=1e-3",
        "loss.init_logit_scale=2.659260036932778",
    ),  # fmt: skip
    "light+lr1e-3+cc": ("data.augmentation=light", "optim.lr=1e-3", "optim.schedule=constant_cooldown"),
    "light+lr1e-3+cc+half": (
        "data.augmentation=light",
        "optim.lr=1e-3",
        "optim.schedule=constant_cooldown",
        "train.steps=300",
    ),
    "light+bias-auto+lr1e-3+cc": (  # constant lr, linear cooldown over the last steps
        "data.augmentation=light",
        "loss.init_logit_bias=auto",
        "optim.lr=1e-3",
        "optim.schedule=constant_cooldown",
    ),  # fmt: skip
    # Screened for SigLIP's gap on shapes-2k and for the half-steps check (seed 0 first), on top of the recipes:
    # SigLIP's scale starting at 5 instead of 10:
    "light+bias-auto+lr1e-3+cc+s5": _SIGLIP_CC + ("loss.init_logit_scale=1.6094379124341003",),
    "light+bias-auto+lr1e-3+cc+wd0.05": _SIGLIP_CC + ("optim.weight_decay=0.05",),
    "light+bias-auto+lr1e-3+cc+wu30": _SIGLIP_CC + ("optim.warmup_steps=30",),
    "light+lr1e-3+cc+half+wu30": _CLIP_CC + ("train.steps=300", "optim.warmup_steps=30"),
    "light+lr2e-3+cc+half+wu30": _CLIP_CC + ("train.steps=300", "optim.warmup_steps=30", "optim.lr=2e-3"),
    # CLIP's scale starting at 30 (temperature 0.033) instead of 1/0.07:
    "light+lr1e-3+cc+half+s30": _CLIP_CC + ("train.steps=300", "loss.init_logit_scale=3.4011973816621555"),
    "none+lr1e-3+cc+half": _CLIP_CC + ("train.steps=300", "data.augmentation=none"),
    # The image tower pooled by the mean of its patch tokens (open_clip's pool_type avg) instead of the class
    # token, and the text tower without its causal mask (as SigLIP's released text towers); crops of 0.6-1
    # (the crop-only `grayscale` preset) instead of 0.7-1:
    "light+lr1e-3+cc+gap": _CLIP_CC + ("+model.vision_cfg.pool_type=avg",),
    "light+lr1e-3+cc+half+gap": _CLIP_CC + ("train.steps=300", "+model.vision_cfg.pool_type=avg"),
    "light+bias-auto+lr1e-3+cc+gap": _SIGLIP_CC + ("+model.vision_cfg.pool_type=avg",),
    "light+bias-auto+lr1e-3+cc+bidir": _SIGLIP_CC + ("+model.text_cfg.no_causal_mask=true",),
    "grayscale+lr1e-3+cc+half": _CLIP_CC + ("train.steps=300", "data.augmentation=grayscale"),
    "grayscale+bias-auto+lr1e-3+cc": _SIGLIP_CC + ("data.augmentation=grayscale",),
    # Wider random resized crops (crops only, scale 0.4-1 and 0.25-1; light is 0.7-1):
    "crop0.4+lr1e-3+cc": _CLIP_CC + ("data.augmentation={scale:[0.4,1.0]}",),
    "crop0.4+lr1e-3+cc+half": _CLIP_CC + ("train.steps=300", "data.augmentation={scale:[0.4,1.0]}"),
    "crop0.25+lr1e-3+cc+half": _CLIP_CC + ("train.steps=300", "data.augmentation={scale:[0.25,1.0]}"),
    "crop0.4+bias-auto+lr1e-3+cc": _SIGLIP_CC + ("data.augmentation={scale:[0.4,1.0]}",),
    # Regularisers on top of the recipes, for the small training sets that overfit (digits-10pct):
    "light+lr1e-3+cc+ema": _CLIP_CC + ("train.ema_decay=0.995",),
    "light+lr1e-3+cc+ls0.1": _CLIP_CC + ("loss.label_smoothing=0.1",),
    "light+lr1e-3+cc+t0.1": _CLIP_CC + ("loss.init_logit_scale=2.302585092994046",),
    "light+bias-auto+lr1e-3+cc+ema": _SIGLIP_CC + ("train.ema_decay=0.995",),
    # A shorter average (~50 steps instead of ~200): EMA 0.995 lags a model still learning fast at the end.
    "light+lr1e-3+cc+ema0.98": _CLIP_CC + (_EMA,),
    "light+bias-auto+lr1e-3+cc+ema0.98": _SIGLIP_CC + (_EMA,),
    "light+lr1e-3+cc+half+ema0.98": _CLIP_CC + ("train.steps=300", _EMA),
    # Stronger regularisers on top of the recipes + EMA 0.98, for small training sets seen many times: weight
    # decay 0.5 (the recipes: 0.2) and patch dropout (FLIP) at several rates.
    "light+lr1e-3+cc+ema0.98+wd0.5": _CLIP_CC + (_EMA, "optim.weight_decay=0.5"),
    **{f"light+lr1e-3+cc+ema0.98+pd{rate}": _CLIP_CC + (_EMA, _pd(rate)) for rate in (0.1, 0.15, 0.25, 0.5)},
    # FLIP's unmasked tuning: patch dropout 0.5, off for the last 20% (the cooldown) or 50% of the steps.
    **{
        f"light+lr1e-3+cc+ema0.98+pd0.5+um{share}": _CLIP_CC
        + (_EMA, _pd(0.5), f"train.unmasked_fraction={share}")
        for share in (0.2, 0.5)
    },
    **{f"light+bias-auto+lr1e-3+cc+pd{rate}": _SIGLIP_CC + (_pd(rate),) for rate in (0.1, 0.25)},
    "light+bias-auto+lr1e-3+cc+ema0.98+wd0.5": _SIGLIP_CC + (_EMA, "optim.weight_decay=0.5"),
    **{
        f"light+bias-auto+lr1e-3+cc+ema0.98+pd{rate}": _SIGLIP_CC + (_EMA, _pd(rate))
        for rate in (0.1, 0.25, 0.5)
    },
    # The optimizer on top of the recipes of 2026-12-04 (the CLIP recipe at 300 steps, SigLIP's at 600), for the
    # shapes' two gaps: Adam's beta2 0.95 (the recipes: 0.98), no weight decay (0.2), gradients clipped at norm 1
    # with a larger lr, and the image tower alone at 2x the lr (shape is read from the image).
    **{
        f"{name}+{knob}": base + overrides
        for name, base in (
            ("light+lr1e-3+cc+ema0.98+pd0.1+half", _CLIP_CC + (_EMA, _pd(0.1), "train.steps=300")),
            ("light+bias-auto+lr1e-3+cc+pd0.25", _SIGLIP_CC + (_pd(0.25),)),
        )
        for knob, overrides in (
            ("b95", ("optim.betas=[0.9,0.95]",)),
            ("wd0", ("optim.weight_decay=0",)),
            ("gc1+lr3e-3", ("optim.grad_clip_norm=1.0", "optim.lr=3e-3")),
            ("img-lr2e-3", ("optim.image_lr=2e-3",)),
        )
    },
    # SigLIP's logit scale and bias at 10x the towers' lr (the shared parameters take optim.lr):
    "light+bias-auto+lr1e-3+cc+logit-lr1e-2": _SIGLIP_CC
    + ("optim.lr=1e-2", "optim.image_lr=1e-3", "optim.text_lr=1e-3"),
}
KNOBS_FOR = {  # knobs that exist for one loss only
    "label-smoothing-0.1": {"clip"},
    "bias-auto": {"siglip"},
    "light+ls0.1": {"clip"},
    "light+t0.1": {"clip"},
    "light+bias-auto": {"siglip"},
    "light+bias-auto+ema": {"siglip"},
    "light+bias-auto+lr1e-3": {"siglip"},
    "light+bias-auto+lr2e-3": {"siglip"},
    "light+bias-auto+lr1e-3+t0.07": {"siglip"},
    "light+bias-auto+lr1e-3+cc": {"siglip"},
    "light+lr1e-3+cc": {"clip"},
    "light+lr1e-3+cc+half": {"clip"},
}
# The combinations built on a recipe's knobs are for that recipe's loss (SigLIP's knobs begin with CLIP's).
for _name, _overrides in COMBOS.items():
    if _overrides[: len(_SIGLIP_CC)] == _SIGLIP_CC:
        KNOBS_FOR.setdefault(_name, {"siglip"})
    elif _overrides[: len(_CLIP_CC)] == _CLIP_CC:
        KNOBS_FOR.setdefault(_name, {"clip"})


def on_default(knobs: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """`LOSS+NAME` -> today's default for that loss plus the overrides, for each loss the knob exists for."""
    return {
        f"{loss}+{name}": DEFAULT[loss] + overrides
        for loss, (name, overrides) in itertools.product(("clip", "siglip"), knobs.items())
        if loss in KNOBS_FOR.get(name, {loss})
    }


def variants(selection: str) -> dict[str, tuple[str, ...]]:
    """name -> overrides. `core`: default and recipe for both losses, and the recipe at half the steps;
    `knobs`: `core` plus each knob alone on today's default; or a comma-separated list of names."""
    table: dict[str, tuple[str, ...]] = {}
    for loss in ("clip", "siglip"):
        table[f"{loss}-default"] = DEFAULT[loss]
        recipe = RECIPE[loss][0].split("=", 1)[1]
        if (REPO_ROOT / "conf" / "experiment" / f"{recipe}.yaml").is_file():  # not before the study picks it
            table[f"{loss}-recipe"] = RECIPE[loss]
            table[f"{loss}-recipe-half"] = RECIPE[loss] + ("train.steps=300",)
    if selection == "core":
        return table
    table.update(on_default(KNOBS))
    if selection == "knobs":
        return table
    table.update(on_default(COMBOS))
    names = selection.split(",")
    unknown = sorted(set(names) - set(table))
    if unknown:
        sys.exit(f"recipe_study: unknown variant(s) {unknown}; known: {sorted(table)}")
    return {name: table[name] for name in names}


def final_accuracy(run_dir: Path, steps: int) -> float | None:
    """The zero-shot top-1 logged at step `steps`, or None when the run has not finished."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    for line in reversed(metrics.read_text().splitlines()):
        record = json.loads(line)
        if record.get("step") == steps and "zeroshot/acc1" in record:
            return float(record["zeroshot/acc1"])
    return None


def run_or_exit(command: list[str], threads: int) -> None:
    """Run a clipkit command as a user would (offline, `threads` torch threads); its stderr tail if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"recipe_study: {' '.join(command)} failed:\n{result.stderr[-3000:]}")


def raw_accuracy(run_dir: Path, data_dir: Path, threads: int) -> float | None:
    """With train.ema_decay the run exports the average (evaluated by the run) and the optimizer's own final
    weights beside it (`model-raw/`): their zero-shot top-1 on the same test split, by `clipkit zeroshot`
    (kept in the run's `zeroshot-raw.json`), so EMA is compared with the weights it averaged, run by run.
    None for a run without EMA."""
    if not (run_dir / "model-raw").is_dir():
        return None
    report = run_dir / "zeroshot-raw.json"
    if not report.is_file():
        command = [
            sys.executable, "-m", "clipkit.cli.main", "zeroshot", "--model", str(run_dir / "model-raw"),
            "--dataset", str(data_dir / "test"), "--classnames", str(data_dir / "classnames.txt"),
            "--templates", str(data_dir / "zeroshot_classification_templates.txt"), "--no-cache",
            "--output", str(report),
        ]  # fmt: skip
        run_or_exit(command, threads)
    return float(json.loads(report.read_text())["metrics"]["acc1"])


def steps_of(overrides: tuple[str, ...]) -> int:
    """The last train.steps= in the overrides (the run's length)."""
    return int([o for o in overrides if o.startswith("train.steps=")][-1].split("=", 1)[1])


def run_one(job: dict, *, threads: int) -> dict:
    run_dir = Path(job["output_dir"])
    steps = steps_of(job["overrides"])
    accuracy = final_accuracy(run_dir, steps)
    seconds = None
    if accuracy is None:
        started = time.perf_counter()
        run_or_exit(
            [sys.executable, "-m", "clipkit.train", *job["overrides"], f"output_dir={run_dir}"], threads
        )
        seconds = time.perf_counter() - started
        accuracy = final_accuracy(run_dir, steps)
        if accuracy is None:
            raise SystemExit(f"recipe_study: {run_dir}/metrics.jsonl has no zeroshot/acc1 at step {steps}")
        print(
            f"{job['dataset']} {job['variant']} seed {job['seed']}: {accuracy:.4f} ({seconds:.0f} s)",
            flush=True,
        )
    raw = raw_accuracy(run_dir, Path(job["data_dir"]), threads)
    return {**job, "accuracy": accuracy, "raw_accuracy": raw, "seconds": seconds}


def summary_row(dataset: str, variant: str, accuracies: list[float]) -> dict:
    return {
        "dataset": dataset, "variant": variant, "seeds": len(accuracies), "mean": statistics.fmean(accuracies),
        "std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
        "min": min(accuracies), "max": max(accuracies), "spread": max(accuracies) - min(accuracies),
    }  # fmt: skip


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for (dataset, variant), group in itertools.groupby(
        sorted(runs, key=lambda r: (r["dataset"], r["variant"])), key=lambda r: (r["dataset"], r["variant"])
    ):
        group = list(group)
        raw = [r["raw_accuracy"] for r in group if r.get("raw_accuracy") is not None]
        if len(raw) == len(group):  # EMA runs: the optimizer's own weights, as a row of their own
            rows.append(summary_row(dataset, f"{variant} [raw weights]", raw))
        rows.append(summary_row(dataset, variant, [r["accuracy"] for r in group]))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| dataset | variant | seeds | top-1 mean | std | min - max |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        std = "" if r["std"] is None else f"{100 * r['std']:.1f}"
        lines.append(
            f"| {r['dataset']} | {r['variant']} | {r['seeds']} | {100 * r['mean']:.1f} | {std} | "
            f"{100 * r['min']:.1f} - {100 * r['max']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--datasets", default=",".join(DATASETS), help=f"comma-separated, of {list(DATASETS)}"
    )
    parser.add_argument("--variants", default="knobs", help="core | knobs | comma-separated variant names")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--budget", type=int, default=1, help="multiply the steps by this (warmup stays as configured)"
    )
    parser.add_argument(
        "--work", default="runs/recipe-study", help="run directories (kept: the study resumes)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each on cores/jobs threads)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)"
    )
    parser.add_argument("--list", action="store_true", help="print the runs and their overrides, run nothing")
    parser.add_argument("--markdown", action="store_true", help="also print the summary as a Markdown table")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    datasets = {name: DATASETS[name] for name in args.datasets.split(",")}
    jobs = []
    for (dataset, data_overrides), (variant, overrides), seed in itertools.product(
        datasets.items(), variants(args.variants).items(), range(args.seeds)
    ):
        data_dir = Path(args.work).resolve() / "data" / dataset  # generated once, shared by every run
        run_overrides = (
            *BUDGET,
            *data_overrides,
            f"data.generate.dir={data_dir}",
            *overrides,
            f"train.seed={seed}",
        )
        if args.budget != 1:
            run_overrides += (f"train.steps={steps_of(run_overrides) * args.budget}",)
        name = f"x{args.budget}/{dataset}/{variant}/seed{seed}"
        jobs.append({"dataset": dataset, "variant": variant, "seed": seed, "budget": args.budget,
                     "overrides": run_overrides, "output_dir": str(Path(args.work) / name),
                     "data_dir": str(data_dir)})  # fmt: skip
    if args.list:
        for job in jobs:
            print(job["output_dir"], " ".join(job["overrides"]))
        return

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    started = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: run_one(job, threads=threads), jobs))
    rows = summarise(runs)
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "budget": list(BUDGET), "budget_multiplier": args.budget, "datasets": {k: list(v) for k, v in datasets.items()},
        "seconds": time.perf_counter() - started, "summary": rows, "runs": runs,
    }  # fmt: skip
    print(write_report(report, args.out))
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
