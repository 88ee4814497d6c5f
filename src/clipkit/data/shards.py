"""Shard specs and reading raw samples from shards, on top of webdataset's own URL and tar handling."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from webdataset.gopen import gopen, gopen_schemes
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from clipkit.data.config import split_sources
from clipkit.errors import ClipkitError

log = logging.getLogger(__name__)

# Called with (shard url, sample key or None, reason) for every problem met while reading.
ErrorCallback = Callable[[str, "str | None", str], None]


def is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    # A one-letter scheme is a Windows drive letter, not a URL scheme.
    return scheme in ("", "file") or len(scheme) == 1


def local_path(url: str) -> Path:
    return Path(urlparse(url).path if url.startswith("file:") else url).expanduser()


def expand_source(source: str) -> list[str]:
    """Concrete shard URLs of one source: brace expansion (webdataset's), `~`, and directories -> *.tar."""
    urls: list[str] = []
    for url in expand_urls(source.strip()):
        if is_local(url):
            path = local_path(url)
            if path.is_dir():
                urls.extend(str(p) for p in sorted(path.glob("*.tar")))
                continue
            url = str(path)
        urls.append(url)
    return urls


def resolve_sources(sources: list[str], *, what: str) -> list[list[str]]:
    """Expand each source and check its local shards exist, before anything trains.

    A source none of whose local shards exist is an error naming the spec; a source with some missing
    shards keeps the others and says which are missing. Remote URLs and `pipe:` commands are not probed.
    """
    resolved = []
    for source in sources:
        urls = expand_source(source)
        missing = [u for u in urls if is_local(u) and not Path(u).is_file()]
        if len(missing) == len(urls):
            looked = f" (looked for {missing[0]}{' ...' if len(missing) > 1 else ''})" if missing else ""
            raise ClipkitError(
                f"{what} '{source}' matches no shard file{looked}; check the path and the brace range "
                "(e.g. shards/{00000..00099}.tar) or name a directory of .tar files"
            )
        if missing:
            log.warning(
                "%s '%s': %d of %d shards do not exist and are left out (first: %s)",
                what,
                source,
                len(missing),
                len(urls),
                missing[0],
            )
            missing_set = set(missing)
            urls = [u for u in urls if u not in missing_set]
        resolved.append(urls)
    return resolved


def open_shard(url: str):
    """A readable binary stream for a shard: webdataset's gopen for its schemes, fsspec for the others."""
    scheme = urlparse(url).scheme
    if is_local(url) or scheme in gopen_schemes:
        return gopen(url, "rb")
    try:
        import fsspec
    except ImportError:
        raise ClipkitError(f"{url}: reading '{scheme}://' URLs needs fsspec (pip install fsspec)") from None
    return fsspec.open(url, "rb").open()


class _TailRecorder:
    """Passes reads through, keeping the first header block and the last 1024 bytes read.

    Python's tarfile, reading a stream, ends quietly when a tar is cut short at a header; a complete
    uncompressed tar ends with two zero blocks, so their absence is how a truncated shard is told apart.
    """

    def __init__(self, stream, url: str):
        self.stream = stream
        self.url = url
        self.head = b""
        self.tail = b""

    def __str__(self) -> str:  # webdataset puts the stream into its error messages
        return self.url

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if len(self.head) < 512:
            self.head += data[: 512 - len(self.head)]
        self.tail = (self.tail + data)[-1024:]
        return data

    def ended_cleanly(self) -> bool:
        while self.read(1 << 16):  # the rest is end-of-archive padding
            pass
        is_plain_tar = self.head[257:262] == b"ustar"  # compressed streams check their own ends
        return not is_plain_tar or (len(self.tail) == 1024 and not any(self.tail))

    def close(self) -> None:
        self.stream.close()


def iter_shard_samples(url: str, on_error: ErrorCallback) -> Iterator[dict[str, Any]]:
    """Raw samples ({"__key__", "__url__", ext: bytes, ...}) of one shard, in tar order, nothing decoded.

    A problem with the shard itself (cannot be opened, truncated or corrupt tar, empty) goes to
    `on_error` once per read, with the first reason; reading goes on with whatever can be read.
    """
    problems: list[str] = []

    def handler(exn: Exception) -> bool:
        problems.append(f"{type(exn).__name__}: {exn.args[0] if exn.args else ''}")
        return True  # keep going with the rest of the shard

    count = 0
    try:
        stream = _TailRecorder(open_shard(url), url)
    except ClipkitError:
        raise
    except Exception as e:
        problems.append(f"cannot open shard ({type(e).__name__}: {e})")
    else:
        try:
            # eof_value=None: one shard per call, so nothing needs separating.
            files = tar_file_expander([{"url": url, "stream": stream}], handler=handler, eof_value=None)
            for sample in group_by_keys(files, handler=handler):
                count += 1
                yield sample
            if not problems and not stream.ended_cleanly():
                problems.append("truncated tar (it ends without the end-of-archive blocks)")
        finally:
            try:
                stream.close()
            except Exception as e:  # a `pipe:` command that failed reports it on close
                problems.append(f"closing shard failed ({type(e).__name__}: {e})")
    if problems:
        on_error(url, None, problems[0])
    elif count == 0:
        on_error(url, None, "empty shard (no samples)")


def _text_of(raw: Any, what: str) -> str:
    try:
        return raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else str(raw)
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8 text") from None


def caption_of(sample: dict[str, Any]) -> str:
    """The sample's caption (KEY.txt as one text), or ValueError saying why it has none."""
    raw = sample.get("txt")
    if raw is None:
        raise ValueError("no caption (.txt)")
    text = _text_of(raw, "caption").strip()
    if not text:
        raise ValueError("empty caption")
    return text


def captions_of(sample: dict[str, Any]) -> list[str]:
    """The sample's captions: KEY.txt's non-empty lines, else KEY.json as a JSON list of strings.

    KEY.txt wins when a sample has both: a KEY.json beside a KEY.txt is metadata (img2dataset's and
    clipkit's layouts write one) and is not read. ValueError says why a sample has no caption.
    """
    if "txt" in sample:
        return [line.strip() for line in caption_of(sample).splitlines() if line.strip()]
    raw = sample.get("json")
    if raw is None:
        raise ValueError("no caption (.txt, or .json with a list of captions)")
    try:
        captions = json.loads(_text_of(raw, "captions (.json)"))
    except json.JSONDecodeError as e:
        raise ValueError(f"captions (.json) are not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError("captions (.json) must be a JSON list of strings")
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise ValueError("empty caption list (.json)")
    return captions


def iter_captions(
    spec: str | list[str], *, limit: int | None = None, on_error: ErrorCallback | None = None
) -> Iterator[str]:
    """The captions of all shards of `spec` in order (images are not decoded)."""

    def default_error(url: str, key: str | None, reason: str) -> None:
        log.warning("%s%s: %s", url, f" key {key}" if key else "", reason)

    on_error = on_error or default_error
    count = 0
    for urls in resolve_sources(split_sources(spec), what="shard spec"):
        for url in urls:
            for sample in iter_shard_samples(url, on_error):
                try:
                    text = caption_of(sample)
                except ValueError:
                    continue
                yield text
                count += 1
                if limit is not None and count >= limit:
                    return
