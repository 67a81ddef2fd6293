"""The messages of ONE group (scope + history): their vectors as a matrix, for candidates."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from proxy.semantic.decide import Probe, decide

if TYPE_CHECKING:  # pragma: no cover
    from proxy.semantic.matcher import Matcher


class SemanticIndex:
    """add / remove / best. The embedding ranks the entries; decide() chooses among the
    nearest few above the threshold, so verification runs only on candidates."""

    def __init__(self, matcher: Matcher) -> None:
        self.matcher = matcher
        self._ids: list[str] = []
        self._probes: list[Probe] = []
        self._row: dict[str, int] = {}
        self._matrix: np.ndarray | None = None
        self._keys: dict[str, list[str]] = {}
        self._exact_only: dict[str, Probe] = {}

    def __len__(self) -> int:
        return len(self._ids) + len(self._exact_only)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._row or item_id in self._exact_only

    def add(self, item_id: str, probe: Probe) -> None:
        if item_id in self:
            self.remove(item_id)
        self._keys.setdefault(probe.key, []).append(item_id)
        if probe.vector is None:
            self._exact_only[item_id] = probe
            return
        vec = np.asarray(probe.vector, dtype=np.float32).reshape(-1)
        n = len(self._ids)
        if self._matrix is None:
            self._matrix = np.empty((8, vec.shape[0]), dtype=np.float32)
        elif n == self._matrix.shape[0]:
            grown = np.empty((n * 2, self._matrix.shape[1]), dtype=np.float32)
            grown[:n] = self._matrix[:n]
            self._matrix = grown
        self._matrix[n] = vec
        self._ids.append(item_id)
        self._probes.append(probe)
        self._row[item_id] = n

    def remove(self, item_id: str) -> None:
        probe = self._exact_only.pop(item_id, None)
        if probe is None:
            row = self._row.pop(item_id, None)
            if row is None:
                return
            probe = self._probes[row]
            last = len(self._ids) - 1
            if row != last:  # move the last row into the hole
                assert self._matrix is not None
                self._matrix[row] = self._matrix[last]
                self._ids[row] = self._ids[last]
                self._probes[row] = self._probes[last]
                self._row[self._ids[row]] = row
            self._ids.pop()
            self._probes.pop()
        ids = self._keys.get(probe.key)
        if ids is not None:
            try:
                ids.remove(item_id)
            except ValueError:
                pass
            if not ids:
                del self._keys[probe.key]

    def best(self, probe: Probe) -> tuple[str, float] | None:
        """The nearest entry that decide() lets `probe` merge with, and its similarity."""
        same = self._keys.get(probe.key)
        if same:
            return same[0], 1.0
        if probe.vector is None or not self._ids or self._matrix is None:
            return None
        cfg = self.matcher.config
        n = len(self._ids)
        scores = self._matrix[:n] @ np.asarray(probe.vector, dtype=np.float32).reshape(-1)
        above = np.flatnonzero(scores >= cfg.threshold - 1e-6)
        if not len(above):
            return None
        order = above[np.argsort(-scores[above], kind="stable")][: cfg.candidates]
        for row in order:
            d = decide(probe, self._probes[int(row)], cfg, explain=False)
            if d.merge:
                return self._ids[int(row)], float(d.score if d.score is not None else scores[row])
        return None
