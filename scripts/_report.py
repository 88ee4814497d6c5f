"""How every benchmark script ends: its JSON report, returned for printing and, with --out, written to a
file (under a temporary name, renamed when complete)."""

from __future__ import annotations

import json

from clipkit.files import write_text_atomic


def write_report(report: dict, out: str | None) -> str:
    text = json.dumps(report, indent=2)
    if out:
        write_text_atomic(out, text + "\n")
    return text
