"""The Hydra entry point: composes conf/ with command-line overrides and runs training."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence

from omegaconf import DictConfig

from clipkit.configs import config_dir
from clipkit.errors import ClipkitError
from clipkit.train.argv import quote_shard_specs
from clipkit.train.schema import register_schema


def _configure_logging(launch_env: Mapping[str, str]) -> None:
    # Under a multi-process launch only the main process speaks above warnings.
    main_process = launch_env.get("RANK", "0") == "0"
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file is noise


def main(arguments: Sequence[str] | None = None) -> None:
    """`python -m clipkit.train`, `accelerate launch -m clipkit.train` and `clipkit train` all start here.

    `arguments`: the command line after the program (default: sys.argv[1:]). The launch environment is read
    here, once, and handed to the Trainer; neither it nor sys.argv is changed."""
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser

    launch_env = dict(os.environ)

    def train(cfg: DictConfig) -> None:
        _configure_logging(launch_env)
        from clipkit.train.loop import run

        try:
            run(cfg, launch_env=launch_env)
        except ClipkitError as e:
            print(f"clipkit train: error: {e}", file=sys.stderr)
            sys.exit(2)

    # What @hydra.main does, with the overrides passed in instead of read from sys.argv (which would have
    # to be rewritten to quote shard specs): Hydra's own parser, so --cfg, --help and -m work as usual.
    version.setbase("1.3")
    register_schema()  # conf/config.yaml's defaults list starts with it
    parser = get_args_parser()
    overrides = quote_shard_specs(list(sys.argv[1:] if arguments is None else arguments))
    _run_hydra(
        args=parser.parse_args(overrides),
        args_parser=parser,
        task_function=train,
        config_path=str(config_dir()),
        config_name="config",
    )
