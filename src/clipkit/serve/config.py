"""What the server bounds and who it answers: ServeConfig, whose fields `clipkit serve` turns into flags.

Imports nothing heavy, so building the CLI's parser does not load torch or FastAPI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from clipkit.errors import ClipkitError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_HOST_PATTERN = re.compile(r"\*|(\*\.)?[a-z0-9_.-]+|\[[0-9a-f:.]+\]")  # a name, *.domain, IPv4, [IPv6], or *


def _setting(default, help: str, *, flag: str, minimum: float | None = None, above: float | None = None,
             unit: float = 1, metavar: str | None = None):  # fmt: skip
    """A ServeConfig field and how `clipkit serve` exposes it: its flag (in `unit`s of the field) and bounds."""
    metadata = {
        "help": help,
        "flag": flag,
        "minimum": minimum,
        "above": above,
        "unit": unit,
        "metavar": metavar,
    }
    return field(default=default, metadata=metadata)


class InvalidServeSetting(ClipkitError):
    """A ServeConfig value out of its bounds; `name` is the field."""

    def __init__(self, name: str, value, rule: str):
        super().__init__(f"ServeConfig.{name} must be {rule}, got {value!r}")
        self.name, self.value, self.rule = name, value, rule


@dataclass(kw_only=True)
class ServeConfig:
    """How the server answers and what it bounds. Every field but `api_key` is a `clipkit serve` flag."""

    api_key: str | None = (
        None  # when set, every route but app.OPEN_PATHS needs `Authorization: Bearer <api_key>`
    )
    max_batch: int = _setting(64, "text queries encoded together at most", flag="--max-batch", minimum=1)
    max_image_batch: int = _setting(16, "uploaded images encoded together at most", flag="--max-image-batch",
                                    minimum=1)  # fmt: skip
    batch_wait_ms: float = _setting(2.0, "how long a query waits for others to join its batch",
                                    flag="--batch-wait-ms", minimum=0)  # fmt: skip
    max_queue: int = _setting(256, "requests waiting per batcher; past this the server answers 503 at once",
                              flag="--max-queue", minimum=1)  # fmt: skip
    request_timeout_s: float = _setting(30.0, "a request not answered by then gets 503",
                                        flag="--request-timeout", above=0, metavar="SECONDS")  # fmt: skip
    retry_after_s: int = _setting(1, "the Retry-After of 503 answers", flag="--retry-after", minimum=0,
                                  metavar="SECONDS")  # fmt: skip
    reload_interval_s: float = _setting(2.0, "how often index.json is checked for a new generation "
                                        "(0: only POST /v1/index/reload)", flag="--reload-interval", minimum=0,
                                        metavar="SECONDS")  # fmt: skip
    max_upload_bytes: int = _setting(10 * 2**20, "largest image upload", flag="--max-upload-mb", above=0,
                                     unit=2**20)  # fmt: skip
    # 4096 x 4096: a 12 MP phone photo passes; decoding one costs ~50 MB of RGB pixels.
    max_image_pixels: int = _setting(4096 * 4096, "uploads declaring more pixels are refused (413) before "
                                     "decoding", flag="--max-image-pixels", minimum=1)  # fmt: skip
    max_decodes: int = _setting(2, "uploads decoded at once (each up to --max-image-pixels)",
                                flag="--max-decodes", minimum=1)  # fmt: skip
    decode_wait_s: float = _setting(2.0, "how long an upload waits for a decoder before 503",
                                    flag="--decode-wait", minimum=0, metavar="SECONDS")  # fmt: skip
    thumbnail_cache_bytes: int = _setting(64 * 2**20, "memory for thumbnails", flag="--thumbnail-cache-mb",
                                          minimum=0, unit=2**20)  # fmt: skip
    max_requests: int = _setting(64, "requests in progress at once; past this the server answers 503 at once",
                                 flag="--max-requests", minimum=1)  # fmt: skip
    max_connections: int = _setting(512, "open connections; past this the one longest without a request in "
                                    "progress is closed", flag="--max-connections", minimum=1)  # fmt: skip
    header_timeout_s: float = _setting(10.0, "a connection that has not sent its request headers by then is "
                                       "closed", flag="--header-timeout", above=0, metavar="SECONDS")  # fmt: skip
    # Longer than the idle timeout of clients and load balancers (httpx 5 s, AWS ALB 60 s), as nginx's 75 s is:
    # a server that closes an idle connection first races a request sent on it, which then fails with a reset.
    keep_alive_s: int = _setting(75, "an idle connection between requests is closed after this",
                                 flag="--keep-alive", minimum=1, metavar="SECONDS")  # fmt: skip
    allowed_hosts: tuple[str, ...] = _setting(LOOPBACK_HOSTS, "Host header values answered (others get 400, "
                                              "against DNS rebinding); a proxy's public name, or * when the "
                                              "proxy checks Host", flag="--allowed-host", metavar="HOST")  # fmt: skip
    image_roots: tuple[str, ...] | None = _setting(None, "folders images may be read from (default: those the "
                                                   "index was built from)", flag="--image-root",
                                                   metavar="DIR")  # fmt: skip

    def __post_init__(self) -> None:
        for spec in fields(self):
            value, bounds = getattr(self, spec.name), spec.metadata
            if bounds.get("minimum") is not None and value < bounds["minimum"]:
                raise InvalidServeSetting(spec.name, value, f">= {bounds['minimum']}")
            if bounds.get("above") is not None and value <= bounds["above"]:
                raise InvalidServeSetting(spec.name, value, f"> {bounds['above']}")
        self.allowed_hosts = tuple(host.lower() for host in self.allowed_hosts)
        for host in self.allowed_hosts:
            if not _HOST_PATTERN.fullmatch(host):
                raise InvalidServeSetting("allowed_hosts", host, "a host name or address ([::1] for IPv6)")
