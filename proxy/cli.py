"""`herd`: serve the proxy, check a config, show a demo, evaluate the matcher, run the benchmarks."""

from __future__ import annotations

import argparse
import socket
import sys

from proxy import __version__


def _load(path: str | None, host: str | None = None, port: int | None = None):  # -> Settings | None
    from proxy.config import ConfigError, check_open_relay, load_settings

    try:
        settings = load_settings(path)
        if host:
            settings.server.host = host
            check_open_relay(settings)  # the host decides whether open auth is a relay
        if port is not None:
            settings.server.port = port
    except ConfigError as e:
        print(f"herd: {e}", file=sys.stderr)
        return None
    return settings


def listen_socket(host: str, port: int, send_buffer_bytes: int = 0, reuse_port: bool = False) -> socket.socket:
    """herd's listening socket. The connections accepted from it inherit its send buffer size
    (`[server] send_buffer_bytes`), which bounds what a client that does not read holds in
    the kernel (herd itself bounds what it holds: proxy.responses). `reuse_port`: one of the
    sockets of a node's workers on the same port (proxy.workers)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if send_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    sock.bind((host, port))
    return sock


def run_server(settings, sock: socket.socket, worker=None) -> None:  # worker: proxy.node.Worker | None
    """The app on `sock` until SIGTERM/SIGINT (then it drains); one process, or one worker of a node."""
    import uvicorn

    from proxy.app import create_app
    from proxy.gateway import Gateway

    config = uvicorn.Config(
        create_app(settings, Gateway(settings, worker=worker)),
        host=settings.server.host,
        port=settings.server.port,
        loop="uvloop",
        http="httptools",
        access_log=False,  # herd writes its own (JSON, with flight ids)
        proxy_headers=False,
        server_header=False,  # a proxy need not name the server it runs on
        log_config=None,
        timeout_graceful_shutdown=settings.server.shutdown_grace_s,
        backlog=4096,
    )
    uvicorn.Server(config).run(sockets=[sock])


def serve(args: argparse.Namespace) -> int:
    import logging

    from proxy.config import warnings
    from proxy.logs import setup_logging

    settings = _load(args.config, args.host, args.port)
    if settings is None:
        return 2
    if args.workers is not None:
        if args.workers < 1:
            print("herd: --workers must be at least 1", file=sys.stderr)
            return 2
        settings.server.workers = args.workers
    setup_logging(settings.server.log_level)
    for warning in warnings(settings):
        logging.getLogger("herd.config").warning(warning)
    server = settings.server
    try:
        if server.workers > 1:
            from proxy.workers import supervise, worker_sockets

            return supervise(settings, server.workers, worker_sockets(server, server.workers))
        sock = listen_socket(server.host, server.port, server.send_buffer_bytes)
    except OSError as e:
        print(f"herd: cannot listen on {server.host}:{server.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    run_server(settings, sock)
    return 0


def check(args: argparse.Namespace) -> int:
    """Validate a config without starting anything; print what it sets up."""
    from proxy.config import warnings

    settings = _load(args.config)
    if settings is None:
        return 2
    s = settings
    workers = f", {s.server.workers} workers" if s.server.workers > 1 else ""
    print(f"config OK: listens on {s.server.host}:{s.server.port}{workers}, auth {s.auth.mode}"
          f"{f' ({len(s.auth.keys)} client keys)' if s.auth.keys else ''}, coalesce {s.coalesce.mode}")
    for name, up in s.upstreams.items():
        key = "holds a provider key" if up.api_key else "forwards each client's key"
        print(f"  upstream {name}: {up.kind} at {up.base_url}, {key}")
    for route in s.routes:
        extra = f" (fallbacks: {', '.join(route.fallbacks)})" if route.fallbacks else ""
        rewrite = f" as {route.model_rewrite}" if route.model_rewrite else ""
        print(f"  route {route.model} -> {route.upstream}{rewrite}{extra}")
    cache = "off" if not s.cache.enabled else f"{s.cache.backend}, ttl {s.cache.ttl_seconds:g}s"
    print(f"  cache: {cache}; redis: {'set' if s.redis.url else 'none (one machine)'}")
    for warning in warnings(s):
        print(f"warning: {warning}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="herd", description="LLM request-coalescing proxy")
    parser.add_argument("--version", action="version", version=f"herd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the proxy")
    p_serve.add_argument("--config", help="TOML config (default: $HERD_CONFIG, else ./proxy.toml)")
    p_serve.add_argument("--host")
    p_serve.add_argument("--port", type=int)
    p_serve.add_argument("--workers", type=int, help="processes serving the port (default: [server] workers, 1)")
    p_check = sub.add_parser("check", help="validate a config and print a summary (exit status 2 if invalid)")
    p_check.add_argument("--config", help="TOML config (default: $HERD_CONFIG, else ./proxy.toml)")
    sub.add_parser("eval", help="evaluate the semantic matcher on labelled pairs", add_help=False)
    sub.add_parser("bench", help="run the load benchmarks", add_help=False)
    sub.add_parser("demo", help="see herd work in 10 s, offline: the bundled simulator, a burst, what was saved",
                   add_help=False)
    if argv and argv[0] == "eval":
        from proxy.semantic.evaluate import main as evaluate

        return evaluate(argv[1:])
    if argv and argv[0] == "bench":
        from benchmarks.__main__ import main as bench

        return bench(argv[1:])
    if argv and argv[0] == "demo":
        from benchmarks.demo import main as demo

        return demo(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(args)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
