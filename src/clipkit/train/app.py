"""The Hydra entry point: composes conf/ with command-line overrides and runs training.

`-m` (multirun) runs one job per combination of the swept values, one after another in this process
(Hydra's basic launcher), each in its own output_dir (`sweep_job_dir`). A job that fails is reported with
its overrides and the sweep goes on; the command exits non-zero at the end if any job failed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from clipkit.configs import config_dir
from clipkit.errors import ClipkitError
from clipkit.train.argv import quote_shard_specs
from clipkit.train.schema import register_schema

log = logging.getLogger("clipkit.train")

MULTIRUN_ROOT = "runs/multirun"  # a sweep's base directory when output_dir is null: runs/multirun/<time>/
_MAX_DIR_NAME = 200  # bytes; file systems allow 255


def _configure_logging(launch_env: Mapping[str, str]) -> None:
    # Under a multi-process launch only the main process speaks above warnings.
    main_process = launch_env.get("RANK", "0") == "0"
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file is noise


def sweep_base_dir(output_dir: str | None, timestamp: str) -> str:
    """hydra.sweep.dir: the configured output_dir holds the sweep's jobs; null: runs/multirun/<time>."""
    return output_dir if output_dir else f"{MULTIRUN_ROOT}/{timestamp}"


def path_safe(name: str) -> str:
    """hydra.job.override_dirname as one directory name: no path separators (an override may name a
    path), and a long one cut short with a hash of the whole so it stays unique."""
    name = name.replace("/", "_").replace("\\", "_") or "defaults"
    if len(name.encode()) > _MAX_DIR_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = name.encode()[: _MAX_DIR_NAME - 9].decode(errors="ignore") + "-" + digest
    return name


def register_resolvers() -> None:
    """The resolvers conf/config.yaml's hydra.sweep uses (idempotent)."""
    OmegaConf.register_new_resolver("clipkit_sweep_dir", sweep_base_dir, replace=True)
    OmegaConf.register_new_resolver("clipkit_path_safe", path_safe, replace=True)


def name_jobs_by_swept_keys(overrides: list[str]) -> list[str]:
    """In a sweep, a job's directory is named by the overrides that vary between jobs (loss=siglip,optim.lr=0.001),
    not by those all jobs share: their keys go into hydra.job.config.override_dirname.exclude_keys (unless
    the command line sets that itself)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return overrides  # Hydra reports the bad override itself, in its own words
    if any(o.key_or_group == "hydra.job.config.override_dirname.exclude_keys" for o in parsed):
        return overrides
    shared = {o.key_or_group for o in parsed if not o.is_hydra_override() and not o.is_sweep_override()}
    keys = ",".join(f"'{key}'" for key in sorted(shared | {"output_dir"}))
    return [*overrides, f"hydra.job.config.override_dirname.exclude_keys=[{keys}]"]


def sweep_job_dir() -> str | None:
    """In multirun, this job's directory: <hydra.sweep.dir>/<job number>_<its overrides> (conf/config.yaml),
    which Hydra has just created; None in a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return os.path.join(hydra_cfg.sweep.dir, hydra_cfg.sweep.subdir)


def _job_label() -> str:
    from hydra.core.hydra_config import HydraConfig

    job = HydraConfig.get().job
    return f"job #{job.num} ({job.override_dirname or 'no overrides'})"


def main(arguments: Sequence[str] | None = None) -> None:
    """`python -m clipkit.train`, `accelerate launch -m clipkit.train` and `clipkit train` all start here.

    `arguments`: the command line after the program (default: sys.argv[1:]). The launch environment is read
    here, once, and handed to the Trainer; neither it nor sys.argv is changed."""
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser

    launch_env = dict(os.environ)
    failed: list[str] = []  # multirun: the jobs that failed, reported at the end

    def train(cfg: DictConfig) -> float | None:
        _configure_logging(launch_env)
        job_dir = sweep_job_dir()
        if job_dir is None:
            from clipkit.train.loop import run

            try:
                run(cfg, launch_env=launch_env)
            except ClipkitError as e:
                print(f"clipkit train: error: {e}", file=sys.stderr)
                sys.exit(2)
            return None
        cfg.output_dir = job_dir  # the job's own directory: its checkpoints, and only its, resume there
        try:
            return _train_job(cfg, launch_env)
        except Exception as e:  # noqa: BLE001 - one job's failure must not end the sweep
            label = _job_label()
            failed.append(label)
            if isinstance(e, ClipkitError):
                print(f"clipkit train: {label} failed: {e}", file=sys.stderr)
            else:
                log.exception("%s failed", label)
            return math.nan  # a sweeper that optimises (Optuna) records the trial as failed

    # What @hydra.main does, with the overrides passed in instead of read from sys.argv (which would have
    # to be rewritten to quote shard specs): Hydra's own parser, so --cfg, --help and -m work as usual.
    version.setbase("1.3")
    register_schema()  # conf/config.yaml's defaults list starts with it
    register_resolvers()
    parser = get_args_parser()
    overrides = quote_shard_specs(list(sys.argv[1:] if arguments is None else arguments))
    args = parser.parse_args(overrides)
    if args.multirun:
        args.overrides = name_jobs_by_swept_keys(args.overrides)
    _run_hydra(
        args=args,
        args_parser=parser,
        task_function=train,
        config_path=str(config_dir()),
        config_name="config",
    )
    if failed:
        print(f"clipkit train: {len(failed)} job(s) failed: {'; '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def _train_job(cfg: DictConfig, launch_env: Mapping[str, str]) -> float | None:
    """Train one sweep job; returns its objective (train.objective's last value in its metrics.jsonl) if one
    is set: what an optimising sweeper (Optuna) minimises or maximises."""
    from clipkit.train.loop import Trainer
    from clipkit.train.runs import final_metric

    trainer = Trainer(cfg, launch_env=launch_env)
    try:
        trainer.fit()
    finally:  # the next job reuses the process group (under accelerate launch); the rest is closed
        trainer.close(keep_process_group=True)
    objective = cfg.train.get("objective")
    if objective is None or launch_env.get("RANK", "0") != "0":  # the main process writes metrics.jsonl
        return None
    return final_metric(cfg.output_dir, objective)
