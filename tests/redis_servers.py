"""Real redis-server processes for the tests (a standalone server, a cluster of masters) and
herd replicas sharing them, from benchmarks/harness.py; `herd_keys` reads what herd stored.

Each server runs on a free loopback port with its own temporary directory, no persistence
and no config file. A missing `redis-server` binary fails loudly: the Redis tests are part
of the suite, never skipped (`make test` installs it).
"""

from __future__ import annotations

from benchmarks.harness import RedisCluster, RedisServer, start_replicas

__all__ = ["RedisCluster", "RedisServer", "herd_keys", "start_replicas"]


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
