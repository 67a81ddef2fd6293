"""`[server] workers = N` (`herd serve --workers N`): N processes serve one port.

One Python process uses one core; a node's cores need a process each. The supervisor (this
module, the process `herd serve` starts) owns the port and the workers:

    supervisor  binds the port with a socket per worker (SO_REUSEPORT: the kernel spreads
                new connections evenly over them; one shared socket left a worker of 8 with
                6% of the busiest one's load), makes the
                node's private directory (mode 0700) and its flight claims table, starts
                N workers, forwards SIGTERM/SIGINT to them (each drains: proxy.app's
                lifespan), restarts a worker that dies, and gives up (exit status 1) when
                workers keep dying before they are ready
    worker i    the usual app (uvicorn) on the inherited socket, its Gateway told it is
                worker i of N: it shares flights with its siblings (proxy.node), or
                through [redis] url when that is set, the way replicas do

Each worker's memory cache is its own (a Redis cache is shared); /metrics on the port
answers the node's totals (proxy.node.merge_metrics).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from proxy.config import ServerConfig, Settings

log = logging.getLogger("herd.workers")

#: a worker that dies before it is ready, this many times in a row, stops the node
MAX_FAILED_STARTS = 3
RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
POLL_S = 0.2
ORPHAN_CHECK_S = 1.0


def _serve_worker(settings: Settings, sock: socket.socket, index: int, count: int, node_dir: str) -> None:
    """A worker process: the app on the supervisor's socket."""
    from proxy.cli import run_server
    from proxy.logs import setup_logging
    from proxy.node import Worker

    setup_logging(settings.server.log_level)
    threading.Thread(target=_orphan_watch, args=(os.getppid(),), name="herd-orphan-watch", daemon=True).start()
    run_server(settings, sock, Worker(node_dir, index, count))


def _orphan_watch(supervisor: int) -> None:
    """A worker whose supervisor is gone (killed with SIGKILL: it could not tell anyone)
    drains and exits, rather than holding the port with nobody to restart or stop it."""
    while os.getppid() == supervisor:
        time.sleep(ORPHAN_CHECK_S)
    log.warning("the supervisor is gone: this worker drains and exits")
    os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    def __init__(self, settings: Settings, count: int, sockets: list[socket.socket]) -> None:
        self.settings = settings
        self.count = count
        # worker i's socket stays open here: connections queued on it while worker i restarts
        # wait for the new one rather than being reset
        self.sockets = sockets
        self.node_dir = tempfile.mkdtemp(prefix="herd-node-")  # 0700: only this user reaches the workers' sockets
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[Any] = [None] * count
        self.started: list[float] = [0.0] * count
        self.failed_starts = 0
        self.stopping: int | None = None  # the signal that stops the node

    def _start(self, index: int) -> None:
        from proxy.node import socket_path

        Path(socket_path(self.node_dir, index)).unlink(missing_ok=True)  # ready once it is made again
        proc = self.ctx.Process(
            target=_serve_worker, args=(self.settings, self.sockets[index], index, self.count, self.node_dir),
            name=f"herd-worker-{index}", daemon=False,
        )
        proc.start()
        self.procs[index] = proc
        self.started[index] = time.monotonic()
        log.info("worker started", extra={"worker": index, "pid": proc.pid})

    def _ready(self, index: int) -> bool:
        from proxy.node import socket_path

        return os.path.exists(socket_path(self.node_dir, index))

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stopping is None:
            self.stopping = signum
            for proc in self.procs:
                if proc is not None and proc.is_alive():
                    os.kill(proc.pid, signal.SIGTERM)  # each drains its requests and flights

    def run(self) -> int:
        from proxy.node import create_table

        create_table(self.node_dir)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(self.count):
                self._start(index)
            return self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            shutil.rmtree(self.node_dir, ignore_errors=True)

    def _watch(self) -> int:
        ready = [False] * self.count
        while self.stopping is None:
            live = [p.sentinel for p in self.procs if p is not None and p.exitcode is None]
            multiprocessing.connection.wait(live, timeout=POLL_S)
            for index, proc in enumerate(self.procs):
                if not ready[index] and proc.exitcode is None and self._ready(index):
                    ready[index] = True
                    self.failed_starts = 0
                if proc.exitcode is None or self.stopping is not None:
                    continue
                if not ready[index]:
                    self.failed_starts += 1
                    log.error("worker exited before it was ready",
                              extra={"worker": index, "exitcode": proc.exitcode, "in_a_row": self.failed_starts})
                    if self.failed_starts >= MAX_FAILED_STARTS:
                        log.error("workers keep failing at start: stopping the node")
                        self._on_signal(signal.SIGTERM, None)
                        self._wait_all()
                        return 1
                else:
                    log.warning("worker died; restarting it", extra={"worker": index, "exitcode": proc.exitcode})
                backoff = RESTART_BACKOFF_S[min(self.failed_starts, len(RESTART_BACKOFF_S) - 1)]
                time.sleep(backoff)
                ready[index] = False
                if self.stopping is None:
                    self._start(index)
        return self._wait_all()

    def _wait_all(self) -> int:
        """Wait for the workers to drain (their grace period, and some), then end the stragglers."""
        deadline = time.monotonic() + max(self.settings.server.shutdown_grace_s, 0) + 10
        for proc in self.procs:
            if proc is not None:
                proc.join(max(0.0, deadline - time.monotonic()))
        stragglers = [p for p in self.procs if p is not None and p.exitcode is None]
        for proc in stragglers:
            log.warning("worker did not stop within the grace period; killing it", extra={"pid": proc.pid})
            proc.kill()
            proc.join(5)
        return 0


def worker_sockets(server: ServerConfig, count: int) -> list[socket.socket]:
    """A listening socket per worker, all on the configured port (SO_REUSEPORT).

    SO_REUSEPORT would also let a second node bind a port this one serves, and the kernel
    would then split connections (and flights) between the two without a word; so the port
    is first bound alone, as a single process binds it: taken means refused (OSError)."""
    from proxy.cli import listen_socket

    port = server.port
    if port:
        listen_socket(server.host, port).close()  # EADDRINUSE when anything listens there
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = listen_socket(server.host, port, server.send_buffer_bytes, reuse_port=True)
            port = sock.getsockname()[1]  # port 0: the rest join the one the kernel chose
            sock.listen(4096)
            sockets.append(sock)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def supervise(settings: Settings, count: int, sockets: list[socket.socket]) -> int:
    """Run `count` workers on `sockets` (worker_sockets) until SIGTERM/SIGINT; the exit status."""
    if not settings.auth.hash_key:
        # one secret for the node, so a client's tenant hash (and so its flight keys) is the
        # same in every worker; a random one per process would split every flight
        settings.auth.hash_key = secrets.token_hex(32)
    try:
        return Supervisor(settings, count, sockets).run()
    finally:
        for sock in sockets:
            sock.close()
