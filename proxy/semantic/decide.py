"""The one merge rule: :func:`decide`. The proxy, `herd eval` and the tests all call it.

Two final user messages (whose requests are otherwise identical) merge when

* they are equal after :func:`~proxy.semantic.normalize.normalize` (any language), or
* both fit the embedder's window, both are in a language the model reads and the
  verifier has tables for, the verifier finds every difference between them neutral
  (:func:`~proxy.semantic.verify.verify`), and their cosine similarity reaches the
  threshold (the embedding finds candidates and is a second witness; the difference
  decides).

decide(a, b) == decide(b, a): every step is symmetric in a and b.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from proxy.semantic.script import TABLES
from proxy.semantic.verify import Form, Verdict, analyse, verify

#: Chosen by the threshold sweep in benchmarks/SEMANTIC.md (herd eval).
DEFAULT_THRESHOLD = 0.40
DEFAULT_MAX_TOKENS = 256
#: The languages the bundled model (all-MiniLM-L6-v2) reads.
DEFAULT_LANGUAGES = ("en",)
#: How many of the nearest entries above the threshold the index verifies.
DEFAULT_CANDIDATES = 8
#: Texts longer than this many characters are treated as over the window without tokenizing.
MAX_CHARS = 20_000


@dataclass
class MatchConfig:
    threshold: float = DEFAULT_THRESHOLD
    max_tokens: int = DEFAULT_MAX_TOKENS
    languages: tuple[str, ...] = DEFAULT_LANGUAGES  # what the model declares it reads
    candidates: int = DEFAULT_CANDIDATES

    def __post_init__(self) -> None:
        if not 0.0 < float(self.threshold) <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        self.threshold = float(self.threshold)
        self.languages = tuple(self.languages)

    @classmethod
    def from_settings(cls, cfg: Any, max_tokens: int | None = None) -> MatchConfig:
        """From [coalesce]: `threshold`, and `model_languages` if the config has it."""
        threshold = getattr(cfg, "threshold", None)
        languages = getattr(cfg, "model_languages", None) or DEFAULT_LANGUAGES
        return cls(
            threshold=DEFAULT_THRESHOLD if threshold is None else float(threshold),
            max_tokens=int(max_tokens or DEFAULT_MAX_TOKENS),
            languages=tuple(languages),
        )


@dataclass(frozen=True)
class Probe:
    """One final user message, ready to compare."""

    text: str
    key: str  # merge key: normalized if it fits the window, else the text itself
    vector: np.ndarray | None  # None: over the window (or not embedded): exact matches only
    fits: bool = True
    _form: list = field(default_factory=list, repr=False, compare=False)  # memo: [Form]

    @property
    def normalized(self) -> str:
        return self.key

    @property
    def form(self) -> Form:
        """The verifier's view of the message, computed on first use (only messages that
        meet a candidate pay for it) and kept."""
        if not self._form:
            self._form.append(analyse(self.text))
        return self._form[0]

    def with_vector(self, vector: np.ndarray | None) -> Probe:
        return replace(self, vector=vector, _form=self._form)


@dataclass(frozen=True)
class Decision:
    merge: bool
    reason: str
    score: float | None = None  # cosine similarity, when both have a vector
    normalized_equal: bool = False
    verified: bool = False  # every difference neutral (the verifier)
    eligible: bool = False  # both fit, both readable, in a language with tables, both embedded

    def at(self, threshold: float) -> bool:
        """What decide() answers at another threshold (for sweeps)."""
        return self.normalized_equal or (
            self.eligible and self.verified and self.score is not None and self.score >= threshold)


def decide(a: Probe, b: Probe, config: MatchConfig | None = None, *, explain: bool = True) -> Decision:
    """May a and b share one answer? Symmetric by construction. explain=False (the index)
    leaves out the list of differences of a refused pair; the answer is the same."""
    cfg = config or MatchConfig()
    if a.key == b.key:
        return Decision(True, "normalized-equal", 1.0, normalized_equal=True, verified=True, eligible=True)
    if not (a.fits and b.fits):
        return Decision(False, "over the embedder's window: identical text only")
    score = float(np.dot(a.vector, b.vector)) if a.vector is not None and b.vector is not None else None
    fa, fb = a.form, b.form
    if not (fa.readable and fb.readable):
        v = Verdict(False, "text the model cannot read (another script or unknown pieces)")
    elif fa.language not in cfg.languages or fb.language not in cfg.languages:
        v = Verdict(False, "a language the model does not declare: only normalized-equal merges")
    elif fa.language not in TABLES or fb.language not in TABLES:
        v = Verdict(False, "no verifier tables for this language: only normalized-equal merges")
    else:
        v = verify(fa, fb, explain)
    eligible = score is not None and fa.usable and fb.usable
    decision = Decision(False, v.why, score, verified=v.neutral, eligible=eligible)
    if not v.neutral:
        return decision
    if score is None:
        return replace(decision, reason=v.why + "; no vector")
    if score < cfg.threshold:
        return replace(decision, reason=f"{v.why}; similarity {score:.3f} below {cfg.threshold:.2f}")
    return replace(decision, merge=True)
