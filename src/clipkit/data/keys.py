"""Key lists (`data.keep_keys=FILE`): the samples of the training shards that training reads, the rest skipped
before decoding.

A key list is a text file, one sample a line: `SHARD#KEY`, where SHARD is the shard's file name or its path
relative to the collection (`00000.tar`, `part-1/00003.tar`) and KEY its webdataset key; a line without `#`
keeps KEY in every shard. Blank lines and lines starting with `#` are ignored. `clipkit filter` writes them.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

from clipkit.errors import ClipkitError

ANY_SHARD = ""


@dataclass(frozen=True)
class KeepKeys:
    """The samples a key list names: key -> the shard names it is kept in (ANY_SHARD: every shard)."""

    path: str
    shards_of_key: dict[str, frozenset[str]]
    digest: str  # of the file's content: a resumed run must read the same list

    def __len__(self) -> int:
        return sum(len(shards) for shards in self.shards_of_key.values())

    def keeps(self, url: str, key: str) -> bool:
        """Whether sample `key` of the shard at `url` is on the list."""
        shards = self.shards_of_key.get(key)
        if not shards:
            return False
        return any(name == ANY_SHARD or url == name or url.endswith("/" + name) for name in shards)


def read_keep_keys(path: str | Path) -> KeepKeys:
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ClipkitError(
            f"data.keep_keys: cannot read {path} ({e.strerror or e}); write one with `clipkit filter`"
        ) from None
    shards_of_key: dict[str, set[str]] = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        shard, _, key = line.rpartition("#")
        shards_of_key.setdefault(key, set()).add(shard.strip("/"))
    if not shards_of_key:
        raise ClipkitError(f"data.keep_keys: {path} names no sample; write one with `clipkit filter`")
    frozen = {key: frozenset(shards) for key, shards in shards_of_key.items()}
    return KeepKeys(str(path), frozen, hashlib.blake2b(data, digest_size=8).hexdigest())


def count_kept(keep: KeepKeys, urls: list[str]) -> int | None:
    """How many samples of the local shards `urls` the list keeps (tar headers only, no image read);
    None when no shard is a local file (remote shards are not probed)."""
    from webdataset.tariterators import base_plus_ext

    local = [url for url in urls if Path(url).is_file()]
    if not local:
        return None
    kept = 0
    for url in local:
        seen: set[str] = set()
        try:
            with tarfile.open(url, "r:") as tar:
                for member in tar:
                    key, _ = base_plus_ext(member.name)
                    if key is not None and key not in seen:
                        seen.add(key)
                        kept += keep.keeps(url, key)
        except (tarfile.TarError, OSError):
            continue  # a damaged shard is the stream's to report
    return kept


def check_keep_keys(keep: KeepKeys, urls: list[str]) -> None:
    """A list that keeps no sample of the training shards is a mistake (another collection's list)."""
    if count_kept(keep, urls) == 0:
        example = next(iter(keep.shards_of_key))
        raise ClipkitError(
            f"data.keep_keys: {keep.path} matches no sample of data.train_shards ({len(urls)} shard(s), first "
            f"{urls[0]}; the list names e.g. {example!r}); give the key list `clipkit filter` wrote for these shards"
        )
