#!/usr/bin/env bash
# clipkit's GPU check, in one go on a bare GPU machine with no package index (designed for one H200 with
# Python, torch, accelerate, timm and transformers; ~8 minutes at most):
#   1. installs the wheels scripts/gpu/fetch_wheels.sh put in .whl/, offline, and clipkit itself (-e .);
#   2. runs the tests marked `gpu` (tests/test_gpu.py: CUDA losses, the trainer on CUDA, TF32, SDPA);
#   3. runs scripts/gpu/bench_gpu.py in the time left: samples/s, peak memory and MFU of ViT-B-32 and
#      ViT-B-16, as JSON (to --out FILE as well).
# Exits non-zero if a test or a measurement failed; the JSON is printed either way.
#
#   bash scripts/gpu/check.sh --out gpu_check.json    # on the GPU machine, from the repository root
#   bash scripts/gpu/check.sh --dry-run               # anywhere: CPU, tiny sizes, the current environment
#
# --dry-run installs nothing (the current environment must have clipkit's dependencies, as CI's does),
# and the gpu tests skip without CUDA; the benchmark runs its CPU dry run.
set -uo pipefail
cd "$(dirname "$0")/../.."

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
DRY_RUN=0
OUT_FILE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT_FILE=${2:?"check.sh: --out needs a file name"}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "check.sh: unknown argument '$1' (expected --dry-run, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done

TOTAL_S=450  # the whole check, GPU run; the benchmark gets what the install and the tests leave
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# This tree's sources come first whatever is installed: the check is about the code that travelled.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY_RUN" = 0 ]; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "check.sh: no wheels in .whl/: run 'bash scripts/gpu/fetch_wheels.sh' where pip reaches PyPI, and carry .whl" >&2
    exit 2
  fi
  echo "== install (offline, from .whl/)"
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile .whl/*.whl || exit 1
  # clipkit itself (the `clipkit` command); the check imports it from src/ either way (PYTHONPATH above).
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . ||
    echo "check.sh: warning: 'pip install -e .' failed; the check goes on with clipkit from src/ (PYTHONPATH)" >&2
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

echo "== tests marked gpu"
"$PYTHON" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
tests_rc=$?

echo "== bench_gpu.py"
bench_args=()
if [ "$DRY_RUN" = 1 ]; then
  bench_args+=(--dry-run)
else
  budget=$((TOTAL_S - SECONDS))
  [ "$budget" -lt 60 ] && budget=60
  bench_args+=(--budget-s "$budget")
fi
[ -n "$OUT_FILE" ] && bench_args+=(--out "$OUT_FILE")
"$PYTHON" scripts/gpu/bench_gpu.py "${bench_args[@]}"
bench_rc=$?

echo "== check.sh: tests exit $tests_rc, bench exit $bench_rc, ${SECONDS} s"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
