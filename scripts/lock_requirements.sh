#!/usr/bin/env bash
# Regenerate requirements/lock.txt (the Docker image's pinned runtime versions) from a fresh resolve of
# `pip install .`. Run it in the virtual environment the tests passed in, then re-run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
report=$(mktemp)
pip install -q --dry-run --ignore-installed --report "$report" .
python - "$report" <<'PY'
import datetime, json, platform, sys
report = json.load(open(sys.argv[1]))
pins = sorted((p["metadata"]["name"].lower(), p["metadata"]["version"]) for p in report["install"]
              if p["metadata"]["name"].lower() != "clipkit")
with open("requirements/lock.txt", "w") as f:
    f.write(f"# Runtime dependency versions resolved by `pip install .` on {datetime.date.today()} "
            f"(Python {platform.python_version()}, {platform.system()} {platform.machine()})\n"
            "# and tested there; the Dockerfile installs exactly these. Regenerate with scripts/lock_requirements.sh.\n")
    f.writelines(f"{name}=={version}\n" for name, version in pins)
print(f"wrote {len(pins)} pins to requirements/lock.txt")
PY
rm -f "$report"
