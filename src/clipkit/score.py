"""`accelerate launch -m clipkit.score ARGS` (or `python -m clipkit.score ARGS`): `clipkit score` across processes.

The arguments are those of `clipkit score`; see `clipkit.cli.score`.
"""

import sys

from clipkit.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
