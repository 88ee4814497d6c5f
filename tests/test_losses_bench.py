"""scripts/bench_loss.py runs and its memory measurement tells the losses apart (no timings asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO_ROOT, subprocess_env


def test_bench_loss_prints_json_and_siglip_memory_stays_flat():
    command = [sys.executable, "scripts/bench_loss.py", "--batch-sizes", "256", "--world-sizes", "1", "2"]
    command += ["--dim", "32", "--repeats", "1", "--cores", "1"]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)

    rows = {(row["kind"], row["impl"], row["world_size"]) for row in report["rows"]}
    assert rows == {(k, i, w) for k in ("clip", "siglip") for i in ("clipkit", "open_clip") for w in (1, 2)}
    assert all(row["peak_mib"] > 0 and row["time_s"] > 0 for row in report["rows"])

    peak = report["summary"]["peak_over_w1"]
    assert peak["siglip/clipkit/b256"]["w2"] <= 1.25  # one chunk of logits at a time
    assert peak["siglip/open_clip/b256"]["w2"] > 1.25  # keeps every chunk: the measurement sees it
    assert peak["clip/clipkit/b256"]["w2"] < 3  # local rows only: linear in W, not the full matrix's 4x
