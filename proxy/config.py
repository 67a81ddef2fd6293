"""Settings: one TOML file (tomllib), `${ENV}` expanded, validated at start with clear messages.

Each section is a pydantic model that forbids unknown keys, and each upstream kind has its
own model, so a typo or a key in the wrong place is an error that names its path
(`upstreams.openai.max_concurrency: ...`), never a silently ignored setting.
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """The configuration is invalid; the message says where and why."""


class Section(BaseModel):
    """A table of the TOML file: unknown keys are errors; numbers and booleans may be strings (from ${ENV})."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads true as 1; a number that is written true or false is a mistake."""
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation in (int, float):
            raise ValueError(f"expected a number, got {value!r}")
        return value


Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Count = Annotated[int, Field(ge=0)]
AtLeastOne = Annotated[int, Field(ge=1)]


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: AtLeastOne = 4 * 1024 * 1024
    request_timeout_s: Positive = 600.0  # each waiter's deadline: a client that has not read its answer by then is cut
    # the kernel's send buffer of each client connection (SO_SNDBUF, which Linux doubles): what a
    # client that does not read can hold there; 0: the kernel's autotuning (net.ipv4.tcp_wmem, MBs)
    send_buffer_bytes: Count = 128 * 1024
    body_timeout_s: Positive = 30.0  # the whole request body must arrive within this; else 408
    shutdown_grace_s: float = 30.0
    # processes serving the port (proxy.workers); they share flights through [redis] url when
    # set, else through the node's own claims table (proxy.node). 1: one process, no supervisor
    workers: AtLeastOne = 1
    # workers > 1 without Redis (or while it is down): share flights and cached answers through
    # the node (false: each worker coalesces and caches alone, as N herds behind one port)
    workers_share: bool = True
    log_level: str = "info"
    access_log: bool = True  # one JSON line per chat request: ids, role, status, timing
    log_prompts: bool = False  # add the final user message to access log lines


class ClientKey(Section):
    sha256: str  # hex sha256 of a client key: printf %s "$KEY" | sha256sum
    tenant: str = ""  # keys with the same tenant share answers; empty: the key's own keyed hash
    sampled: Literal["", "share", "distinct"] = ""  # this tenant's sampled policy; empty: not set

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("must be the hex sha256 of a client key (64 hex digits)")
        return v


class AuthConfig(Section):
    # auto: forward-key upstreams need nothing; an upstream holding its own key needs
    # client keys (or mode = "open"). keys: always check client keys. open: accept anyone.
    mode: Literal["auto", "keys", "open"] = "auto"
    hash_key: str = Field(default="", repr=False)  # secret for keyed tenant hashes; empty: random per process
    tenant_header: str = ""  # narrows the tenant further, e.g. "x-tenant-id"
    keys: list[ClientKey] = []
    # mode = "open" on a non-loopback host while herd holds a provider key lets anyone who
    # can reach herd spend that key; refused unless this says it is meant
    allow_open_relay: bool = False

    @model_validator(mode="after")
    def _keys_mode(self) -> AuthConfig:
        if self.mode == "keys" and not self.keys:
            raise ValueError('mode = "keys" needs at least one [[auth.keys]] entry')
        by_tenant: dict[str, str] = {}
        for i, key in enumerate(self.keys):
            if key.tenant and by_tenant.setdefault(key.tenant, key.sampled) != key.sampled:
                raise ValueError(f"keys[{i}].sampled: the keys of tenant {key.tenant!r} share answers, "
                                 "so they must all set the same sampled policy")
        return self


class UpstreamConfig(Section):
    """What every upstream kind takes; the kinds below add their own keys."""

    name: str = ""
    kind: str = "openai"
    base_url: str = ""  # openai, vllm: ends in /v1; anthropic: no /v1 (the SDK adds it)
    api_key: str = Field(default="", repr=False)  # empty: forward the client's own key
    connect_timeout_s: Positive = 10.0
    first_byte_timeout_s: Positive = 120.0
    idle_timeout_s: Positive = 60.0
    total_timeout_s: Positive = 600.0
    max_connections: int = 1000
    headers: dict[str, str] = Field(default={}, repr=False)
    # resilience (proxy.resilience): every call of a flight goes through these
    retries: Count = 2  # extra tries of a retryable failure (connect, 408/409/429/5xx), never mid-stream
    backoff_base_s: NonNegative = 0.5  # try k waits uniform(0, min(backoff_max_s, backoff_base_s * 2**k))
    backoff_max_s: NonNegative = 8.0  # also the longest Retry-After herd waits for; longer: fail over at once
    # failed calls in a row (concurrent ones count once) that open the circuit; 0: off
    circuit_failures: Count = 5
    circuit_reset_s: Positive = 1.0  # open this long, then one probe call (half-open); others wait for it
    circuit_reset_max_s: Positive = 30.0  # each failed probe doubles the time open, up to this
    requests_per_minute: NonNegative = 0.0  # token bucket shared by all flights; 0: unlimited
    tokens_per_minute: NonNegative = 0.0  # prompt + max_tokens reserved, settled with the usage; 0: unlimited
    rate_limit_burst_s: Positive = 10.0  # a bucket holds this many seconds' worth of its rate
    rate_limit_wait_s: NonNegative = 10.0  # longest wait for the bucket; longer: 429 with Retry-After

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, got {v!r}")
        return v.rstrip("/")


class OpenAIUpstreamConfig(UpstreamConfig):
    """OpenAI and any OpenAI-compatible server."""

    kind: Literal["openai"] = "openai"


class AnthropicUpstreamConfig(UpstreamConfig):
    kind: Literal["anthropic"] = "anthropic"
    default_max_tokens: AtLeastOne = 4096  # Anthropic needs max_tokens; used when the client sends none


class VLLMUpstreamConfig(UpstreamConfig):
    """Adaptive concurrency from the backend's own /metrics, with a bounded queue in herd."""

    kind: Literal["vllm"] = "vllm"
    metrics_url: str = ""  # empty: base_url without /v1, plus /metrics
    max_concurrency: int = 64
    min_concurrency: AtLeastOne = 1
    kv_cache_high: Fraction = 0.9  # at or above this KV-cache usage the limit halves
    waiting_high: AtLeastOne = 1  # this many requests waiting inside vLLM also halves it
    queue_size: Count = 100  # calls waiting in herd for a slot; more get 503 + Retry-After
    queue_timeout_s: Positive = 30.0  # longest wait in that queue; longer gets 503 + Retry-After
    poll_interval_s: Positive = 1.0  # how often /metrics is read

    @field_validator("metrics_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if v and not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, got {v!r}")
        return v

    @model_validator(mode="after")
    def _limits(self) -> VLLMUpstreamConfig:
        if self.min_concurrency > self.max_concurrency:
            raise ValueError(f"min_concurrency must be between 1 and max_concurrency ({self.max_concurrency})")
        return self


UPSTREAM_MODELS: dict[str, type[UpstreamConfig]] = {
    "openai": OpenAIUpstreamConfig,
    "anthropic": AnthropicUpstreamConfig,
    "vllm": VLLMUpstreamConfig,
}
UPSTREAM_KINDS = tuple(UPSTREAM_MODELS)


def _kind_of(table: Any) -> str:
    return table.get("kind", "openai") if isinstance(table, dict) else getattr(table, "kind", "openai")


AnyUpstream = Annotated[
    Annotated[OpenAIUpstreamConfig, Tag("openai")]
    | Annotated[AnthropicUpstreamConfig, Tag("anthropic")]
    | Annotated[VLLMUpstreamConfig, Tag("vllm")],
    Discriminator(_kind_of),
]


class RouteConfig(Section):
    model: str = "*"  # glob on the requested model; first match wins
    upstream: str = ""
    model_rewrite: str = ""  # send this model name upstream instead of the client's
    fallbacks: list[str] = []  # upstreams tried in order when this one fails
    fallback_models: dict[str, str] = {}  # model name sent to each fallback
    sampled: Literal["", "share", "distinct"] = ""  # for this route's sampled requests; empty: [coalesce] sampled

    @model_validator(mode="after")
    def _fallbacks(self) -> RouteConfig:
        if len(set(self.fallbacks)) != len(self.fallbacks):
            raise ValueError("fallbacks names an upstream twice")
        for fb in self.fallback_models:
            if fb not in self.fallbacks:
                raise ValueError(f"fallback_models has {fb!r}, which is not in this route's fallbacks")
        return self

    def matches(self, model: str) -> bool:
        return fnmatch.fnmatchcase(model, self.model)


class TokensConfig(Section):
    """Pre-flight prompt token counting (proxy.tokens)."""

    check_context: bool = True  # refuse a prompt over its model's context window before any call
    context_windows: dict[str, Count] = {}  # model glob -> tokens; added to the built-in table
    default_context_window: Count = 0  # models in no table; 0: not checked
    encoding: str = "cl100k_base"  # counts models whose own encoding is not available locally (an estimate)


MODES = ("off", "exact", "semantic")
#: embeddings.embedder.PRECISIONS, spelt out: importing the embedder here would load numpy in
#: exact mode too (a test keeps the two equal).
EMBED_PRECISIONS = ("int8", "fp32")
AUTH_MODES = ("auto", "keys", "open")


class CoalesceConfig(Section):
    mode: Literal["off", "exact", "semantic"] = "exact"
    threshold: Fraction = 0.40  # the embedding's second witness to the verifier: benchmarks/SEMANTIC.md
    guards: list[str] = ["all"]  # ignored: the verifier replaced the guards
    model_path: str = ""  # ONNX model; empty: the bundled all-MiniLM-L6-v2 int8
    # the languages that model reads; a language merges semantically only with verifier
    # tables too (English today), any other only when normalized-equal
    model_languages: list[str] = ["en"]
    # int8: matrix products in 8-bit integers (about 2x cheaper a text) | fp32
    embed_precision: Literal["int8", "fp32"] = "int8"
    embed_batch: int = 32
    embed_cache: int = 10_000
    # auto: a flight calls the upstream the way its first request asked (stream or not);
    # always: always streaming, so stream requests joining a non-stream flight get live chunks
    upstream_stream: Literal["auto", "always"] = "auto"
    # sampled requests (temperature > 0, no seed): share one draw, or each get their own
    # (proxy.sampling); deterministic requests are shared either way
    sampled: Literal["share", "distinct"] = "share"


class CacheConfig(Section):
    enabled: bool = True
    ttl_seconds: Positive = 300.0
    sampled_ttl_seconds: NonNegative = 10.0  # sampled answers (at most ttl_seconds); 0: never cache them
    max_bytes: AtLeastOne = 256 * 1024 * 1024  # memory cache: answers' bytes; least recently used go first
    max_entries: AtLeastOne = 10_000  # memory cache, a second bound (it also bounds the semantic cache index)
    backend: Literal["auto", "memory", "redis"] = "auto"  # auto: redis when [redis] url is set, else memory


class RedisConfig(Section):
    url: str = Field(default="", repr=False)  # may hold a password; empty: one machine, in-memory state
    cluster: bool = False  # Redis Cluster (keys of one flight share a hash slot)
    timeout_s: Positive = 0.25  # per operation; slower counts as Redis trouble
    lease_s: Positive = 3.0  # a flight leader's lease, renewed while it runs
    key_prefix: str = "herd"
    retry_after_s: Positive = 2.0  # after trouble, local-only until this much time has passed
    share_flights: bool = True  # coalesce across replicas (false: share only the result cache)
    pool_size: int = Field(256, ge=1)  # connections for blocking reads (Redis Cluster followers)

    @model_validator(mode="after")
    def _check(self) -> RedisConfig:
        if self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("url must start with redis://, rediss:// or unix://")
        if self.cluster and self.url.startswith("unix://"):
            raise ValueError("cluster needs a redis:// or rediss:// url")
        if self.lease_s < 3 * self.timeout_s:
            raise ValueError(f"lease_s must be at least 3 x timeout_s ({3 * self.timeout_s:g}s): "
                             "the lease is renewed every lease_s / 3")
        if not self.key_prefix or any(ch in self.key_prefix for ch in "{} "):
            raise ValueError("key_prefix must be non-empty, without braces or spaces")
        return self


class MetricsConfig(Section):
    # USD per million tokens, by model glob: {"gpt-4o-mini*" = {input = 0.15, output = 0.60}}
    prices: dict[str, dict[str, float]] = {}
    tenant_labels: bool = False  # spend/savings per tenant (hashed ids), capped below
    max_tenant_labels: int = 50  # tenants past this count are labelled "other"


class Settings(Section):
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    upstreams: dict[str, AnyUpstream] = {}
    routes: list[RouteConfig] = []
    tokens: TokensConfig = TokensConfig()
    coalesce: CoalesceConfig = CoalesceConfig()
    cache: CacheConfig = CacheConfig()
    redis: RedisConfig = RedisConfig()
    metrics: MetricsConfig = MetricsConfig()

    def route_for(self, model: str) -> RouteConfig | None:
        for route in self.routes:
            if route.matches(model):
                return route
        return None


#: Lookups by model name (route, context window, price) are memoized up to this many names:
#: the names come from clients, so the memo is bounded.
MODEL_MEMO = 1024

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


# ---- error messages -------------------------------------------------------------------

#: Keys whose values are never echoed in an error message.
_SECRET_KEYS = {"api_key", "hash_key", "url", "headers"}
_SECTIONS: dict[str, type[BaseModel]] = {
    "server": ServerConfig, "auth": AuthConfig, "routes": RouteConfig, "tokens": TokensConfig,
    "coalesce": CoalesceConfig, "cache": CacheConfig, "redis": RedisConfig, "metrics": MetricsConfig,
}
_TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
          "dict": "a table", "model": "a table", "list": "a list"}


def _where(loc: tuple[int | str, ...]) -> str:
    parts = list(loc)
    if len(parts) > 2 and parts[0] == "upstreams" and parts[2] in UPSTREAM_MODELS:
        del parts[2]  # the kind's tag, which pydantic inserts
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _unknown_key(parent: tuple[int | str, ...], key: str, data: dict) -> str:
    """Why `key` is not allowed in the table at `parent`, and where it belongs if anywhere."""
    homes = [f"[{name}]" for name, m in _SECTIONS.items() if key in m.model_fields and name != (parent or ("",))[0]]
    if parent[:1] != ("upstreams",) and any(key in m.model_fields for m in UPSTREAM_MODELS.values()):
        homes.append("[upstreams.NAME]")
    if not parent:
        where = f"; it is a key of {' or '.join(homes)}" if homes else ""
        return f"unknown section{where}; known: {', '.join(Settings.model_fields)}"
    if parent[0] == "upstreams":
        table = data.get("upstreams", {}).get(parent[1], {})
        kind = table.get("kind", "openai") if isinstance(table, dict) else "openai"
        owners = [k for k, m in UPSTREAM_MODELS.items() if key in m.model_fields]
        if owners:
            return f"only for kind = {' or '.join(map(repr, owners))} upstreams (this one has kind = {kind!r})"
        known = list(UPSTREAM_MODELS.get(kind, UpstreamConfig).model_fields)
    else:
        if homes:
            return f"unknown key here; it belongs in {' or '.join(homes)}"
        model = ClientKey if parent[:2] == ("auth", "keys") else _SECTIONS.get(str(parent[0]))
        known = list(model.model_fields) if model else []
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    return f"unknown key; {hint}"


def _message(err: Any, data: dict) -> str:
    loc, kind, ctx = err["loc"], err["type"], err.get("ctx") or {}
    secret = any(p in _SECRET_KEYS for p in loc)
    got = "" if secret else f", got {err['input']!r}"
    if kind == "extra_forbidden":
        return _unknown_key(loc[:-1], str(loc[-1]), data)
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "union_tag_invalid":
        return f"kind must be one of {', '.join(UPSTREAM_KINDS)}, got {ctx.get('tag')!r}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}{got}"
    for rule, op in (("greater_than", ">"), ("greater_than_equal", ">="), ("less_than_equal", "<=")):
        if kind == rule:
            bound = next(iter(ctx.values()))
            return f"must be {op} {bound}{got}"
    base = kind.split("_")[0]
    if base in _TYPES and kind.endswith(("_type", "_parsing", "_from_float")):
        return f"expected {_TYPES[base]}{got}"
    if kind == "missing":
        return "is required"
    return str(err["msg"])


def _explain(e: ValidationError, data: dict, source: str) -> ConfigError:
    lines = []
    for err in e.errors():
        where = _where(err["loc"])
        message = _message(err, data)
        lines.append(f"{where}: {message}" if where else message)
    if len(lines) == 1:
        return ConfigError(lines[0])
    return ConfigError(f"{source}: {len(lines)} problems:\n  " + "\n  ".join(lines))


# ---- rules across sections -------------------------------------------------------------

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """True for a host only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_open_relay(s: Settings) -> None:
    """Refuse `auth.mode = "open"` on a reachable address while herd holds a provider key."""
    holding = [n for n, u in s.upstreams.items() if u.api_key]
    if s.auth.mode == "open" and holding and not is_loopback(s.server.host) and not s.auth.allow_open_relay:
        raise ConfigError(
            f'auth.mode = "open" with server.host = {s.server.host!r} would let anyone who reaches herd spend '
            f"the provider key of upstream(s) {', '.join(holding)}: list client keys in [[auth.keys]], listen on "
            "127.0.0.1, or set [auth] allow_open_relay = true if that is what you mean"
        )


def _check(s: Settings) -> None:
    if not s.upstreams:
        raise ConfigError("no upstreams configured: add at least one [upstreams.NAME] table")
    for name, up in s.upstreams.items():
        up.name = name
    if not s.routes:
        s.routes = [RouteConfig(model="*", upstream=next(iter(s.upstreams)))]
    for i, route in enumerate(s.routes):
        if route.upstream not in s.upstreams:
            raise ConfigError(
                f"routes[{i}].upstream {route.upstream!r} is not a configured upstream ({', '.join(s.upstreams)})"
            )
        for fb in route.fallbacks:
            if fb not in s.upstreams:
                raise ConfigError(f"routes[{i}].fallbacks names {fb!r}, which is not a configured upstream")
            if fb == route.upstream:
                raise ConfigError(f"routes[{i}].fallbacks names the route's own upstream {fb!r}")
    holding = [n for n, u in s.upstreams.items() if u.api_key]
    if holding and s.auth.mode == "auto" and not s.auth.keys:
        raise ConfigError(
            f"upstream(s) {', '.join(holding)} hold a provider key, so herd must authenticate its clients: "
            'add [[auth.keys]] entries (sha256 of each client key), or set [auth] mode = "open" '
            "for a sidecar that only listens on localhost"
        )
    check_open_relay(s)
    if s.cache.backend == "redis" and not s.redis.url:
        raise ConfigError('cache.backend = "redis" needs [redis] url')
    if s.redis.url and not s.auth.hash_key:
        raise ConfigError("[redis] url needs [auth] hash_key, the same secret on every replica: "
                          "tenant hashes (and so flight keys) must match across replicas")


def warnings(s: Settings) -> list[str]:
    """Settings that load but are probably not what was meant (printed by `herd check` and at start)."""
    out = []
    cores = os.cpu_count() or 1
    if s.server.workers > cores:
        out.append(f"server.workers = {s.server.workers} is more than this machine's {cores} cores: "
                   "the workers time-share them, and each costs more CPU per request")
    for name, up in s.upstreams.items():
        path = urlsplit(up.base_url).path
        versioned = any(re.fullmatch(r"v\d+\w*", part) for part in path.split("/"))
        if up.kind in ("openai", "vllm") and not versioned:
            out.append(f"upstreams.{name}.base_url {up.base_url!r} has no version path: herd calls "
                       f"{up.base_url}/chat/completions; OpenAI and vLLM serve /v1/chat/completions "
                       "(add /v1 unless this server really serves it there)")
        if up.kind == "anthropic" and path.rstrip("/").endswith("/v1"):
            out.append(f"upstreams.{name}.base_url ends in /v1, which the Anthropic SDK adds itself")
    return out


def parse_settings(data: dict, env: typing.Mapping[str, str] | None = None, source: str = "<dict>") -> Settings:
    data = _expand(data, os.environ if env is None else env)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        raise _explain(e, data, source) from None
    _check(settings)
    return settings


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
