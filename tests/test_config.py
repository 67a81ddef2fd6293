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
