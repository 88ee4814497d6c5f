"""Serve a search index over HTTP: a JSON API under /v1, a search page at /, /healthz, /metrics, /docs.

The model is the one the index records, or --model, which must be that same model (a different one is
refused). The server listens on 127.0.0.1 unless --host says otherwise; with --api-key-env VAR, every
route but the page, /healthz, /readyz, /metrics and the docs needs `Authorization: Bearer <the value of
$VAR>`. It serves new generations of the index (`clipkit index add`) without a restart, answers 503 with
Retry-After when overloaded, and reports readiness at /readyz.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from clipkit.serve.config import LOOPBACK_HOSTS, InvalidServeSetting, ServeConfig


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
        help="environment variable holding the API key that every route but the page, probes, metrics and docs requires",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast (default: fp32)"
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--ef-search", type=int, help="hnsw index: candidates searched (more: better recall, slower)"
    )
    parser.add_argument(
        "--nprobe", type=int, help="ivf index: clusters searched (more: better recall, slower)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ServeConfig field that names one; its help, default and unit are the field's."""
    group = parser.add_argument_group("limits and access")
    hints = typing.get_type_hints(ServeConfig)
    for spec in dataclasses.fields(ServeConfig):
        meta = spec.metadata
        if "flag" not in meta:
            continue
        if _is_list(hints[spec.name]):  # the flag repeats
            default = f"; default: {', '.join(spec.default)}" if spec.default else ""
            group.add_argument(meta["flag"], dest=spec.name, action="append", metavar=meta["metavar"],
                               help=f"{meta['help']} (repeat for several{default})")  # fmt: skip
            continue
        if meta["unit"] == 1:
            number, metavar, default = hints[spec.name], meta["metavar"] or "N", spec.default
        else:  # a size in MB, possibly fractional
            number, metavar, default = float, "MB", f"{spec.default / meta['unit']:g}"
        group.add_argument(meta["flag"], dest=spec.name, type=number, metavar=metavar,
                           help=f"{meta['help']} (default: {default})")  # fmt: skip


def config_from_args(args: argparse.Namespace, **values) -> ServeConfig:
    """The ServeConfig the flags give (a flag not given keeps its field's default), plus `values`; a value
    out of its field's bounds is a one-line error naming the flag."""
    from clipkit.errors import ClipkitError

    given = dict(values)
    for spec in dataclasses.fields(ServeConfig):
        value = getattr(args, spec.name, None)
        if "flag" in spec.metadata and value is not None and spec.name not in given:
            given[spec.name] = _in_field_unit(value, spec.metadata["unit"])
    try:
        return ServeConfig(**given)
    except InvalidServeSetting as e:
        meta = next(spec.metadata for spec in dataclasses.fields(ServeConfig) if spec.name == e.name)
        comparison, bound = e.rule.split(" ", 1)
        if meta["unit"] != 1:  # the bound in the flag's unit
            bound = f"{float(bound) / meta['unit']:g}"
        shown = getattr(args, e.name, None)
        raise ClipkitError(
            f"{meta['flag']} {e.value if shown is None or isinstance(shown, list) else shown}: must be "
            f"{comparison} {bound}"
        ) from None


def _in_field_unit(value, unit: float):
    if isinstance(value, list):
        return tuple(value)
    return value if unit == 1 else int(value * unit)  # MB -> bytes


def _is_list(hint) -> bool:
    return typing.get_origin(hint) is tuple or any(
        typing.get_origin(arg) is tuple for arg in typing.get_args(hint)
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
    if not 0 <= args.port <= 65535:
        raise ClipkitError(f"--port {args.port} is not a TCP port (0-65535)")

    # Hosts clients may name (Host header): this machine's names, the address it listens on, and --allowed-host.
    listening = f"[{args.host}]" if ":" in args.host else args.host
    wildcard = listening in ("0.0.0.0", "[::]")  # every address: the names clients use go in --allowed-host
    hosts = (*LOOPBACK_HOSTS, *(() if wildcard else (listening,)), *(args.allowed_hosts or ()))
    config = config_from_args(
        args, api_key=api_key, allowed_hosts=tuple(dict.fromkeys(h.lower() for h in hosts))
    )

    import torch
    import uvicorn

    from clipkit.retrieval import open_index
    from clipkit.serve import create_app
    from clipkit.serve.server import MAX_HEADER_BYTES, bounded_protocol

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
        timeout_keep_alive=config.keep_alive_s,
        http=bounded_protocol(
            header_timeout_s=config.header_timeout_s, max_connections=config.max_connections
        ),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
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
