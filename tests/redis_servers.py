"""Real redis-server processes for the tests: a standalone server and a 3-master cluster.

Each server runs on a free loopback port with its own temporary directory, no persistence
and no config file. A missing `redis-server` binary fails loudly: the Redis tests are part
of the suite, never skipped (`make test` installs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

REDIS_SERVER = "redis-server"
REDIS_CLI = "redis-cli"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed: the Redis tests need it (apt-get install redis-server)")
    return path


def free_port(also_free: int | None = None) -> int:
    """A free loopback port; with `also_free`, port + also_free must be free too (cluster bus)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if also_free is None:
            return port
        if port + also_free >= 65536:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + also_free))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port found")


class RedisServer:
    """One redis-server on 127.0.0.1:<port>; stop() and start() again on the same port."""

    def __init__(self, port: int | None = None, *, cluster: bool = False, workdir: Path | None = None) -> None:
        self.cluster = cluster
        self.port = port or free_port(10000 if cluster else None)
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="herd-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            _binary(REDIS_SERVER),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.dir / f"redis-{self.port}.log"),
        ]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf",
                     "--cluster-node-timeout", "2000"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server on port {self.port} exited: {err}")
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer")
            time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def stop(self) -> None:
        """Kill the server (its data goes with it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a slow Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisCluster:
    """Three cluster-enabled redis-servers joined as a 3-master cluster (no replicas)."""

    def __init__(self, masters: int = 3) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="herd-redis-cluster-"))
        self.nodes: list[RedisServer] = []
        ports: set[int] = set()
        while len(ports) < masters:
            ports.add(free_port(10000))
        for port in sorted(ports):
            workdir = self.dir / str(port)
            workdir.mkdir()
            self.nodes.append(RedisServer(port, cluster=True, workdir=workdir))

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
            result = subprocess.run(
                [_binary(REDIS_CLI), "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, timeout=60,
            )
            if result.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {result.stdout.decode()} {result.stderr.decode()}")
            self._wait_ok()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            infos = [n.client().execute_command("CLUSTER INFO") for n in self.nodes]
            if all(i.get("cluster_state") == "ok" and int(i.get("cluster_known_nodes", 0)) == len(self.nodes)
                   for i in infos):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis cluster did not reach cluster_state:ok")

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=5)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def herd_keys(server: RedisServer | RedisCluster, prefix: str = "herd") -> dict[str, dict]:
    """Every key under `prefix` on every node: its type, TTL (ms) and every byte it holds."""
    nodes = server.nodes if isinstance(server, RedisCluster) else [server]
    out: dict[str, dict] = {}
    for node in nodes:
        r = node.client()
        for key in r.scan_iter(match=f"{prefix}:*", count=1000):
            kind = r.type(key).decode()
            if kind == "string":
                content = [r.get(key) or b""]
            elif kind == "stream":
                content = [k + v for _, fields in r.xrange(key) for k, v in fields.items()]
            elif kind == "zset":
                content = [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
            elif kind == "hash":
                content = [k + v for k, v in r.hgetall(key).items()]
            else:
                content = []
            out[key.decode()] = {"type": kind, "pttl": r.pttl(key), "content": b"".join(content), "port": node.port}
    return out


class HerdReplica:
    """One herd process (`python -m proxy serve`) on a free port, configured from `sections`."""

    def __init__(self, sections: dict, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.config = workdir / f"herd-{self.port}.toml"
        self.config.write_text(to_toml(sections))
        self.log = workdir / f"herd-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def launch(self) -> HerdReplica:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--config", str(self.config), "--port", str(self.port)],
                cwd=Path(__file__).resolve().parent.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout: float = 30) -> HerdReplica:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"herd exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"herd did not start:\n{self.log.read_text()[-3000:]}")

    def ready(self) -> dict:
        return httpx.get(self.url + "/readyz", timeout=5).json()

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=5).text

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as if the machine died."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_replicas(count: int, sections: dict, workdir: Path) -> list[HerdReplica]:
    """`count` herd processes with the same config, started side by side."""
    replicas = [HerdReplica(sections, workdir) for _ in range(count)]
    try:
        for r in replicas:
            r.launch()
        for r in replicas:
            r.wait_ready()
    except BaseException:
        for r in replicas:
            r.kill()
        raise
    return replicas


def to_toml(sections: dict) -> str:
    """Just enough TOML for herd's configs: tables, nested tables, arrays of tables, scalars, lists."""

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines: list[str] = []

    def table(name: str, body: dict, header: str) -> None:
        lines.append(header)
        nested = []
        for k, v in body.items():
            if isinstance(v, dict):
                nested.append((k, v))
            else:
                lines.append(f"{k} = {value(v)}")
        lines.append("")
        for k, v in nested:
            table(f"{name}.{k}", v, f"[{name}.{k}]")

    for name, body in sections.items():
        if isinstance(body, list):
            for item in body:
                table(name, item, f"[[{name}]]")
        else:
            table(name, body, f"[{name}]")
    return "\n".join(lines)
