#!/usr/bin/env bash
# Downloads, where pip can reach PyPI, the wheels a bare GPU machine needs to run clipkit's GPU check
# (scripts/gpu/check.sh) with no package index. They go to .whl/ at the repository root (ignored by git;
# the device tool carries it: `carry: [".whl"]`).
#
# The target image already has Python 3.12, torch, torchvision, accelerate, timm, transformers,
# huggingface_hub, safetensors, regex, numpy, pillow, pyyaml, sentencepiece, tqdm, pytest, packaging,
# pathspec and pluggy (/work/.library/device/KINDS.md lists them). What clipkit's training path needs
# beyond those is all pure Python, fetched here at the versions requirements/lock.txt pins:
#   open_clip_torch (the towers), webdataset + braceexpand (shards), hydra-core + omegaconf + antlr4 (the
#   config), ftfy + wcwidth (open_clip's tokenizer), hatchling + editables + trove-classifiers (to install clipkit
#   itself, `pip install -e .`, with no index; hatchling needs editables for that).
# Serving and indexing (fastapi, uvicorn, faiss) and wandb are not part of the check and are not fetched.
#
#   bash scripts/gpu/fetch_wheels.sh        # ~2 MB into .whl/
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
DEST=.whl
LOCK=requirements/lock.txt
PINNED=(open_clip_torch webdataset braceexpand hydra-core omegaconf antlr4-python3-runtime ftfy wcwidth)
BUILD=(hatchling editables trove-classifiers)  # to build clipkit: not in the lock file

pin() {  # NAME -> NAME==VERSION from the lock file
  local line
  line=$(grep -i "^$1==" "$LOCK") || { echo "fetch_wheels.sh: $1 is not pinned in $LOCK" >&2; exit 2; }
  echo "$line"
}

rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
specs=()
for name in "${PINNED[@]}"; do
  [ "$name" = antlr4-python3-runtime ] || specs+=("$(pin "$name")")
done
specs+=("${BUILD[@]}")
# For the GPU machine's interpreter (CPython 3.12, x86-64 Linux), whatever this machine runs. --no-deps:
# every package the image lacks is named above; two versions of one would stop the install there.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST.tmp" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any "${specs[@]}"
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 needs) is published as a source archive only: built
# here into a pure-Python wheel.
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$DEST.tmp" "$(pin antlr4-python3-runtime)"

rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
ls -1 "$DEST"
du -sh "$DEST"
