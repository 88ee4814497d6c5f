#!/usr/bin/env bash
# Build the virtualenv of clip-retrieval / autofaiss / img2dataset that tests/test_retrieval_interop.py runs:
#   scripts/interop/make_venv.sh VENV_DIR
# Run it with clipkit's environment active: the new venv sees that environment's packages (torch, open_clip,
# faiss, transformers) after its own (requirements/interop.txt, installed --no-deps), so nothing large is
# downloaded twice. About 100 MB from PyPI and a minute on a 2-core machine. Reruns only point the venv at the
# environment they run in.
set -euo pipefail
venv=${1:?usage: make_venv.sh VENV_DIR}
here=$(cd "$(dirname "$0")/../.." && pwd)
requirements="$here/requirements/interop.txt"
if ! { [ -f "$venv/.complete" ] && cmp -s "$venv/.complete" "$requirements"; }; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$requirements"
  cp "$requirements" "$venv/.complete"
fi
# Every run, also over a venv built before (perhaps from another clipkit environment: another checkout, or one
# since removed): the venv borrows this environment's packages, after its own.
purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
sitepackages=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$purelib" > "$sitepackages/zz_clipkit_environment.pth"
