"""Wall time of `clipkit benchmark`: first run, rerun on the same results directory, and a fresh results
directory reading the feature cache (probes and intervals recomputed, no image decoded). Prints JSON.

    python scripts/bench_benchmark.py --model runs/digits --model runs/digits/checkpoints/step_00000300 \\
        --suite local --out /tmp/bench-benchmark
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "clipkit", *args], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"clipkit {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--suite", default="local")
    parser.add_argument("--out", required=True, help="work directory (emptied first)")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    work = Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, CLIPKIT_CACHE=str(work / "cache"), PYTHONPATH=str(ROOT / "src"))
    common = ["benchmark", "--suite", args.suite, "--workers", str(args.workers)]
    for model in args.model:
        common += ["--model", model]
    # The generated datasets of the suite are made once, outside the timings.
    subprocess.run([sys.executable, "-c", f"from clipkit.eval.suite import open_suite, read_suite; "
                    f"open_suite(read_suite({args.suite!r}))"], env=env, check=True)  # fmt: skip
    first = timed([*common, "--out", str(work / "out")], env)
    same_out = timed([*common, "--out", str(work / "out")], env)
    cached_features = timed([*common, "--out", str(work / "out2")], env)
    print(json.dumps({
        "suite": args.suite, "models": args.model, "first_run_s": round(first, 1),
        "rerun_same_out_s": round(same_out, 1), "new_out_cached_features_s": round(cached_features, 1),
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "torch_threads": os.environ.get("OMP_NUM_THREADS"),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
