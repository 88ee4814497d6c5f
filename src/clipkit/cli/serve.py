"""Serve a search index over HTTP: a JSON API under /v1, a search page at /, /healthz, /metrics, /docs.

The model is the one the index records, or --model, which must be that same model (a different one is
refused). The server listens on 127.0.0.1 unless --host says otherwise; with --api-key-env VAR, every
/v1 route needs `Authorization: Bearer <the value of $VAR>`. It serves new generations of the index
(`clipkit index add`) without a restart, answers 503 with Retry-After when overloaded, and reports
readiness at /readyz.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--index", required=True, metavar="INDEX_DIR", help="an index from `clipkit index build`"
    )
    parser.add_argument("--model", help="default: the model the index records")
    parser.add_argument(
        "--pretrained",
        help="weights for an architecture or config MODEL: a .safetensors / .pt file, an open_clip tag (laion2b_s34b_b79k), hf-hub:ORG/NAME",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="default: 8000 (0: any free port)")
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="environment variable holding the API key that /v1 routes require",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast (default: fp32)"
    )
    parser.add_argument(
        "--max-batch", type=int, default=64, help="text queries encoded together at most (default: 64)"
    )
    parser.add_argument(
        "--batch-wait-ms", type=float, default=2.0, help="how long a query waits to join a batch (default: 2)"
    )
    parser.add_argument(
        "--max-queue", type=int, default=256,
        help="requests waiting per batcher; past this the server answers 503 at once (default: 256)",
    )  # fmt: skip
    parser.add_argument(
        "--request-timeout", type=float, default=30.0, metavar="SECONDS",
        help="a request not answered by then gets 503 (default: 30)",
    )  # fmt: skip
    parser.add_argument(
        "--reload-interval", type=float, default=2.0, metavar="SECONDS",
        help="how often index.json is checked for a new generation (default: 2; 0: only POST /v1/index/reload)",
    )  # fmt: skip
    parser.add_argument(
        "--thumbnail-cache-mb", type=float, default=64.0, help="memory for thumbnails (default: 64)"
    )
    parser.add_argument(
        "--max-upload-mb", type=float, default=10.0, help="largest image upload (default: 10)"
    )
    parser.add_argument(
        "--ef-search", type=int, help="hnsw index: candidates searched (more: better recall, slower)"
    )
    parser.add_argument(
        "--nprobe", type=int, help="ivf index: clusters searched (more: better recall, slower)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU feature probing is noise
    from clipkit.errors import ClipkitError

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key.strip():
            raise ClipkitError(
                f"--api-key-env {args.api_key_env}: that environment variable is unset or empty; export the key in it"
            )
    if args.max_batch < 1 or args.batch_wait_ms < 0 or args.max_upload_mb <= 0:
        raise ClipkitError("--max-batch must be >= 1, --batch-wait-ms >= 0 and --max-upload-mb > 0")
    if (
        args.max_queue < 1
        or args.request_timeout <= 0
        or args.reload_interval < 0
        or args.thumbnail_cache_mb < 0
    ):
        raise ClipkitError(
            "--max-queue must be >= 1, --request-timeout > 0, --reload-interval >= 0 and --thumbnail-cache-mb >= 0"
        )
    if not 0 <= args.port <= 65535:
        raise ClipkitError(f"--port {args.port} is not a TCP port (0-65535)")

    import torch
    import uvicorn

    from clipkit.retrieval import open_index
    from clipkit.serve import ServeConfig, create_app

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sock = listening_socket(args.host, args.port)  # first: a busy port fails before the model loads
    try:
        search_params = {
            k: v for k, v in (("ef_search", args.ef_search), ("nprobe", args.nprobe)) if v is not None
        }
        index, encoder = open_index(
            args.index, model=args.model, pretrained=args.pretrained, device=device, precision=args.precision,
            search_params=search_params,
        )  # fmt: skip
    except BaseException:
        sock.close()
        raise
    config = ServeConfig(
        api_key=api_key,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout,
        reload_interval_s=args.reload_interval,
        thumbnail_cache_bytes=int(args.thumbnail_cache_mb * 2**20),
        max_upload_bytes=int(args.max_upload_mb * 2**20),
    )
    app = create_app(index, encoder, config)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(
            f"clipkit serve: warning: listening on {args.host} without --api-key-env; anyone who can reach "
            "this address can search the index and read its images",
            flush=True,
        )
    server_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        server_header=False,
        timeout_graceful_shutdown=5,
        # Longer than the idle timeout of clients and load balancers (httpx 5 s, AWS ALB 60 s), as nginx's
        # 75 s is: a server that closes an idle connection first races a request sent on it, which then
        # fails with a reset, however healthy the server (uvicorn's default is 5 s).
        timeout_keep_alive=75,
    )
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(
        f"clipkit serve: {index.count} images from {args.index} at http://{url_host}:{port}/ "
        f"(API key {'required' if api_key else 'not required'}; Ctrl-C stops)",
        flush=True,
    )
    try:
        uvicorn.Server(server_config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then passed Ctrl-C on: the normal way to stop
        print("clipkit serve: stopped", flush=True)
    finally:
        app.state.served.close()  # the generation it serves now, and any it still had open
    return 0


def listening_socket(host: str, port: int):
    """A bound TCP socket for uvicorn, made here so the start message can name the real port (--port 0).

    It is created with protocol IPPROTO_TCP, as asyncio's own servers are: asyncio turns on TCP_NODELAY only
    for such sockets, and without it small responses wait ~40 ms for delayed ACKs.
    """
    import socket

    from clipkit.errors import ClipkitError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ClipkitError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host"
        ) from None
    return sock
