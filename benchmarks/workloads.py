"""Workloads: reproducible streams of chat requests for the load generator.

A workload is an endless iterator of :class:`Request` objects made from a seed: the same
seed gives the same requests in the same order. Bodies are serialized once (identical
requests share one ``bytes`` object), so the load generator only sends bytes.

=============  ===========================================================================
``unique``     every prompt is new: nothing can merge (the cost of the proxy itself)
``zipf``       a pool of prompts drawn with a Zipf law: a few hot prompts, a long tail
``paraphrase`` a pool of questions, each asked in several wordings (semantic mode merges
               the wordings; exact mode only identical ones)
``bursts``     groups of ``burst`` identical requests, one after another
``stream``     the Zipf pool with half of the requests streaming
``tenants``    the Zipf pool asked by several tenants (API keys) that must never share
``trace68``    a trace shaped like the design card's claim: about 68% of requests are
               duplicates of one in flight (groups of geometric size, mean 1/(1-0.68)),
               spread over a short window, 30% streaming, 4 tenants, fresh prompts only
=============  ===========================================================================

``Options.stream_share`` (``--stream-share``) overrides each workload's share of
streaming requests.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

SYSTEM_PROMPT = "You are a concise assistant. Answer in plain text."
DEFAULT_MODEL = "gpt-4o-mini"


@dataclass(frozen=True, slots=True)
class Request:
    """One request, ready to send: ``POST /v1/chat/completions`` with ``body``."""

    body: bytes
    stream: bool
    headers: dict[str, str]  # shared between requests of one tenant; never mutate
    prompt: int  # identical (prompt, tenant, stream-agnostic) => an exact duplicate
    tenant: int = 0


@dataclass(frozen=True)
class Options:
    """Knobs shared by the workloads (each has a CLI flag of the same name)."""

    model: str = DEFAULT_MODEL
    pool: int = 1000  # prompts in the pool (zipf, stream, tenants)
    zipf_s: float = 1.1  # Zipf exponent
    burst: int = 50  # identical requests per group (bursts)
    tenants: int = 8  # tenants (tenants workload)
    merge_share: float = 0.68  # trace68: share of requests that duplicate one in flight
    stream_share: float | None = None  # None: the workload's own default
    max_tokens: int | None = None


@dataclass(frozen=True)
class Workload:
    name: str
    summary: str
    build: Callable[[Options, int], Iterator[Request]]
    default_stream_share: float = 0.0
    sim: dict[str, Any] = field(default_factory=dict)  # suggested simulator settings

    def requests(self, options: Options | None = None, seed: int = 0) -> Iterator[Request]:
        options = options or Options()
        if options.stream_share is None:
            options = replace(options, stream_share=self.default_stream_share)
        return self.build(options, seed)


# --------------------------------------------------------------------------- prompts

_TOPICS = (
    "the water cycle", "compound interest", "how vaccines work", "TCP slow start", "photosynthesis",
    "the French revolution", "black holes", "public key cryptography", "supply and demand", "plate tectonics",
    "how a bill becomes law", "garbage collection", "the immune system", "inflation", "neural networks",
    "the Krebs cycle", "Roman aqueducts", "quantum entanglement", "the stock market", "sourdough baking",
    "climate feedback loops", "the printing press", "DNS resolution", "continental drift", "jazz harmony",
    "blockchain consensus", "the Silk Road", "antibiotic resistance", "solar panels", "the Doppler effect",
)
_AUDIENCES = ("a child", "a new employee", "a busy manager", "a first-year student", "my grandmother", "an engineer")
_TASKS = (
    "Explain {topic} to {audience} in three sentences.",
    "Give {audience} two surprising facts about {topic}.",
    "Summarize {topic} for {audience} in one paragraph.",
    "What is the most common misconception about {topic}? Answer for {audience}.",
    "Write a short quiz question about {topic} for {audience}.",
)


def _prompt_text(rng: random.Random) -> str:
    return rng.choice(_TASKS).format(topic=rng.choice(_TOPICS), audience=rng.choice(_AUDIENCES))


def prompt_pool(n: int, seed: int) -> list[str]:
    """``n`` distinct prompts (a short task, made unique by a reference number)."""
    rng = random.Random(f"pool:{seed}")
    return [f"{_prompt_text(rng)} (ref {seed}-{i})" for i in range(n)]


# Paraphrases: each question in several wordings with the same meaning (written for herd).
PARAPHRASES: tuple[tuple[str, ...], ...] = (
    ("What is the capital of Australia?", "Which city is Australia's capital?",
     "Tell me the capital city of Australia.", "Australia's capital is which city?"),
    ("How many bones are in the adult human body?", "How many bones does a grown-up human have?",
     "What is the number of bones in an adult's skeleton?", "Count of bones in the adult human body?"),
    ("How do I reverse a list in Python?", "What's the way to reverse a Python list?",
     "Reverse a list in Python: how?", "In Python, how can I flip the order of a list?"),
    ("What causes the seasons on Earth?", "Why does Earth have seasons?",
     "What is the reason the Earth has seasons?", "Explain why we get seasons on Earth."),
    ("How long should I boil an egg for a soft yolk?", "For a runny yolk, how long do I boil an egg?",
     "Boiling time for a soft-boiled egg?", "How many minutes to boil an egg so the yolk stays soft?"),
    ("What is the speed of light in a vacuum?", "How fast does light travel in a vacuum?",
     "Speed of light in vacuum, please.", "What's light's speed in empty space?"),
    ("Who wrote Pride and Prejudice?", "Who is the author of Pride and Prejudice?",
     "Pride and Prejudice was written by whom?", "Which writer wrote the novel Pride and Prejudice?"),
    ("How do I undo the last git commit?", "What's the command to undo my most recent git commit?",
     "Undo the last commit in git: how?", "How can I revert the latest commit I made in git?"),
    ("What is the boiling point of water at sea level?", "At sea level, at what temperature does water boil?",
     "Water's boiling point at sea level?", "What temperature does water boil at, at sea level?"),
    ("How do I convert Celsius to Fahrenheit?", "What's the formula from Celsius to Fahrenheit?",
     "Celsius to Fahrenheit conversion: how does it work?", "How can I turn a Celsius reading into Fahrenheit?"),
    ("What is the largest planet in our solar system?", "Which planet is the biggest in the solar system?",
     "Name the largest planet orbiting our Sun.", "What's the solar system's biggest planet?"),
    ("How do I center a div in CSS?", "What's the way to center a div with CSS?",
     "Centering a div in CSS: how?", "How can I put a div in the middle of the page using CSS?"),
    ("What does HTTP status 404 mean?", "What is the meaning of an HTTP 404 response?",
     "HTTP 404: what does it signify?", "Explain the HTTP 404 status code."),
    ("How many continents are there?", "What is the number of continents on Earth?",
     "How many continents does the world have?", "Count the continents for me."),
    ("What is the difference between a virus and a bacterium?", "How do viruses differ from bacteria?",
     "Virus versus bacterium: what's the difference?", "Explain how a bacterium is different from a virus."),
    ("How do I make a cup of green tea?", "What's the right way to brew green tea?",
     "Steps to prepare a cup of green tea?", "How should I brew a cup of green tea?"),
    ("When did the Second World War end?", "In what year did World War II end?",
     "What year marked the end of WW2?", "When was the end of the Second World War?"),
    ("What is a prime number?", "Define a prime number.",
     "Can you explain what a prime number is?", "What does it mean for a number to be prime?"),
    ("How do I sort a dictionary by value in Python?", "Sorting a Python dict by its values: how?",
     "What's the way to order a Python dictionary by value?", "In Python, how can I sort a dict by values?"),
    ("Why is the sky blue?", "What makes the sky look blue?",
     "Explain why the sky appears blue.", "For what reason is the sky blue?"),
    ("How much water should an adult drink per day?", "What is the recommended daily water intake for adults?",
     "How many liters of water should a grown-up drink each day?", "Daily water intake for an adult?"),
    ("What is the tallest mountain in the world?", "Which mountain is the highest on Earth?",
     "Name the world's tallest mountain.", "What's the highest mountain on the planet?"),
    ("How do I list files in a directory in Linux?", "What command lists the files in a Linux directory?",
     "Linux: how do I show the files in a folder?", "How can I see which files a directory holds on Linux?"),
    ("What is the chemical symbol for gold?", "Which chemical symbol stands for gold?",
     "Gold's symbol on the periodic table?", "What's the element symbol of gold?"),
)


# --------------------------------------------------------------------------- helpers


class _Bodies:
    """Serialized bodies, one per (text, stream): identical requests share the bytes."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self._cache: dict[tuple[str, bool], bytes] = {}

    def __call__(self, text: str, stream: bool, keep: bool = True) -> bytes:
        key = (text, stream)
        body = self._cache.get(key)
        if body is None:
            obj: dict[str, Any] = {
                "model": self.opts.model,
                "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}],
            }
            if self.opts.max_tokens is not None:
                obj["max_tokens"] = self.opts.max_tokens
            if stream:
                obj["stream"] = True
                obj["stream_options"] = {"include_usage": True}
            body = orjson.dumps(obj)
            if keep:
                self._cache[key] = body
        return body


def tenant_headers(n: int, seed: int) -> list[dict[str, str]]:
    """Request headers of ``n`` tenants: each has its own (fake) API key."""
    return [
        {"content-type": "application/json", "authorization": f"Bearer sk-bench-{seed}-tenant{t}"} for t in range(n)
    ]


class ZipfSampler:
    """Ranks 0..n-1 drawn with probability proportional to 1/(rank+1)**s (finite Zipf)."""

    def __init__(self, n: int, s: float, rng: random.Random) -> None:
        weights = [1.0 / (k + 1) ** s for k in range(n)]
        self._cum = list(itertools.accumulate(weights))
        self._rng = rng
        self._n = n

    def __call__(self, k: int = 1) -> list[int]:
        return self._rng.choices(range(self._n), cum_weights=self._cum, k=k)


def _sampled(sample: Callable[[int], list[int]], block: int = 4096) -> Iterator[int]:
    while True:
        yield from sample(block)


# --------------------------------------------------------------------------- workloads


def _unique(opts: Options, seed: int) -> Iterator[Request]:
    rng = random.Random(f"unique:{seed}")
    bodies = _Bodies(opts)
    headers = tenant_headers(1, seed)[0]
    for i in itertools.count():
        stream = rng.random() < opts.stream_share
        text = f"{_prompt_text(rng)} (req {seed}-{i})"
        yield Request(bodies(text, stream, keep=False), stream, headers, i)


def _zipf(opts: Options, seed: int, tenants: int = 1) -> Iterator[Request]:
    rng = random.Random(f"zipf:{seed}")
    pool = prompt_pool(opts.pool, seed)
    bodies = _Bodies(opts)
    heads = tenant_headers(tenants, seed)
    ranks = _sampled(ZipfSampler(len(pool), opts.zipf_s, rng))
    # Tenants are skewed too (a few big customers), independent of the prompt.
    tenant_of = _sampled(ZipfSampler(tenants, 1.0, random.Random(f"tenant:{seed}")))
    for rank in ranks:
        t = next(tenant_of)
        stream = rng.random() < opts.stream_share
        yield Request(bodies(pool[rank], stream), stream, heads[t], rank, t)


def _tenants(opts: Options, seed: int) -> Iterator[Request]:
    return _zipf(opts, seed, tenants=max(1, opts.tenants))


def _paraphrase(opts: Options, seed: int) -> Iterator[Request]:
    rng = random.Random(f"paraphrase:{seed}")
    bodies = _Bodies(opts)
    headers = tenant_headers(1, seed)[0]
    questions = _sampled(ZipfSampler(len(PARAPHRASES), opts.zipf_s, rng))
    for q in questions:
        wording = rng.choice(PARAPHRASES[q])
        stream = rng.random() < opts.stream_share
        yield Request(bodies(wording, stream), stream, headers, q)


def _bursts(opts: Options, seed: int) -> Iterator[Request]:
    rng = random.Random(f"bursts:{seed}")
    bodies = _Bodies(opts)
    headers = tenant_headers(1, seed)[0]
    size = max(1, opts.burst)
    for g in itertools.count():
        text = f"{_prompt_text(rng)} (burst {seed}-{g})"
        for _ in range(size):
            stream = rng.random() < opts.stream_share
            yield Request(bodies(text, stream, keep=False), stream, headers, g)


def _trace68(opts: Options, seed: int, window: int = 8) -> Iterator[Request]:
    """Groups of identical requests; a group has geometric size with mean 1/(1-merge_share),
    so a share ``merge_share`` of all requests repeats one sent shortly before. Members of a
    group are scattered over the next ``window`` positions: real duplicates arrive close
    together, but interleaved with other traffic."""
    rng = random.Random(f"trace68:{seed}")
    bodies = _Bodies(opts)
    tenants = 4
    heads = tenant_headers(tenants, seed)
    p_new = 1.0 - min(max(opts.merge_share, 0.0), 0.99)
    pending: list[tuple[int, int, Request]] = []  # a heap of (position, tie, request)
    tie = itertools.count()
    for g in itertools.count():  # group g starts at position g
        size = 1
        while rng.random() >= p_new:
            size += 1
        text = f"{_prompt_text(rng)} (trace {seed}-{g})"
        t = rng.randrange(tenants)
        positions = [g] + [g + rng.randrange(1, window + 1) for _ in range(size - 1)]
        for p in positions:
            stream = rng.random() < opts.stream_share
            heapq.heappush(pending, (p, next(tie), Request(bodies(text, stream, keep=False), stream, heads[t], g, t)))
        # positions up to g are final: no later group can land before g + 1
        while pending and pending[0][0] <= g:
            yield heapq.heappop(pending)[2]


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("unique", "every prompt is new; nothing can merge", _unique),
        Workload("zipf", "Zipf(s) over a pool of prompts; hot prompts repeat", _zipf),
        Workload("paraphrase", "24 questions x 4 wordings, Zipf over questions", _paraphrase),
        Workload("bursts", "groups of --burst identical requests back to back", _bursts),
        Workload("stream", "the Zipf pool, half of the requests streaming", _zipf, default_stream_share=0.5,
                 sim={"tokens_per_s": 200.0, "reply_tokens": 20}),
        Workload("tenants", "the Zipf pool asked by --tenants tenants (keys) that never share", _tenants),
        Workload("trace68", "the design card's shape: ~68% duplicates of a request in flight, 30% streams, "
                 "4 tenants", _trace68, default_stream_share=0.3, sim={"tokens_per_s": 200.0, "reply_tokens": 20}),
    )
}


def get(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}") from None


def warmup_requests(opts: Options, seed: int) -> Iterator[Request]:
    """Unique prompts that never collide with a measured workload (opens connections only)."""
    return _unique(replace(opts, stream_share=0.0), seed + 10_000_019)
