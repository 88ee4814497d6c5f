"""`accelerate launch -m clipkit.embed ARGS` (or `python -m clipkit.embed ARGS`): `clipkit embed` across processes.

The arguments are those of `clipkit embed`; see `clipkit.cli.embed`.
"""

import sys

from clipkit.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
