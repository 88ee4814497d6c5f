"""Train a model: `clipkit train [Hydra overrides]`, the same as `python -m clipkit.train [overrides]`.

Examples: `clipkit train experiment=quickstart`, `clipkit train model=vit-b-32 loss=siglip
data.train_shards='shards/{00000..00099}.tar' train.steps=10000`. For several processes or GPUs use
`accelerate launch -m clipkit.train [overrides]`. Every argument goes to Hydra: `-m` sweeps
(`clipkit train -m optim.lr=5e-4,1e-3 loss=clip,siglip`), `--cfg job` prints the config, `--help` Hydra's help.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides", nargs=argparse.REMAINDER, help="Hydra overrides, e.g. model=tiny train.steps=100"
    )


def run(args: argparse.Namespace) -> int:
    return run_hydra(args.overrides)


def run_hydra(arguments: list[str]) -> int:
    """`clipkit train ARGUMENTS`: clipkit's main() hands them here unparsed (argparse would refuse -m)."""
    from clipkit.train.app import main

    main(arguments)
    return 0
