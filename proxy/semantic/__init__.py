"""Semantic matching of final user messages: one merge rule, :func:`decide`.

    normalize.py   the merge key; pieces (words, quoted spans) for the verifier
    english.py     English tables: openers, frames, neutral words, synonyms, spellings
    script.py      language and readability (script, the model's unknown pieces)
    verify.py      forms, alignment, misspellings: is every difference neutral?
    decide.py      Probe, MatchConfig, decide(a, b): the rule the proxy, `herd eval` and
                   the tests all call
    index.py       SemanticIndex: a group's vectors; candidates for decide()
    matcher.py     Matcher: keys and probes around the embedder
    evaluate.py    `herd eval`

No HTTP and no model here: the embedder is reached through
:class:`embeddings.batcher.BatchingEmbedder`.
"""

from proxy.semantic.decide import (
           DEFAULT_THRESHOLD,
           Decision,
           MatchConfig,
           Probe,
           decide,
)
from proxy.semantic.index import SemanticIndex
from proxy.semantic.matcher import Matcher
from proxy.semantic.normalize import normalize

__all__ = ["DEFAULT_THRESHOLD", "Decision", "MatchConfig", "Matcher", "Probe", "SemanticIndex", "decide",
           "normalize"]
