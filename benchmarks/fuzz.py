"""`herd bench fuzz`: property-based fuzzing of herd's request handling (hypothesis).

Three properties, each checked over generated requests:

  validation  any body and headers, to chat completions (and responses, completions,
              embeddings), through the real app (httpx's ASGI transport; herd's
              simulator as the upstream, on loopback): never a 5xx, never an exception out of
              the app, every error in OpenAI's shape, every 200 a whole answer.
  keys        canonical keys, through herd's own authentication and canonicalization: a
              rewrite the API reads the same (key order, whitespace, 1 vs 1.0, one text part
              vs a string, stream flags, the bearer scheme's case) keeps a request's key; a
              change the API answers differently (API key, organization, project, model, any
              parameter, any message, a schema's property order) never does.
  isolation   pairs of requests that differ like that, sent at once through the real app
              with the cache on: neither is ever a follower of, or a cache hit for, the other.

    herd bench fuzz --cases 5000            # each property, 5,000 generated cases
    python -m benchmarks.fuzz --cases 200 --only keys

tests/test_fuzz.py runs the same properties with a few hundred cases (HERD_FUZZ_CASES).
A failing property stops at hypothesis's smallest failing example and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.apis.chat import FLOAT_PARAMS, assign_keys, parse_chat
from proxy.auth import Authenticator
from proxy.config import Settings, parse_settings
from proxy.errors import HerdError

# -- generated requests -------------------------------------------------------------------

ROLES = ["system", "developer", "user", "assistant", "tool", "function"]
MODELS = ["m", "gpt-4o-mini", "model-b"]
PARAM_NAMES = [
    "temperature", "top_p", "n", "max_tokens", "max_completion_tokens", "stop", "presence_penalty",
    "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "seed", "response_format", "tools",
    "tool_choice", "parallel_tool_calls", "user", "metadata", "reasoning_effort", "service_tier",
    "stream", "stream_options", "unknown_param",
]
AUTHORIZATIONS = [None, "Bearer sk-a", "bearer sk-a", "Bearer sk-b", "BEARER sk-c", None, "Bearer sk-a",
                  "Basic c2stYTo=", "sk-raw", "", "Bearer ", "Token x"]
HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
parts = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url", "refusal", "input_audio", "file", "other"])},
        optional={
            "text": st.one_of(st.text(max_size=20), json_values),
            "refusal": st.one_of(st.text(max_size=8), json_values),
            "image_url": st.one_of(st.fixed_dictionaries({"url": st.text(max_size=20)}), json_values),
            "extra": json_values,
        },
    ),
    json_values,
)
messages = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from([*ROLES, "wizard", ""]), json_values)},
    optional={
        "content": st.one_of(st.text(max_size=30), st.none(), st.lists(parts, max_size=3), json_values),
        "name": st.one_of(st.text(max_size=6), json_values),
        "tool_call_id": st.text(max_size=6),
    },
)
param_values = st.one_of(
    json_values,
    st.floats(-3, 3, allow_nan=False),
    st.integers(-5, 200),
    st.lists(st.text(max_size=4), max_size=5),
    st.dictionaries(st.sampled_from(["type", "json_schema", "include_usage", "1", "2"]), json_values, max_size=3),
)


@st.composite
def chat_bodies(draw) -> bytes:
    """A chat request body: half valid requests with a few fields broken or added, the rest
    nearly valid bodies, any JSON, or not JSON at all."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=40))
    if kind == 1:
        return json.dumps(draw(json_values)).encode()
    if kind < 5:
        body: dict[str, Any] = {}
        if draw(st.integers(0, 9)):
            body["model"] = draw(st.one_of(st.sampled_from(MODELS), json_values))
        if draw(st.integers(0, 9)):
            body["messages"] = draw(st.one_of(st.lists(messages, max_size=3), json_values))
        body.update(draw(st.dictionaries(st.sampled_from(PARAM_NAMES), param_values, max_size=4)))
    else:
        _, body = draw(valid_requests())
        for _ in range(draw(st.integers(0, 2))):
            where = draw(st.sampled_from(["param", "message", "part", "stream"]))
            if where == "param":
                body[draw(st.sampled_from(PARAM_NAMES))] = draw(param_values)
            elif where == "message":
                i = draw(st.integers(0, len(body["messages"]) - 1))
                body["messages"][i] = draw(messages)
            elif where == "part":
                body["messages"][-1]["content"] = draw(st.lists(parts, min_size=1, max_size=3))
            else:
                body["stream"] = True
    return json.dumps(body).encode()  # the standard library: NaN, Infinity and huge integers too


# the coalesced APIs (and a forwarded one), with the field each takes its input in
OTHER_APIS = {"/v1/responses": "input", "/v1/completions": "prompt", "/v1/embeddings": "input"}
API_OBJECTS = {"/v1/chat/completions": "chat.completion", "/v1/responses": "response",
               "/v1/completions": "text_completion", "/v1/embeddings": "list"}


@st.composite
def api_requests(draw) -> tuple[str, bytes]:
    """(path, body): mostly chat requests, else a request for another API (or a chat body sent there)."""
    path = draw(st.sampled_from(["/v1/chat/completions"] * 4 + sorted(OTHER_APIS)))
    if path == "/v1/chat/completions" or draw(st.integers(0, 3)) == 0:
        return path, draw(chat_bodies())
    body = {"model": draw(st.one_of(st.sampled_from(MODELS), json_values))}
    if draw(st.integers(0, 5)):
        body[OTHER_APIS[path]] = draw(st.one_of(texts, st.lists(texts, max_size=3), json_values))
    extra = [*PARAM_NAMES, "instructions", "suffix", "echo", "best_of", "dimensions", "encoding_format"]
    body.update(draw(st.dictionaries(st.sampled_from(extra), param_values, max_size=3)))
    return path, json.dumps(body).encode()


@st.composite
def request_headers(draw) -> dict[str, str]:
    headers = {"content-type": draw(st.sampled_from(["application/json", "text/plain", ""]))}
    auth = draw(st.sampled_from(AUTHORIZATIONS))
    if auth is not None:
        headers["authorization"] = auth
    for name, values in (
        ("x-herd-coalesce", st.sampled_from(["off", "exact", "semantic", "EXACT", "sometimes", ""])),
        ("cache-control", st.sampled_from(["no-cache", "no-store", "no-cache, no-store", "max-age=0", ""])),
        ("x-herd-sampled", st.sampled_from(["share", "distinct", "maybe", ""])),
        ("openai-organization", HEADER_TEXT),
        ("openai-project", HEADER_TEXT),
        ("x-request-id", HEADER_TEXT),
    ):
        if draw(st.booleans()):
            headers[name] = draw(values)
    return headers


# valid requests, for the key and isolation properties
texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
int64 = st.integers(-(2**63), 2**63 - 1)  # what JSON numbers herd (orjson) reads as integers
valid_values: dict[str, st.SearchStrategy] = {
    "temperature": st.one_of(st.integers(0, 2), st.floats(0, 2)),
    "top_p": st.one_of(st.integers(0, 1), st.floats(0, 1)),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "n": st.integers(1, 4),
    "max_tokens": st.integers(1, 64),
    "seed": st.integers(-1000, 1000),
    "stop": st.one_of(texts, st.lists(texts, max_size=4)),
    "logit_bias": st.dictionaries(st.integers(0, 50000).map(str), st.integers(-100, 100), max_size=3),
    "logprobs": st.booleans(),
    "user": texts,
    "reasoning_effort": st.sampled_from(["low", "medium", "high"]),
    "unknown_param": st.one_of(int64, texts, st.dictionaries(texts, int64, max_size=2)),
}


@st.composite
def valid_requests(draw) -> tuple[dict[str, str], dict[str, Any]]:
    """(headers, body) of a valid request: identity headers, and a body parse_chat accepts."""
    history = draw(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), texts), max_size=2))
    msgs = [{"role": role, "content": text} for role, text in history]
    msgs.append({"role": "user", "content": draw(texts)})
    body: dict[str, Any] = {"model": draw(st.sampled_from(MODELS)), "messages": msgs}
    for name in draw(st.lists(st.sampled_from(sorted(valid_values)), max_size=4, unique=True)):
        body[name] = draw(valid_values[name])
    headers = {"authorization": "Bearer " + draw(st.sampled_from(["sk-a", "sk-b", "sk-c"]))}
    for name in ("openai-organization", "openai-project"):
        if draw(st.booleans()):
            headers[name] = draw(st.sampled_from([f"{name[7:10]}-1", f"{name[7:10]}-2"]))
    return headers, body


Request = tuple[dict[str, str], dict[str, Any]]
Rewrite = Callable[[Request, random.Random], Request]


def _copy(request: Request) -> Request:
    headers, body = request
    return dict(headers), copy.deepcopy(body)


def _shuffled(d: dict, rng: random.Random) -> dict:
    items = list(d.items())
    rng.shuffle(items)
    return dict(items)


def reorder_keys(request: Request, rng: random.Random) -> Request:
    headers, body = _copy(request)
    body["messages"] = [_shuffled(m, rng) for m in body["messages"]]
    if isinstance(body.get("logit_bias"), dict):
        body["logit_bias"] = _shuffled(body["logit_bias"], rng)
    return headers, _shuffled(body, rng)


def float_forms(request: Request, rng: random.Random) -> Request:
    headers, body = _copy(request)
    for name in FLOAT_PARAMS & body.keys():
        value = body[name]
        if isinstance(value, float) and value.is_integer():
            body[name] = int(value)
        elif isinstance(value, int):
            body[name] = float(value)
    return headers, body


def one_text_part(request: Request, rng: random.Random) -> Request:
    headers, body = _copy(request)
    m = rng.choice(body["messages"])
    if isinstance(m["content"], str):
        m["content"] = [_shuffled({"type": "text", "text": m["content"]}, rng)]
    return headers, body


def stream_flags(request: Request, rng: random.Random) -> Request:
    headers, body = _copy(request)
    body["stream"] = rng.choice([True, False, None])
    if rng.random() < 0.5:
        body["stream_options"] = {"include_usage": rng.choice([True, False])}
    return headers, body


def bearer_case(request: Request, rng: random.Random) -> Request:
    headers, body = _copy(request)
    headers["authorization"] = rng.choice(["bearer ", "BEARER ", "Bearer "]) + headers["authorization"][7:]
    return headers, body


PRESERVING: list[Rewrite] = [reorder_keys, float_forms, one_text_part, stream_flags, bearer_case]


def other_key(request: Request, rng: random.Random) -> Request:
    headers, body = _copy(request)
    headers["authorization"] += "x"
    return headers, body


def other_account(request: Request, rng: random.Random) -> Request:
    headers, body = _copy(request)
    name = rng.choice(["openai-organization", "openai-project"])
    if name in headers and rng.random() < 0.5:
        del headers[name]
    else:
        headers[name] = headers.get(name, "") + "-other"
    return headers, body


def other_model(request: Request, rng: random.Random) -> Request:
    headers, body = _copy(request)
    body["model"] = rng.choice([m for m in MODELS if m != body["model"]])
    return headers, body


def other_param(request: Request, rng: random.Random) -> Request:
    headers, body = _copy(request)
    name = rng.choice(["temperature", "top_p", "seed", "n", "max_tokens", "user", "unknown_param", "logprobs"])
    old = body.get(name)
    changed: dict[str, Callable[[Any], Any]] = {
        "temperature": lambda v: 0.25 if v != 0.25 else 0.5,
        "top_p": lambda v: 0.5 if v != 0.5 else 0.25,
        "seed": lambda v: v + 1 if isinstance(v, int) else 7,
        "n": lambda v: v % 4 + 1 if isinstance(v, int) else 2,
        "max_tokens": lambda v: v % 64 + 1 if isinstance(v, int) else 3,
        "user": lambda v: f"{v}-other",
        "unknown_param": lambda v: [v],
        "logprobs": lambda v: not v,
    }
    new = changed[name](old)
    body[name] = new
    return headers, body


def other_text(request: Request, rng: random.Random) -> Request:
    headers, body = _copy(request)
    m = rng.choice(body["messages"])
    m["content"] = rng.choice([m["content"] + ".", m["content"] + " ", " " + m["content"], m["content"].upper() + "!"])
    return headers, body


def other_role(request: Request, rng: random.Random) -> Request:
    headers, body = _copy(request)
    m = rng.choice(body["messages"])
    m["role"] = rng.choice([r for r in ("system", "user", "assistant", "developer") if r != m["role"]])
    return headers, body


def other_history(request: Request, rng: random.Random) -> Request:
    headers, body = _copy(request)
    if len(body["messages"]) > 1 and rng.random() < 0.5:
        del body["messages"][0]
    else:
        body["messages"].insert(0, {"role": "system", "content": "be brief"})
    return headers, body


def split_parts(request: Request, rng: random.Random) -> Request:
    headers, body = _copy(request)
    m = body["messages"][-1]
    text = m["content"]
    m["content"] = [{"type": "text", "text": text[:1]}, {"type": "text", "text": text[1:]}]
    return headers, body


def named_message(request: Request, rng: random.Random) -> Request:
    headers, body = _copy(request)
    rng.choice(body["messages"])["name"] = "someone"
    return headers, body


def schema_order(request: Request, rng: random.Random) -> Request:
    """Two requests whose structured-output schemas list the same properties in another order."""
    headers, body = _copy(request)
    props = {"a": {"type": "string"}, "b": {"type": "string"}}
    schema = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object", "properties": props}}}
    body["response_format"] = schema
    return headers, body


def schema_order_swapped(request: Request, rng: random.Random) -> Request:
    headers, body = schema_order(request, rng)
    props = body["response_format"]["json_schema"]["schema"]["properties"]
    body["response_format"]["json_schema"]["schema"]["properties"] = dict(reversed(list(props.items())))
    return headers, body


CHANGING: list[Rewrite] = [
    other_key, other_account, other_model, other_param, other_text, other_role, other_history, split_parts,
    named_message, schema_order_swapped,
]


def encode(body: dict, rng: random.Random) -> bytes:
    """The body as JSON, with any of a few whitespace styles (none of them changes its meaning)."""
    style = rng.choice([{}, {"indent": 2}, {"separators": (",", ":")}, {"separators": (" ,", " : ")}])
    return json.dumps(body, ensure_ascii=rng.random() < 0.5, **style).encode()


# -- the properties ---------------------------------------------------------------------


@dataclass
class Tally:
    """What one property saw."""

    name: str
    cases: int = 0
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    server_errors: int = 0  # 5xx answers
    crashes: int = 0  # exceptions out of the app
    bad_errors: int = 0  # error bodies not in OpenAI's shape, or incomplete 200s
    merges: int = 0  # requests the API answers differently that shared a key, flight or answer
    splits: int = 0  # rewrites the API reads the same that changed the key (missed merges)
    seconds: float = 0.0
    failure: str = ""  # the smallest failing example, if the property failed

    def count(self, status: int) -> None:
        self.requests += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status >= 500:
            self.server_errors += 1


def fuzz_settings(upstream_url: str, cache: bool) -> Settings:
    return parse_settings(
        {
            "upstreams": {"sim": {"kind": "openai", "base_url": upstream_url + "/v1", "retries": 0}},
            "routes": [{"model": "*", "upstream": "sim"}],
            "auth": {"mode": "open", "hash_key": "fuzz"},
            "cache": {"enabled": cache},
            "server": {"request_timeout_s": 30},
        },
        env={},
    )


def well_formed_error(body: bytes) -> bool:
    try:
        error = orjson.loads(body)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return False
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("type"), str)
        and {"param", "code"} <= error.keys()
    )


def complete_answer(path: str, response: httpx.Response) -> bool:
    """A 200 is a whole answer: a stream that ends as its API ends one (chat and completions:
    [DONE]; responses: response.completed) with no error event, or the API's JSON object."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [e for e in response.content.split(b"\n\n") if e]
        if not events or any(b'"error"' in e[:40] for e in events):
            return False
        if path == "/v1/responses":
            return b"response.completed" in events[-1]
        return events[-1] == b"data: [DONE]"
    try:
        return orjson.loads(response.content)["object"] == API_OBJECTS[path]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return False


class App:
    """herd's app on a loop of its own, called through httpx's ASGI transport."""

    def __init__(self, upstream_url: str, cache: bool) -> None:
        from proxy.app import create_app

        self.loop = asyncio.new_event_loop()
        self.app = create_app(fuzz_settings(upstream_url, cache))
        self.gateway = self.app.state.gateway
        self.loop.run_until_complete(self.gateway.start())
        transport = httpx.ASGITransport(app=self.app)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://herd", timeout=60)

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.client.aclose())
        self.run(self.gateway.aclose())
        self.loop.close()


def hypothesis_settings(cases: int) -> settings:
    return settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def validation(app: App, cases: int, tally: Tally) -> None:
    @hypothesis_settings(cases)
    @given(request=api_requests(), headers=request_headers())
    def prop(request: tuple[str, bytes], headers: dict[str, str]) -> None:
        tally.cases += 1
        path, body = request
        try:
            response = app.run(app.client.post(path, content=body, headers=headers))
        except Exception:
            tally.crashes += 1
            raise
        tally.count(response.status_code)
        assert response.status_code < 500, (path, response.status_code, response.content[:300])
        if response.status_code >= 400:
            ok = well_formed_error(response.content)
        else:
            ok = complete_answer(path, response)
        if not ok:
            tally.bad_errors += 1
        assert ok, (path, response.status_code, response.content[:300])

    prop()


def keys(cases: int, tally: Tally) -> None:
    s = parse_settings({"upstreams": {"sim": {"base_url": "http://127.0.0.1:1/v1"}}, "auth": {"mode": "open"}}, env={})
    auth = Authenticator(s.auth, s)

    def key_of(request: Request, rng: random.Random) -> str:
        headers, body = request
        identity = auth.identify(headers)
        return assign_keys(parse_chat(encode(body, rng)), identity.tenant, "sim").key

    @hypothesis_settings(cases)
    @given(request=valid_requests(), seed=st.integers(0, 2**32), same=st.lists(st.sampled_from(PRESERVING), max_size=3),
           change=st.sampled_from(CHANGING))
    def prop(request: Request, seed: int, same: list[Rewrite], change: Rewrite) -> None:
        tally.cases += 1
        rng = random.Random(seed)
        if change is schema_order_swapped:
            request = schema_order(request, rng)
        rewritten = request
        for rewrite in same:
            rewritten = rewrite(rewritten, rng)
        try:
            base = key_of(request, rng)
            kept = key_of(rewritten, rng)
            changed = key_of(change(request, rng), rng)
        except HerdError:
            tally.crashes += 1
            raise
        tally.requests += 3
        if kept != base:
            tally.splits += 1
        if changed == base:
            tally.merges += 1
        assert kept == base, ("a rewrite the API reads the same changed the key", [r.__name__ for r in same])
        assert changed != base, ("a change the API answers differently kept the key", change.__name__)

    prop()


def isolation(app: App, cases: int, tally: Tally) -> None:
    nonces = iter(range(10**9))

    @hypothesis_settings(cases)
    @given(request=valid_requests(), seed=st.integers(0, 2**32), change=st.sampled_from(CHANGING),
           stream=st.booleans())
    def prop(request: Request, seed: int, change: Rewrite, stream: bool) -> None:
        tally.cases += 1
        rng = random.Random(seed)
        request[1]["metadata"] = {"fuzz": f"{time.time_ns()}-{next(nonces)}"}  # no answer from an earlier case
        if change is schema_order_swapped:
            request = schema_order(request, rng)
        pair = [request, change(request, rng)]

        async def send(headers: dict[str, str], body: dict) -> httpx.Response:
            return await app.client.post("/v1/chat/completions", content=encode({**body, "stream": stream}, rng),
                                         headers={**headers, "content-type": "application/json"})

        async def both() -> list[httpx.Response]:
            return await asyncio.gather(*(send(h, b) for h, b in pair))

        try:
            responses = app.run(both())
        except Exception:
            tally.crashes += 1
            raise
        for r in responses:
            tally.count(r.status_code)
        assert all(r.status_code == 200 for r in responses), [(r.status_code, r.content[:200]) for r in responses]
        roles = sorted(r.headers["x-herd"] for r in responses)
        flights = {r.headers["x-herd-flight"] for r in responses}
        shared = roles != ["leader", "leader"] or len(flights) != 2
        if shared:
            tally.merges += 1
        assert not shared, (change.__name__, roles)

    prop()


# -- the command ------------------------------------------------------------------------

PROPERTIES = ("validation", "keys", "isolation")


def run(cases: int, only: tuple[str, ...] = PROPERTIES) -> list[Tally]:
    """Each property in `only` over `cases` generated cases. A property that fails stops at
    hypothesis's smallest failing example: its tally's `failure` says what it was."""
    from benchmarks.simulator import ThreadedSimulator

    tallies: list[Tally] = []
    with ThreadedSimulator() as sim:
        for name in only:
            tally = Tally(name)
            tallies.append(tally)
            started = time.perf_counter()
            try:
                if name == "keys":
                    keys(cases, tally)
                else:
                    app = App(sim.url, cache=name == "isolation")
                    try:
                        (validation if name == "validation" else isolation)(app, cases, tally)
                    finally:
                        app.close()
            except AssertionError as e:
                tally.failure = str(e) or type(e).__name__
            finally:
                tally.seconds = time.perf_counter() - started
    return tallies


def table(tallies: list[Tally]) -> str:
    from benchmarks import report

    rows = [
        [t.name + (" FAILED" if t.failure else ""), f"{t.cases:,}", f"{t.requests:,}", t.server_errors, t.crashes,
         t.bad_errors, t.merges, t.splits, " ".join(f"{s}:{n}" for s, n in sorted(t.statuses.items())),
         f"{t.seconds:.1f}"]
        for t in tallies
    ]
    header = ["property", "cases", "requests", "5xx", "crashes", "bad errors", "merges", "splits", "statuses", "s"]
    return report.table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="herd bench fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="generated cases per property (default 1000)")
    parser.add_argument("--only", choices=PROPERTIES, action="append", help="run only this property (repeatable)")
    parser.add_argument("--json", help="also write the counts to this file")
    args = parser.parse_args(argv)
    tallies = run(args.cases, tuple(args.only or PROPERTIES))
    print(table(tallies))
    for t in tallies:
        if t.failure:
            print(f"herd bench fuzz: property {t.name!r} failed: {t.failure}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([t.__dict__ for t in tallies], f, indent=2)
    return 1 if any(t.failure for t in tallies) else 0


if __name__ == "__main__":
    sys.exit(main())
