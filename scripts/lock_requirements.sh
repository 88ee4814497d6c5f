#!/usr/bin/env bash
# Refresh the pinned dependency sets, on purpose (CI never resolves against the index of the day):
#   requirements/lock.txt      runtime: what `pip install .` resolves; the Dockerfile installs exactly these
#   requirements/lock-dev.txt  runtime + the dev extra, resolved with lock.txt as constraints; the README's
#                              install commands and CI (.ci/run) install with it as constraints
# Then re-run the tests in a fresh virtualenv installed from the new locks (the README's test command) and commit
# both files together (`--dev-only` keeps lock.txt and re-resolves lock-dev.txt only, after a dev extra changes;
# `--add` keeps every pin of both files and only adds what a new dependency brings).
# scripts/check_latest.sh tries the newest releases without the locks (non-blocking).
set -euo pipefail
cd "$(dirname "$0")/.."

resolve() {  # resolve OUT HEADER PIP-ARGS...: write the pins of a dry-run resolve of PIP-ARGS to OUT
  local out=$1 header=$2 report
  shift 2
  report=$(mktemp)
  pip install -q --dry-run --ignore-installed --report "$report" "$@"
  python - "$report" "$out" "$header" <<'PY'
import datetime, json, platform, sys
report, out, header = sys.argv[1:]
pins = sorted((p["metadata"]["name"].lower(), p["metadata"]["version"]) for p in json.load(open(report))["install"]
              if p["metadata"]["name"].lower() != "clipkit")
with open(out + ".tmp", "w") as f:
    f.write(f"# {header} Resolved on {datetime.date.today()} "
            f"(Python {platform.python_version()}, {platform.system()} {platform.machine()}).\n"
            "# Regenerate with scripts/lock_requirements.sh, never by hand.\n")
    f.writelines(f"{name}=={version}\n" for name, version in pins)
import os; os.replace(out + ".tmp", out)
print(f"wrote {len(pins)} pins to {out}")
PY
  rm -f "$report"
}

keep=()
if [ "${1:-}" = --add ]; then  # a dependency was added: keep every other pin as it is
  keep=(-c requirements/lock-dev.txt)
fi
[ "${1:-}" = --dev-only ] || [ "${1:-}" = --add ] || resolve requirements/lock.txt \
  "Runtime dependency versions (\`pip install .\`); the Dockerfile installs exactly these." .
resolve requirements/lock-dev.txt \
  "Runtime + dev versions (\`pip install -c requirements/lock.txt '.[dev]'\`); CI and the README install with these as constraints." \
  -c requirements/lock.txt "${keep[@]}" ".[dev]"
