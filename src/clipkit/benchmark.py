"""`accelerate launch -m clipkit.benchmark ARGS`: `clipkit benchmark` with the work split across processes.

Each process evaluates every world_size-th pending (model, dataset) pair on its own device; the main
process then writes the table, files and pictures. The arguments are `clipkit benchmark`'s.
"""

from __future__ import annotations

import argparse
import logging
import sys

from clipkit.errors import ClipkitError


def main(argv: list[str] | None = None) -> int:
    import torch
    from accelerate import Accelerator

    from clipkit.cli import benchmark

    parser = argparse.ArgumentParser(prog="python -m clipkit.benchmark", description=benchmark.__doc__)
    benchmark.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Without cpu=True, Accelerate under torchrun on a GPU-less machine reports one process.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    try:
        return benchmark.run(
            args,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            barrier=accelerator.wait_for_everyone,
            device=args.device or str(accelerator.device),
        )
    except ClipkitError as e:
        print(f"clipkit benchmark: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
