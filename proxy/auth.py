"""Who is asking: client authentication and tenant ids.

A tenant id is never a secret: it is an HMAC of the client's API key under herd's own
hash key, so two different keys never share answers and the key itself is never written
anywhere (logs, metrics, Redis). A bounded memo of recent hashes (one HMAC per distinct key,
not one per request) holds keys in this process's memory only, where each request's is anyway.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.config import AuthConfig, Settings
from proxy.errors import AuthenticationError

log = logging.getLogger("herd.auth")

# OpenAI's request headers that choose what a call is billed to and whose settings apply:
# sent upstream with the call, and part of the tenant, so a different organization or
# project never shares a flight or a cached answer. (header, its mark in the tenant id)
ACCOUNT_HEADERS = (("openai-organization", "o"), ("openai-project", "p"))


#: How many recent values (client keys, tenant and account header values) keep their hash.
HASH_MEMO = 4096


@dataclass(frozen=True)
class Identity:
    tenant: str  # a hash or a configured tenant name, safe to log and to use in keys
    client_key: str | None  # the client's own key, only kept to forward it upstream
    sampled: str = ""  # its [[auth.keys]] entry's sampled policy; empty: not set
    headers: dict[str, str] = field(default_factory=dict)  # ACCOUNT_HEADERS the client sent


def client_key_from(headers: Mapping[str, str]) -> str | None:
    """The client's key: `Authorization: Bearer KEY` (the scheme in any case), else `api-key`
    or `x-api-key`. An Authorization header in any other form is refused, never ignored: a
    key sent as Basic credentials or bare would otherwise become the anonymous tenant."""
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        raise AuthenticationError(
            "The Authorization header is not a bearer token: send your API key as 'Authorization: Bearer KEY'."
        )
    return headers.get("api-key") or headers.get("x-api-key") or None


class Authenticator:
    def __init__(self, cfg: AuthConfig, settings: Settings) -> None:
        self.cfg = cfg
        if cfg.hash_key:
            self._hash_key = cfg.hash_key.encode()
        else:
            self._hash_key = secrets.token_bytes(32)
            log.info("auth.hash_key is not set: tenant hashes are random per process (set it to share across replicas)")
        self._keys = {k.sha256: k.tenant for k in cfg.keys}
        self._sampled = {k.sha256: k.sampled for k in cfg.keys}
        # every request hashes its key: each distinct value once, while it is among the recent ones
        self.keyed_hash = functools.lru_cache(maxsize=HASH_MEMO)(self._keyed_hash)
        holding = any(u.api_key for u in settings.upstreams.values())
        self.check_keys = cfg.mode == "keys" or (cfg.mode == "auto" and holding)

    def _keyed_hash(self, value: str) -> str:
        return hmac.digest(self._hash_key, value.encode(), "sha256").hex()[:32]

    def identify(self, headers: Mapping[str, str]) -> Identity:
        key = client_key_from(headers)
        sampled = ""
        if self.check_keys:
            if key is None:
                raise AuthenticationError("You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.")
            digest = hashlib.sha256(key.encode()).hexdigest()
            if digest not in self._keys:
                raise AuthenticationError("Incorrect API key provided.")
            name, sampled = self._keys[digest], self._sampled[digest]
            tenant = f"t:{name}" if name else f"k:{self.keyed_hash(key)}"
        else:
            tenant = f"k:{self.keyed_hash(key)}" if key else "anonymous"
        if self.cfg.tenant_header:
            extra = headers.get(self.cfg.tenant_header.lower())
            if extra:
                tenant = f"{tenant}/h:{self.keyed_hash(extra)}"
        account = {}
        for header, mark in ACCOUNT_HEADERS:
            value = headers.get(header)
            if value:
                account[header] = value
                tenant = f"{tenant}/{mark}:{self.keyed_hash(value)}"
        return Identity(tenant=tenant, client_key=key, sampled=sampled, headers=account)
