"""Canonicalization rejects what the API rejects, and never gives one key to two requests
the API would answer differently; Authorization headers never fall back to anonymous."""

from __future__ import annotations

import httpx
import orjson
import pytest

from proxy.apis.chat import assign_keys, parse_chat
from proxy.auth import Authenticator
from proxy.config import parse_settings
from proxy.errors import AuthenticationError, InvalidRequest
from tests.harness import chat_calls


def body(content, **params) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": content}], **params})


def key_of(raw: bytes, tenant: str = "t") -> str:
    return assign_keys(parse_chat(raw), tenant, "sim").key


BAD_PARTS = [
    ([{"type": "text", "text": None}], "messages[0].content[0].text"),
    ([{"type": "text", "text": 5}], "messages[0].content[0].text"),
    ([{"type": "text"}], "messages[0].content[0].text"),
    ([{"type": "text", "text": ["a"]}], "messages[0].content[0].text"),
    ([{"type": "text", "text": "hi", "extra": 1}], "messages[0].content[0]"),
    ([{"type": "text", "text": "a"}, {"type": "text", "text": None}], "messages[0].content[1].text"),
    ([{"type": "text", "text": "a"}, {"type": "text", "text": "b", "cache": True}], "messages[0].content[1]"),
    ([{"type": "refusal", "refusal": 3}], "messages[0].content[0].refusal"),
    ([{"text": "hi"}], "messages[0].content[0]"),
]


@pytest.mark.parametrize("content, param", BAD_PARTS)
def test_invalid_content_parts_are_a_400_naming_the_part(content, param):
    with pytest.raises(InvalidRequest) as caught:
        parse_chat(body(content))
    assert caught.value.status == 400 and caught.value.param == param


@pytest.mark.parametrize("content, param", BAD_PARTS[:5])
def test_invalid_content_parts_get_an_openai_400_from_herd(herd, sim, content, param):
    headers = {"content-type": "application/json"}
    r = httpx.post(herd.url + "/v1/chat/completions", content=body(content), headers=headers)
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert chat_calls(sim.url) == 0


def test_requests_the_api_answers_differently_get_different_keys():
    same_text = ["None", "5", "", "ab"]
    distinct = [key_of(body(text)) for text in same_text]
    distinct.append(key_of(body([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])))
    distinct.append(key_of(body([{"type": "text", "text": "a b"}])))
    distinct.append(key_of(body("ab", response_format={"type": "json_schema", "json_schema": {
        "name": "r", "schema": {"type": "object", "properties": {"x": {"type": "string"}, "y": {"type": "string"}}}}})))
    distinct.append(key_of(body("ab", response_format={"type": "json_schema", "json_schema": {
        "name": "r", "schema": {"type": "object", "properties": {"y": {"type": "string"}, "x": {"type": "string"}}}}})))
    distinct.append(key_of(body("ab", tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {}, "b": {}}}}}])))
    distinct.append(key_of(body("ab", tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"b": {}, "a": {}}}}}])))
    assert len(set(distinct)) == len(distinct)


def test_several_text_parts_are_not_one_final_text():
    req = assign_keys(parse_chat(body([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])), "t", "sim")
    assert req.final_text is None  # never merged semantically with "ab"
    assert assign_keys(parse_chat(body([{"type": "text", "text": "ab"}])), "t", "sim").final_text == "ab"


def test_what_the_api_reads_the_same_shares_a_key():
    one = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":1,"logit_bias":{"1":2,"3":4}}'
    two = (
        b'{ "logit_bias" : {"3":4, "1":2},\n "temperature": 1.0,'
        b' "messages": [ {"content": "hi", "role": "user"} ],"model":"m"}'
    )
    three = body([{"text": "hi", "type": "text"}], temperature=1, logit_bias={"1": 2, "3": 4})
    assert key_of(one) == key_of(two) == key_of(three)
    assert key_of(body("hi", presence_penalty=-0.0)) == key_of(body("hi", presence_penalty=0))  # found by the fuzzer


BASE = {"upstreams": {"sim": {"base_url": "http://127.0.0.1:1/v1"}}}


@pytest.mark.parametrize(
    "value", ["Basic c2stYWJjOnNlY3JldA==", "sk-raw-key", "Bearer", "Bearer   ", "", "Token sk-abc", "Bearer\tsk-abc"]
)
def test_an_authorization_that_is_not_a_bearer_token_is_a_401_not_anonymous(value):
    s = parse_settings({**BASE, "auth": {"mode": "open"}}, env={})
    with pytest.raises(AuthenticationError) as caught:
        Authenticator(s.auth, s).identify({"authorization": value})
    assert caught.value.status == 401


def test_the_bearer_scheme_is_case_insensitive_and_different_keys_never_share_a_tenant():
    s = parse_settings({**BASE, "auth": {"mode": "open", "hash_key": "h"}}, env={})
    auth = Authenticator(s.auth, s)
    tenants = {
        auth.identify({"authorization": f"{scheme} {key}"}).tenant
        for scheme in ("Bearer", "bearer", "BEARER")
        for key in ("sk-a",)
    }
    assert len(tenants) == 1
    others = [auth.identify({"authorization": "bearer sk-b"}).tenant, auth.identify({"x-api-key": "sk-c"}).tenant,
              auth.identify({"api-key": "sk-d"}).tenant, auth.identify({}).tenant]
    assert len(set(others) | tenants) == 5


def test_a_basic_authorization_gets_an_openai_401_from_herd(herd, sim):
    r = httpx.post(herd.url + "/v1/chat/completions", content=body("hi"),
                   headers={"authorization": "Basic c2stYWJjOg==", "content-type": "application/json"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert chat_calls(sim.url) == 0
