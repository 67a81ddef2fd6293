"""Settings: one TOML file (tomllib), `${ENV}` expanded, validated at start with clear messages.

Each section is a dataclass; `_build` checks every key against the dataclass fields and
their types, so a typo is an error that names the key, never a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.sampling import POLICIES as SAMPLED_POLICIES


class ConfigError(ValueError):
    """The configuration is invalid; the message says where and why."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout_s: float = 600.0  # each waiter's deadline: a client that has not read its answer by then is cut
    # the kernel's send buffer of each client connection (SO_SNDBUF, which Linux doubles): what a
    # client that does not read can hold there; 0: the kernel's autotuning (net.ipv4.tcp_wmem, MBs)
    send_buffer_bytes: int = 128 * 1024
    body_timeout_s: float = 30.0  # the whole request body must arrive within this; else 408
    shutdown_grace_s: float = 30.0
    log_level: str = "info"
    access_log: bool = True  # one JSON line per chat request: ids, role, status, timing
    log_prompts: bool = False  # add the final user message to access log lines


@dataclass
class AuthConfig:
    # auto: forward-key upstreams need nothing; an upstream holding its own key needs
    # client keys (or mode = "open"). keys: always check client keys. open: accept anyone.
    mode: str = "auto"
    hash_key: str = field(default="", repr=False)  # secret for keyed tenant hashes; empty: random per process
    tenant_header: str = ""  # narrows the tenant further, e.g. "x-tenant-id"
    keys: list[dict] = field(default_factory=list)  # [{sha256 = "...", tenant = "...", sampled = "..."}]


@dataclass
class UpstreamConfig:
    name: str = ""
    kind: str = "openai"  # openai | anthropic | vllm
    base_url: str = ""  # openai, vllm: ends in /v1; anthropic: no /v1 (the SDK adds it)
    api_key: str = field(default="", repr=False)  # empty: forward the client's own key
    connect_timeout_s: float = 10.0
    first_byte_timeout_s: float = 120.0
    idle_timeout_s: float = 60.0
    total_timeout_s: float = 600.0
    max_connections: int = 1000
    headers: dict[str, str] = field(default_factory=dict)
    # resilience (proxy.resilience): every call of a flight goes through these
    retries: int = 2  # extra tries of a retryable failure (connect, 408/409/429/5xx), never mid-stream
    backoff_base_s: float = 0.5  # try k waits uniform(0, min(backoff_max_s, backoff_base_s * 2**k))
    backoff_max_s: float = 8.0  # also the longest Retry-After herd waits for; longer: fail over at once
    circuit_failures: int = 5  # failed calls in a row (concurrent ones count once) that open the circuit; 0: off
    circuit_reset_s: float = 1.0  # open this long, then one probe call (half-open); others wait for it
    circuit_reset_max_s: float = 30.0  # each failed probe doubles the time open, up to this
    requests_per_minute: float = 0.0  # token bucket shared by all flights; 0: unlimited
    tokens_per_minute: float = 0.0  # prompt + max_tokens reserved, settled with the usage; 0: unlimited
    rate_limit_burst_s: float = 10.0  # a bucket holds this many seconds' worth of its rate
    rate_limit_wait_s: float = 10.0  # longest wait for the bucket; longer: 429 with Retry-After
    # anthropic
    default_max_tokens: int = 4096  # Anthropic needs max_tokens; used when the client sends none
    # vllm: adaptive concurrency from the backend's own /metrics, with a bounded queue in herd
    metrics_url: str = ""  # empty: base_url without /v1, plus /metrics
    max_concurrency: int = 64
    min_concurrency: int = 1
    kv_cache_high: float = 0.9  # at or above this KV-cache usage the limit halves
    waiting_high: int = 1  # this many requests waiting inside vLLM also halves it
    queue_size: int = 100  # calls waiting in herd for a slot; more get 503 + Retry-After
    queue_timeout_s: float = 30.0  # longest wait in that queue; longer gets 503 + Retry-After
    poll_interval_s: float = 1.0  # how often /metrics is read


@dataclass
class RouteConfig:
    model: str = "*"  # glob on the requested model; first match wins
    upstream: str = ""
    model_rewrite: str = ""  # send this model name upstream instead of the client's
    fallbacks: list[str] = field(default_factory=list)  # upstreams tried in order when this one fails
    fallback_models: dict[str, str] = field(default_factory=dict)  # model name sent to each fallback
    sampled: str = ""  # share | distinct for this route's sampled requests; empty: [coalesce] sampled

    def matches(self, model: str) -> bool:
        return fnmatch.fnmatchcase(model, self.model)


@dataclass
class TokensConfig:
    """Pre-flight prompt token counting (proxy.tokens)."""

    check_context: bool = True  # refuse a prompt over its model's context window before any call
    context_windows: dict[str, int] = field(default_factory=dict)  # model glob -> tokens; added to the built-in table
    default_context_window: int = 0  # models in no table; 0: not checked
    encoding: str = "cl100k_base"  # counts models whose own encoding is not available locally (an estimate)


@dataclass
class CoalesceConfig:
    mode: str = "exact"  # off | exact | semantic
    threshold: float = 0.40  # the embedding's second witness to the verifier: benchmarks/SEMANTIC.md
    guards: list[str] = field(default_factory=lambda: ["all"])  # ignored: the verifier replaced the guards
    model_path: str = ""  # ONNX model; empty: the bundled all-MiniLM-L6-v2 int8
    # the languages that model reads; a language merges semantically only with verifier
    # tables too (English today), any other only when normalized-equal
    model_languages: list[str] = field(default_factory=lambda: ["en"])
    embed_precision: str = "int8"  # int8: matrix products in 8-bit integers (about 2x cheaper a text) | fp32
    embed_batch: int = 32
    embed_cache: int = 10_000
    # auto: a flight calls the upstream the way its first request asked (stream or not);
    # always: always streaming, so stream requests joining a non-stream flight get live chunks
    upstream_stream: str = "auto"
    # sampled requests (temperature > 0, no seed): share one draw, or each get their own
    # (proxy.sampling); deterministic requests are shared either way
    sampled: str = "share"


@dataclass
class CacheConfig:
    enabled: bool = True
    ttl_seconds: float = 300.0
    sampled_ttl_seconds: float = 10.0  # sampled answers (at most ttl_seconds); 0: never cache them
    max_bytes: int = 256 * 1024 * 1024  # memory cache: answers' bytes; least recently used go first
    max_entries: int = 10_000  # memory cache, a second bound (it also bounds the semantic cache index)
    backend: str = "auto"  # auto: redis when [redis] url is set, else memory | memory | redis


@dataclass
class RedisConfig:
    url: str = field(default="", repr=False)  # may hold a password; empty: one machine, in-memory state; redis://host:6379/0 to share
    cluster: bool = False  # Redis Cluster (keys of one flight share a hash slot)
    timeout_s: float = 0.25  # per operation; slower counts as Redis trouble
    lease_s: float = 3.0  # a flight leader's lease, renewed while it runs
    key_prefix: str = "herd"
    retry_after_s: float = 2.0  # after trouble, local-only until this much time has passed
    share_flights: bool = True  # coalesce across replicas (false: share only the result cache)


def _validate_redis(s: "Settings") -> None:
    """[redis] and the cache backend (proxy.shared, proxy.redis_cache)."""
    r, c = s.redis, s.cache
    if c.backend not in ("auto", "memory", "redis"):
        raise ConfigError(f"cache.backend must be auto, memory or redis, got {c.backend!r}")
    if c.backend == "redis" and not r.url:
        raise ConfigError('cache.backend = "redis" needs [redis] url')
    if c.ttl_seconds <= 0 or c.max_entries < 1 or c.max_bytes < 1:
        raise ConfigError("cache.ttl_seconds must be > 0, cache.max_entries >= 1 and cache.max_bytes >= 1")
    if c.sampled_ttl_seconds < 0:
        raise ConfigError("cache.sampled_ttl_seconds must be >= 0 (0: sampled answers are never cached)")
    if r.url and not r.url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("redis.url must start with redis://, rediss:// or unix://")
    if r.cluster and r.url.startswith("unix://"):
        raise ConfigError("redis.cluster needs a redis:// or rediss:// url")
    if r.url and not s.auth.hash_key:
        raise ConfigError("[redis] url needs [auth] hash_key, the same secret on every replica: "
                          "tenant hashes (and so flight keys) must match across replicas")
    for key in ("timeout_s", "lease_s", "retry_after_s"):
        if getattr(r, key) <= 0:
            raise ConfigError(f"redis.{key} must be > 0")
    if r.lease_s < 3 * r.timeout_s:
        raise ConfigError(f"redis.lease_s must be at least 3 x redis.timeout_s ({3 * r.timeout_s:g}s): "
                          "the lease is renewed every lease_s / 3")
    if not r.key_prefix or any(ch in r.key_prefix for ch in "{} "):
        raise ConfigError("redis.key_prefix must be non-empty, without braces or spaces")


@dataclass
class MetricsConfig:
    # USD per million tokens, by model glob: {"gpt-4o-mini*" = {input = 0.15, output = 0.60}}
    prices: dict[str, dict[str, float]] = field(default_factory=dict)
    tenant_labels: bool = False  # spend/savings per tenant (hashed ids), capped below
    max_tenant_labels: int = 50  # tenants past this count are labelled "other"


@dataclass
class Settings:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    routes: list[RouteConfig] = field(default_factory=list)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    coalesce: CoalesceConfig = field(default_factory=CoalesceConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: str = "<defaults>"

    def route_for(self, model: str) -> RouteConfig | None:
        for route in self.routes:
            if route.matches(model):
                return route
        return None


MODES = ("off", "exact", "semantic")
#: embeddings.embedder.PRECISIONS, spelt out: importing the embedder here would load numpy in
#: exact mode too (a test keeps the two equal).
EMBED_PRECISIONS = ("int8", "fp32")
#: Lookups by model name (route, context window, price) are memoized up to this many names:
#: the names come from clients, so the memo is bounded.
MODEL_MEMO = 1024
UPSTREAM_KINDS = ("openai", "anthropic", "vllm")
AUTH_MODES = ("auto", "keys", "open")

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str, env: typing.Mapping[str, str]) -> str:
    """`${NAME}` becomes the variable's value (empty if unset); `${NAME:-default}` has a fallback."""
    return _ENV.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def _expand(obj: Any, env: typing.Mapping[str, str]) -> Any:
    if isinstance(obj, str):
        return expand_env(obj, env)
    if isinstance(obj, list):
        return [_expand(v, env) for v in obj]
    if isinstance(obj, dict):
        return {k: _expand(v, env) for k, v in obj.items()}
    return obj


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected nothing, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # numbers from ${ENV} arrive as strings
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        args = typing.get_args(hint)
        if args:
            return {k: _check_type(v, args[1], f"{where}.{k}") for k, v in value.items()}
        return value
    if hint is Any:
        return value
    raise ConfigError(f"{where}: unsupported setting type {hint!r}")


def build_section(cls: type, table: Any, where: str) -> Any:
    """Make dataclass `cls` from a TOML table, rejecting unknown keys and wrong types."""
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(f"[{where}] has unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    values = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in table.items()}
    return cls(**values)


SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "auth": AuthConfig,
    "coalesce": CoalesceConfig,
    "cache": CacheConfig,
    "redis": RedisConfig,
    "metrics": MetricsConfig,
    "tokens": TokensConfig,
}


def parse_settings(data: dict, env: typing.Mapping[str, str] | None = None, source: str = "<dict>") -> Settings:
    data = _expand(data, os.environ if env is None else env)
    known = set(SECTIONS) | {"upstreams", "routes"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    settings = Settings(source=source)
    for name, cls in SECTIONS.items():
        if name in data:
            setattr(settings, name, build_section(cls, data[name], name))
    upstreams = data.get("upstreams", {})
    if not isinstance(upstreams, dict):
        raise ConfigError("[upstreams] must be a table of named upstreams, e.g. [upstreams.openai]")
    for name, table in upstreams.items():
        up = build_section(UpstreamConfig, {"name": name, **table}, f"upstreams.{name}")
        settings.upstreams[name] = up
    routes = data.get("routes", [])
    if not isinstance(routes, list):
        raise ConfigError("routes must be an array of tables: [[routes]]")
    settings.routes = [build_section(RouteConfig, r, f"routes[{i}]") for i, r in enumerate(routes)]
    validate(settings)
    return settings


def _validate_resilience(s: Settings) -> None:
    """Retries, circuit, rate limits and capacity per upstream; fallbacks per route; [tokens]."""

    def check(ok: bool, where: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{where} {rule}")

    for name, up in s.upstreams.items():
        at = f"upstreams.{name}."
        for key in ("retries", "circuit_failures", "queue_size"):
            check(getattr(up, key) >= 0, at + key, "must be >= 0")
        for key in ("backoff_base_s", "backoff_max_s", "requests_per_minute", "tokens_per_minute", "rate_limit_wait_s"):
            check(getattr(up, key) >= 0, at + key, "must be >= 0")
        for key in ("circuit_reset_s", "circuit_reset_max_s", "rate_limit_burst_s", "queue_timeout_s", "poll_interval_s"):
            check(getattr(up, key) > 0, at + key, "must be > 0")
        check(up.default_max_tokens >= 1, at + "default_max_tokens", "must be >= 1")
        check(1 <= up.min_concurrency <= up.max_concurrency, at + "min_concurrency",
              f"must be between 1 and max_concurrency ({up.max_concurrency})")
        check(0 < up.kv_cache_high <= 1, at + "kv_cache_high", "must be in (0, 1]")
        check(up.waiting_high >= 1, at + "waiting_high", "must be >= 1")
        check(not up.metrics_url or up.metrics_url.startswith(("http://", "https://")), at + "metrics_url",
              "must be an http(s) URL")
    for i, route in enumerate(s.routes):
        at = f"routes[{i}]."
        for fb in route.fallbacks:
            check(fb in s.upstreams, at + "fallbacks", f"names {fb!r}, which is not a configured upstream")
            check(fb != route.upstream, at + "fallbacks", f"names the route's own upstream {fb!r}")
        check(len(set(route.fallbacks)) == len(route.fallbacks), at + "fallbacks", "names an upstream twice")
        for fb in route.fallback_models:
            check(fb in route.fallbacks, at + "fallback_models", f"has {fb!r}, which is not in this route's fallbacks")
    for pattern, window in s.tokens.context_windows.items():
        check(window >= 0, f"tokens.context_windows.{pattern}", "must be >= 0")
    check(s.tokens.default_context_window >= 0, "tokens.default_context_window", "must be >= 0")


def _validate_sampled(s: Settings) -> None:
    """[coalesce] sampled, and its per-route and per-tenant settings (proxy.sampling)."""

    def check(value: object, where: str, empty_ok: bool = True) -> None:
        if not ((empty_ok and value == "") or value in SAMPLED_POLICIES):
            raise ConfigError(f"{where} must be share or distinct{' (or empty)' if empty_ok else ''}, got {value!r}")

    check(s.coalesce.sampled, "coalesce.sampled", empty_ok=False)
    for i, route in enumerate(s.routes):
        check(route.sampled, f"routes[{i}].sampled")
    by_tenant: dict[str, object] = {}
    for i, key in enumerate(s.auth.keys):
        check(key.get("sampled", ""), f"auth.keys[{i}].sampled")
        tenant = key.get("tenant")
        if tenant:
            first = by_tenant.setdefault(tenant, key.get("sampled", ""))
            if first != key.get("sampled", ""):
                raise ConfigError(f"auth.keys[{i}].sampled: the keys of tenant {tenant!r} share answers, "
                                  "so they must all set the same sampled policy")


def validate(s: Settings) -> None:
    if not s.upstreams:
        raise ConfigError("no upstreams configured: add at least one [upstreams.NAME] table")
    for name, up in s.upstreams.items():
        if up.kind not in UPSTREAM_KINDS:
            raise ConfigError(f"upstreams.{name}.kind must be one of {', '.join(UPSTREAM_KINDS)}, got {up.kind!r}")
        if not up.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"upstreams.{name}.base_url must be an http(s) URL, got {up.base_url!r}")
        up.base_url = up.base_url.rstrip("/")
        for key in ("connect_timeout_s", "first_byte_timeout_s", "idle_timeout_s", "total_timeout_s"):
            if getattr(up, key) <= 0:
                raise ConfigError(f"upstreams.{name}.{key} must be > 0")
    if not s.routes:
        first = next(iter(s.upstreams))
        s.routes = [RouteConfig(model="*", upstream=first)]
    for i, route in enumerate(s.routes):
        if route.upstream not in s.upstreams:
            raise ConfigError(
                f"routes[{i}].upstream {route.upstream!r} is not a configured upstream ({', '.join(s.upstreams)})"
            )
    if s.coalesce.mode not in MODES:
        raise ConfigError(f"coalesce.mode must be one of {', '.join(MODES)}, got {s.coalesce.mode!r}")
    if s.coalesce.embed_precision not in EMBED_PRECISIONS:
        raise ConfigError(
            f"coalesce.embed_precision must be one of {', '.join(EMBED_PRECISIONS)}, got {s.coalesce.embed_precision!r}"
        )
    if s.coalesce.upstream_stream not in ("auto", "always"):
        raise ConfigError(f"coalesce.upstream_stream must be auto or always, got {s.coalesce.upstream_stream!r}")
    _validate_sampled(s)
    if not 0.0 < s.coalesce.threshold <= 1.0:
        raise ConfigError(f"coalesce.threshold must be in (0, 1], got {s.coalesce.threshold}")
    if s.auth.mode not in AUTH_MODES:
        raise ConfigError(f"auth.mode must be one of {', '.join(AUTH_MODES)}, got {s.auth.mode!r}")
    for i, key in enumerate(s.auth.keys):
        digest = key.get("sha256", "")
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise ConfigError(f"auth.keys[{i}].sha256 must be the hex sha256 of a client key (64 hex digits)")
        if set(key) - {"sha256", "tenant", "sampled"}:
            raise ConfigError(f"auth.keys[{i}] takes only sha256, tenant and sampled")
    holding = [n for n, u in s.upstreams.items() if u.api_key]
    if holding and s.auth.mode == "auto" and not s.auth.keys:
        raise ConfigError(
            f"upstream(s) {', '.join(holding)} hold a provider key, so herd must authenticate its clients: "
            'add [[auth.keys]] entries (sha256 of each client key), or set [auth] mode = "open" '
            "for a sidecar that only listens on localhost"
        )
    if s.auth.mode == "keys" and not s.auth.keys:
        raise ConfigError('auth.mode = "keys" needs at least one [[auth.keys]] entry')
    if s.server.max_body_bytes <= 0 or s.server.request_timeout_s <= 0 or s.server.body_timeout_s <= 0:
        raise ConfigError("server.max_body_bytes, server.request_timeout_s and server.body_timeout_s must be > 0")
    if s.server.send_buffer_bytes < 0:
        raise ConfigError("server.send_buffer_bytes must be >= 0 (0: the kernel's own)")
    _validate_resilience(s)
    _validate_redis(s)


def load_settings(path: str | os.PathLike | None = None, env: typing.Mapping[str, str] | None = None) -> Settings:
    """Load from `path`, else $HERD_CONFIG, else ./proxy.toml."""
    env = os.environ if env is None else env
    path = Path(path or env.get("HERD_CONFIG") or "proxy.toml")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return parse_settings(data, env, source=str(path))
