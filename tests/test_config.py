from __future__ import annotations

import hashlib

import pytest

from proxy.auth import Authenticator
from proxy.config import ConfigError, load_settings, parse_settings
from proxy.errors import AuthenticationError

BASE = {"upstreams": {"openai": {"kind": "openai", "base_url": "https://api.example.com/v1"}}}


def test_issue_example_config_loads_exactly_as_shown(tmp_path):
    path = tmp_path / "proxy.toml"
    path.write_text(
        """
[server]
host = "127.0.0.1"
port = 8080

[upstreams.openai]
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key = "${OPENAI_API_KEY}"

[[routes]]
model = "*"
upstream = "openai"

[coalesce]
mode = "exact"
"""
    )
    s = load_settings(path, env={})
    assert s.server.port == 8080 and s.upstreams["openai"].api_key == ""
    assert s.route_for("gpt-4o").upstream == "openai" and s.coalesce.mode == "exact"
    # with the variable set, herd holds the key and must authenticate its clients
    with pytest.raises(ConfigError, match="authenticate"):
        load_settings(path, env={"OPENAI_API_KEY": "sk-provider"})


def test_env_expansion_with_default_and_herd_config_path(tmp_path):
    path = tmp_path / "custom.toml"
    path.write_text('[upstreams.x]\nbase_url = "${URL:-http://localhost:9/v1}"\n[server]\nport = "${PORT}"\n')
    s = load_settings(None, env={"HERD_CONFIG": str(path), "PORT": "9123"})
    assert s.upstreams["x"].base_url == "http://localhost:9/v1" and s.server.port == 9123


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"server": {"prot": 1}}, "unknown key"),
        ({"server": {"port": "eighty"}}, "server.port: expected an integer"),
        ({"coalesce": {"mode": "fuzzy"}}, "coalesce.mode"),
        ({"coalesce": {"upstream_stream": "sometimes"}}, "coalesce.upstream_stream"),
        ({"coalesce": {"embed_precision": "int4"}}, "coalesce.embed_precision"),
        ({"routes": [{"model": "*", "upstream": "missing"}]}, "not a configured upstream"),
        ({"upstreams": {"openai": {"kind": "bard", "base_url": "http://x"}}}, "kind"),
        ({"upstreams": {"openai": {"base_url": "ftp://x"}}}, "base_url"),
        ({"cache_typo": {}}, "unknown section"),
        ({"auth": {"mode": "keys"}}, "at least one"),
        ({"auth": {"mode": "keys", "keys": [{"sha256": "abc"}]}}, "64 hex"),
    ],
)
def test_invalid_config_is_refused_with_a_clear_message(patch, message):
    with pytest.raises(ConfigError, match=message):
        parse_settings({**BASE, **patch}, env={})


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(bad, env={})


def test_tenants_are_keyed_hashes_and_never_the_key():
    s = parse_settings({**BASE, "auth": {"hash_key": "secret-1"}}, env={})
    auth = Authenticator(s.auth, s)
    a = auth.identify({"authorization": "Bearer sk-live-abc"})
    b = auth.identify({"authorization": "Bearer sk-live-xyz"})
    assert a.tenant != b.tenant and "sk-live" not in a.tenant
    assert a.tenant == auth.identify({"authorization": "Bearer sk-live-abc"}).tenant
    # a different hash key gives different ids: the hash is keyed, not a plain digest
    other = Authenticator(parse_settings({**BASE, "auth": {"hash_key": "secret-2"}}, env={}).auth, s)
    assert other.identify({"authorization": "Bearer sk-live-abc"}).tenant != a.tenant
    assert hashlib.sha256(b"sk-live-abc").hexdigest()[:32] not in a.tenant


def test_tenant_header_narrows_the_tenant():
    s = parse_settings({**BASE, "auth": {"tenant_header": "X-Team"}}, env={})
    auth = Authenticator(s.auth, s)
    one = auth.identify({"authorization": "Bearer k", "x-team": "red"})
    two = auth.identify({"authorization": "Bearer k", "x-team": "blue"})
    assert one.tenant != two.tenant and one.tenant.startswith(auth.identify({"authorization": "Bearer k"}).tenant)


def test_client_keys_are_checked_when_herd_holds_the_provider_key():
    digest = hashlib.sha256(b"client-key-1").hexdigest()
    data = {
        "upstreams": {"openai": {"base_url": "https://api.example.com/v1", "api_key": "sk-provider"}},
        "auth": {"keys": [{"sha256": digest, "tenant": "team-a"}]},
    }
    s = parse_settings(data, env={})
    auth = Authenticator(s.auth, s)
    assert auth.identify({"authorization": "Bearer client-key-1"}).tenant == "t:team-a"
    with pytest.raises(AuthenticationError):
        auth.identify({"authorization": "Bearer wrong"})
    with pytest.raises(AuthenticationError):
        auth.identify({})


def test_readme_configuration_block_is_valid():
    """The reference block in README.md loads as written, so the docs cannot drift."""
    import re
    import tomllib
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [tomllib.loads(b) for b in re.findall(r"```toml\n(.*?)```", readme, re.S)]
    full = [b for b in blocks if "upstreams" in b]
    assert full, "README has no full configuration block"
    for block in full:
        settings = parse_settings(block, env={})
        assert settings.upstreams and settings.routes


def test_example_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {"HERD_HASH_KEY": "k", "OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": ""}
    for path in [root / "proxy.toml", *sorted((root / "config").glob("*.toml"))]:
        settings = load_settings(path, env=env)
        assert settings.upstreams, path


def test_settings_repr_holds_no_secret():
    s = parse_settings(
        {
            "upstreams": {"a": {"base_url": "http://x/v1", "api_key": "sk-SECRET-1"}},
            "auth": {"mode": "open", "hash_key": "HASH-SECRET-2"},
            "redis": {"url": "redis://:PW-SECRET-3@h:6379/0"},
        },
        env={},
    )
    assert "SECRET" not in repr(s)


def test_embed_precisions_are_the_embedders():
    from embeddings.embedder import PRECISIONS
    from proxy.config import EMBED_PRECISIONS

    assert EMBED_PRECISIONS == PRECISIONS


@pytest.mark.parametrize(
    "upstream, message",
    [
        ({"kind": "openai", "max_concurrency": 8}, r"upstreams\.u\.max_concurrency: only for kind = 'vllm'"),
        ({"kind": "openai", "default_max_tokens": 8}, r"upstreams\.u\.default_max_tokens: only for kind = 'anthropic'"),
        ({"kind": "anthropic", "queue_size": 8}, r"upstreams\.u\.queue_size: only for kind = 'vllm'"),
        ({"kind": "vllm", "retrys": 1}, r"upstreams\.u\.retrys: unknown key; did you mean 'retries'"),
    ],
)
def test_keys_of_another_upstream_kind_are_refused_with_their_path(upstream, message):
    """config.py promised this; before the per-kind models these keys were accepted and ignored."""
    with pytest.raises(ConfigError, match=message):
        parse_settings({"upstreams": {"u": {"base_url": "http://x/v1", **upstream}}}, env={})


def test_a_key_in_the_wrong_section_says_where_it_belongs():
    with pytest.raises(ConfigError, match=r"server\.ttl_seconds: .*belongs in \[cache\]"):
        parse_settings({**BASE, "server": {"ttl_seconds": 5}}, env={})
    with pytest.raises(ConfigError, match=r"coalesce\.retries: .*belongs in \[upstreams\.NAME\]"):
        parse_settings({**BASE, "coalesce": {"retries": 5}}, env={})


def test_errors_never_echo_secret_values():
    data = {"upstreams": {"u": {"base_url": "http://x/v1", "headers": {"authorization": ["sk-SECRET-1"]}}}}
    with pytest.raises(ConfigError) as info:
        parse_settings(data, env={})
    assert "upstreams.u.headers" in str(info.value) and "SECRET" not in str(info.value)


def test_every_default_is_kept():
    from proxy.config import AnthropicUpstreamConfig, Settings, VLLMUpstreamConfig

    s = Settings()
    assert (s.server.port, s.server.max_body_bytes, s.server.request_timeout_s) == (8080, 4 * 1024 * 1024, 600.0)
    assert (s.coalesce.mode, s.coalesce.threshold, s.coalesce.guards, s.coalesce.upstream_stream) == (
        "exact", 0.40, ["all"], "auto")
    assert (s.cache.ttl_seconds, s.cache.max_entries, s.cache.backend) == (300.0, 10_000, "auto")
    assert (s.redis.timeout_s, s.redis.lease_s, s.redis.key_prefix) == (0.25, 3.0, "herd")
    assert AnthropicUpstreamConfig().default_max_tokens == 4096
    v = VLLMUpstreamConfig()
    assert (v.max_concurrency, v.queue_size, v.kv_cache_high, v.retries, v.circuit_failures) == (64, 100, 0.9, 2, 5)
    assert Settings().server is not s.server  # no shared mutable defaults


def test_base_url_without_a_version_path_is_warned():
    from proxy.config import warnings

    def warned(kind, url):
        return warnings(parse_settings({"upstreams": {"u": {"kind": kind, "base_url": url}}}, env={}))

    assert any("upstreams.u.base_url" in w and "/v1" in w for w in warned("openai", "https://api.openai.com"))
    assert any("upstreams.u.base_url" in w for w in warned("vllm", "http://gpu:8000/"))
    assert warned("openai", "https://api.openai.com/v1") == []
    assert warned("openai", "https://generativelanguage.googleapis.com/v1beta/openai") == []
    assert warned("anthropic", "https://api.anthropic.com") == []
    assert warned("anthropic", "https://api.anthropic.com/v1") != []


HOLDING = {"upstreams": {"u": {"base_url": "http://x/v1", "api_key": "sk-provider"}}}


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "herd.internal"])
def test_open_auth_on_a_network_address_with_a_provider_key_is_refused(host):
    data = {**HOLDING, "auth": {"mode": "open"}, "server": {"host": host}}
    with pytest.raises(ConfigError, match="allow_open_relay"):
        parse_settings(data, env={})
    data["auth"]["allow_open_relay"] = True
    assert parse_settings(data, env={}).auth.mode == "open"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_open_auth_on_loopback_is_a_sidecar(host):
    s = parse_settings({**HOLDING, "auth": {"mode": "open"}, "server": {"host": host}}, env={})
    assert s.server.host == host


def test_open_auth_on_a_network_address_forwarding_client_keys_is_fine():
    s = parse_settings({**BASE, "auth": {"mode": "open"}, "server": {"host": "0.0.0.0"}}, env={})
    assert s.auth.mode == "open"


def test_the_dockerfile_example_is_not_an_open_relay():
    """proxy.toml is the image's config: HERD_HOST=0.0.0.0 is fine until herd holds the key."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "proxy.toml"
    assert load_settings(path, env={"HERD_HOST": "0.0.0.0"}).server.host == "0.0.0.0"
    with pytest.raises(ConfigError, match="allow_open_relay"):
        load_settings(path, env={"HERD_HOST": "0.0.0.0", "OPENAI_API_KEY": "sk-provider"})


def test_herd_check_prints_a_summary_and_fails_on_errors(tmp_path, capsys, monkeypatch):
    from proxy.cli import main

    good = tmp_path / "good.toml"
    good.write_text('[upstreams.sim]\nbase_url = "http://127.0.0.1:9"\n[coalesce]\nmode = "semantic"\n')
    assert main(["check", "--config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "config OK" in out and "coalesce semantic" in out and "upstream sim: openai at http://127.0.0.1:9" in out
    assert "warning: upstreams.sim.base_url" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('[upstreams.sim]\nbase_url = "http://127.0.0.1:9/v1"\nmax_concurrency = 4\n')
    assert main(["check", "--config", str(bad)]) == 2
    assert "upstreams.sim.max_concurrency" in capsys.readouterr().err


def test_serve_refuses_a_host_override_that_makes_an_open_relay(tmp_path, capsys, monkeypatch):
    from proxy.cli import main

    path = tmp_path / "p.toml"
    path.write_text('[auth]\nmode = "open"\n[upstreams.u]\nbase_url = "http://127.0.0.1:9/v1"\napi_key = "sk-p"\n')
    assert main(["serve", "--config", str(path), "--host", "0.0.0.0"]) == 2
    assert "allow_open_relay" in capsys.readouterr().err


def test_herd_version(capsys):
    from proxy import __version__
    from proxy.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"herd {__version__}"


def test_sampled_policies_are_the_sampling_modules():
    import typing

    from proxy.config import CoalesceConfig
    from proxy.sampling import POLICIES

    assert typing.get_args(CoalesceConfig.model_fields["sampled"].annotation) == POLICIES


@pytest.mark.parametrize("section, key", [("server", "port"), ("server", "request_timeout_s"),
                                          ("cache", "max_entries")])
def test_a_boolean_is_not_a_number(section, key):
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: expected a number"):
        parse_settings({**BASE, section: {key: True}}, env={})
