"""The JSON manifests of clipkit's retrieval folders (an index, an embeddings job), read with their format
checked: a file of another kind or another format version is refused with the way to remake it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipkit.errors import ClipkitError


def read_versioned_json(
    path: Path, *, format_name: str, version: int | tuple[int, ...], kind: str, fix: str
) -> dict[str, Any]:
    """The manifest at `path` (it exists), whose "format" must be `format_name` and "version" `version` (or
    one of them); `kind` names it in errors ("retrieval index"), `fix` says how to remake it ("rebuild the
    index")."""
    versions = version if isinstance(version, tuple) else (version,)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClipkitError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != format_name:
        raise ClipkitError(f"{path} is not a clipkit {kind} manifest")
    if manifest.get("version") not in versions:
        readable = " or ".join(map(str, versions))
        raise ClipkitError(
            f"{path} has {kind} format version {manifest.get('version')}; this clipkit reads version {readable}: "
            f"{fix}"
        )
    return manifest
