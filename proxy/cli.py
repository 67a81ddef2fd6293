"""`herd`: serve the proxy, evaluate the semantic matcher, run the benchmarks."""

from __future__ import annotations

import argparse
import socket
import sys


def listen_socket(host: str, port: int, send_buffer_bytes: int = 0) -> socket.socket:
    """herd's listening socket. The connections accepted from it inherit its send buffer size
    (`[server] send_buffer_bytes`), which bounds what a client that does not read holds in
    the kernel (herd itself bounds what it holds: proxy.responses)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    sock.bind((host, port))
    return sock


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from proxy.app import create_app
    from proxy.config import ConfigError, load_settings
    from proxy.logs import setup_logging

    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        print(f"herd: {e}", file=sys.stderr)
        return 2
    if args.host:
        settings.server.host = args.host
    if args.port is not None:
        settings.server.port = args.port
    setup_logging(settings.server.log_level)
    config = uvicorn.Config(
        create_app(settings),
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
    server = settings.server
    sock = listen_socket(server.host, server.port, server.send_buffer_bytes)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="herd", description="LLM request-coalescing proxy")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the proxy")
    p_serve.add_argument("--config", help="TOML config (default: $HERD_CONFIG, else ./proxy.toml)")
    p_serve.add_argument("--host")
    p_serve.add_argument("--port", type=int)
    sub.add_parser("eval", help="evaluate the semantic matcher on labelled pairs", add_help=False)
    sub.add_parser("bench", help="run the load benchmarks", add_help=False)
    if argv and argv[0] == "eval":
        from proxy.semantic.evaluate import main as evaluate

        return evaluate(argv[1:])
    if argv and argv[0] == "bench":
        from benchmarks.__main__ import main as bench

        return bench(argv[1:])
    args = parser.parse_args(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
