"""Credentials removed from text before clipkit writes it anywhere (config.yaml, metrics, logs sent to
wandb, model cards, index and embeddings manifests).

Shard specs and model sources are URLs and `pipe:` commands, which may carry secrets: `https://user:pass@host/`,
`?token=...` / signed-URL query parameters, `curl -H 'Authorization: Bearer ...'`, `curl -u user:pass`.
`redact` keeps everything else (host, path, header name) so the record still says where the data came from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

_SUBSTITUTIONS = (
    # scheme://user:password@host -> scheme://***@host
    (re.compile(r"(?P<keep>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#@\s'\"]+@"), rf"\g<keep>{MASK}@"),
    # Header values in commands: -H 'Authorization: Bearer x', --header "X-Api-Key: x", Cookie: ...
    (
        re.compile(
            r"(?P<keep>(?i:\b(?:proxy-)?authorization|\bcookie|\bx-[a-z0-9-]*(?:key|token|auth)[a-z0-9-]*"
            r"|\bapi-key|\bprivate-token)\s*:\s*)[^'\"\n]+"
        ),
        rf"\g<keep>{MASK}",
    ),
    # curl -u user:pass / --user user:pass / --oauth2-bearer TOKEN / wget --password=...
    (
        re.compile(
            r"(?P<keep>(?:\s-u|--user|--proxy-user|--oauth2-bearer|--password|--http-password)[\s=]+['\"]?)[^\s'\"]+"
        ),
        rf"\g<keep>{MASK}",
    ),
    # Query parameters that carry credentials (signed S3 / GCS / Azure SAS URLs, API tokens).
    (
        re.compile(
            r"(?P<keep>[?&;](?i:[a-z0-9_.-]*(?:token|secret|signature|password|passwd|credential|api[_-]?key)"
            r"[a-z0-9_.-]*|sig|key|auth)=)[^&#\s'\"]+"
        ),
        rf"\g<keep>{MASK}",
    ),
)


def redact_text(text: str) -> str:
    """`text` with the credentials of any URL or command in it replaced by ***."""
    for pattern, replacement in _SUBSTITUTIONS:
        text = pattern.sub(replacement, text)
    return text


def redact(value: Any) -> Any:
    """A copy of `value` (strings, mappings, lists, tuples, nested) with every string passed through
    `redact_text`; other values unchanged."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {redact(k): redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value
