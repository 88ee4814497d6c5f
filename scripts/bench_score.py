"""`clipkit score` against `clipkit embed` on the same images with the same model: the price of the caption side.

Both commands run as a user runs them (a subprocess each, imports and model load included) on the digits'
1,258 training images, alternating ABBA so drift on a shared machine hits both alike; the JSON reports wall
and CPU seconds (user + system of the child) per run, the medians and the ratio score / embed.

    nice -n 10 python scripts/bench_score.py --model runs/quickstart --out bench_score.json
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import write_report


def timed(argv: list[str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--pairs", type=int, default=2, help="ABBA pairs")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    from clipkit.data.prepare import ensure_generated

    runs = {"embed": [], "score": []}
    with tempfile.TemporaryDirectory(prefix="bench-score-") as work:
        work = Path(work)
        digits = ensure_generated(
            {"name": "digits", "dir": str(work / "digits"), "seed": 0, "test_fraction": 0.3, "image_size": 32}
        )
        order = [
            c for n in range(args.pairs) for c in (("embed", "score") if n % 2 == 0 else ("score", "embed"))
        ]
        for n, command in enumerate(order):
            argv = [sys.executable, "-m", "clipkit", command, "--model", args.model, "--images", str(digits / "train"),
                    "--out", str(work / f"{command}-{n}"), "--workers", str(args.workers), "--no-progress"]  # fmt: skip
            wall, cpu = timed(argv)
            runs[command].append({"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)})
            print(command, runs[command][-1], file=sys.stderr)
    medians = {
        c: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s")} for c, rs in runs.items()
    }
    report = {
        "benchmark": "clipkit score vs clipkit embed, 1,258 digit images",
        "command": "nice -n 10 python scripts/bench_score.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "runs": runs,
        "medians": medians,
        "ratio_wall": medians["score"]["wall_s"] / medians["embed"]["wall_s"],
        "ratio_cpu": medians["score"]["cpu_s"] / medians["embed"]["cpu_s"],
    }
    print(write_report(report, args.out))


if __name__ == "__main__":
    main()
