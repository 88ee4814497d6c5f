"""Shard specs on the command line as users type them, before Hydra parses the overrides.

Hydra's override grammar reads `{` as the start of a dictionary, so `data.train_shards=/d/{00000..00099}.tar`
(what the shell hands over after stripping `'...'`) stops with "mismatched input '{'". Shard specs are
paths, `::` joins and `pipe:` commands, never Hydra dictionaries, so their values are passed to Hydra as
quoted strings. Without quotes, bash or zsh expand the brace range themselves into one argument per shard
(`data.train_shards=/d/00000.tar data.train_shards=/d/00001.tar ...`); those are joined back with `::`
into one value (several sources that, without `data.weights`, are read as one dataset), each shard once.
"""

from __future__ import annotations

# Keys whose values are shard specs or paths (with or without Hydra's `+` / `++` prefixes).
SPEC_KEYS = ("data.train_shards", "data.val_shards", "data.zeroshot_dataset")


def _split(argument: str) -> tuple[str, str] | None:
    """(key, value) of a shard-spec override, or None for any other argument."""
    key, sep, value = argument.partition("=")
    if not sep or key.lstrip("+") not in SPEC_KEYS:
        return None
    return key, value


def _needs_quotes(value: str) -> bool:
    if value in ("", "null") or value[0] in "'\"[":  # already quoted, null, or a Hydra list: Hydra's own
        return False
    return True


def _quote(value: str) -> str:
    # Inside a Hydra quoted string only the quote itself (and a backslash before it) needs escaping.
    return "'" + value.replace("\\'", "\\\\'").replace("'", "\\'") + "'"


def quote_shard_specs(arguments: list[str]) -> list[str]:
    """The overrides with shard-spec values quoted for Hydra; consecutive repeats of a key joined by `::`."""
    result: list[str] = []
    pending: tuple[str, list[str]] | None = None  # (key, values) of the spec override being collected

    def flush() -> None:
        if pending is not None:
            key, values = pending
            if len(values) > 1:
                # Two brace ranges in one word expand to their product, with repeats: keep each shard once.
                values = list(dict.fromkeys(part for value in values for part in value.split("::")))
            value = "::".join(values)
            result.append(f"{key}={_quote(value) if _needs_quotes(value) else value}")

    for argument in arguments:
        parsed = _split(argument)
        if (
            parsed is not None
            and pending is not None
            and parsed[0] == pending[0]
            and _needs_quotes(parsed[1])
            and _needs_quotes(pending[1][0])
        ):
            pending[1].append(parsed[1])  # the shell expanded a brace range: one argument per shard
            continue
        flush()
        pending = None
        if parsed is None:
            result.append(argument)
        else:
            pending = (parsed[0], [parsed[1]])
    flush()
    return result
