"""The matcher: merge keys and probes for the gateway, around the embedder."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from proxy.semantic.decide import MAX_CHARS, Decision, MatchConfig, Probe, decide
from proxy.semantic.normalize import normalize

if TYPE_CHECKING:  # pragma: no cover
    from embeddings.batcher import BatchingEmbedder


class Matcher:
    def __init__(
        self,
        embedder: BatchingEmbedder | None,
        config: MatchConfig | None = None,
        *,
        fits: Callable[[str, int], bool] | None = None,
    ) -> None:
        """`fits(text, limit)`: the window check, by default the embedder's tokenizer's."""
        self.embedder = embedder
        self.config = config or MatchConfig()
        inner = getattr(embedder, "embedder", None)
        self._fits = fits or getattr(inner, "fits", None)
        limit = getattr(inner, "max_tokens", None)
        self.max_tokens = min(self.config.max_tokens, limit) if limit else self.config.max_tokens

    def fits(self, text: str) -> bool:
        """Within the embedder's window (special tokens counted)? Cheap; no embedding."""
        if len(text) > MAX_CHARS:
            return False
        if self._fits is not None:
            return bool(self._fits(text, self.max_tokens))
        return len(text.split()) + 2 <= self.max_tokens  # each word is at least one piece

    def key(self, text: str) -> str:
        """The merge key of a final message: its normalized form if it fits the window, else
        the text itself (an over-window message merges only when identical)."""
        return normalize(text) if self.fits(text) else "\x00" + text

    def prepare(self, text: str) -> Probe:
        """A probe without a vector (no embedding): enough for normalized-equal matches."""
        fits = self.fits(text)
        return Probe(text=text, key=normalize(text) if fits else "\x00" + text, vector=None, fits=fits)

    async def probe(self, text: str) -> Probe:
        p = self.prepare(text)
        if not p.fits or self.embedder is None:
            return p
        return p.with_vector(await self.embedder.embed(text))

    def probe_with_vector(self, text: str, vector: np.ndarray | None) -> Probe:
        """A probe from a vector computed elsewhere (batch evaluation)."""
        p = self.prepare(text)
        return p.with_vector(vector) if p.fits and vector is not None else p

    def decide(self, a: Probe, b: Probe) -> Decision:
        return decide(a, b, self.config)
