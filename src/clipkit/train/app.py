"""The Hydra entry point: composes conf/ with command-line overrides and runs training."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from clipkit.configs import config_dir
from clipkit.errors import ClipkitError
from clipkit.train.argv import quote_shard_specs
from clipkit.train.schema import register_schema


def _configure_logging() -> None:
    # Under a multi-process launch only the main process speaks above warnings.
    main_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file is noise


def main() -> None:
    """`python -m clipkit.train`, `accelerate launch -m clipkit.train` and `clipkit train` all start here."""
    sys.argv = [sys.argv[0], *quote_shard_specs(sys.argv[1:])]
    register_schema()  # conf/config.yaml's defaults list starts with it
    _hydra_main()


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    _configure_logging()
    from clipkit.train.loop import run

    try:
        run(cfg)
    except ClipkitError as e:
        print(f"clipkit train: error: {e}", file=sys.stderr)
        sys.exit(2)
