"""Align two final messages and verify that every difference between them is neutral.

A message becomes a *form*: its pieces in order after the language's tables removed or
rewrote what never changes an answer (openers and closers, request frames, question
frames, articles, contractions, inflections, a few synonyms and spellings). Two forms
verify when they are equal, or the same length with every differing position a
misspelling of the same word. Anything else (a word added, dropped, replaced or moved)
is a difference the tables cannot prove neutral, and the pair is refused: word order is
meaning ("lose fat and gain muscle", "from 10 to 1").

Everything is a function of one message, memoized per word, so a form is computed once
per message and only for messages that meet a candidate.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

from proxy.semantic import english as en
from proxy.semantic.english import words
from proxy.semantic.normalize import CLAUSE, LETTER_A, SENTENCE, Piece, pieces
from proxy.semantic.script import language, readable, vocabulary

WORD_MEMO = 65_536
INFO_NEXT = frozenset(words("what which who whom whose when where why how if whether"))
INFO_FRAMES = frozenset(p for p in en.REQUEST_FRAMES if {"tell", "know", "idea"} & set(p))
_QUESTION_START = frozenset(words("is are am was were do does did can could should would will may might must have has"))
_QUESTION_WORDS = INFO_NEXT | _QUESTION_START
#: Weak openers that, before a question, may still be part of it ("right can I turn on red")
_CONTENT_OPENERS = frozenset((w,) for w in words("right well morning afternoon evening question"))


@dataclass(frozen=True)
class Form:
    """One message as the verifier sees it."""

    language: str | None  # "en", or None: no tables apply (only normalized-equal merges)
    readable: bool  # the model reads every character (Latin script, no unknown pieces)
    words: tuple[str, ...]  # the pieces left after the tables, in order

    @property
    def usable(self) -> bool:
        return self.readable and self.language is not None and bool(self.words)


def analyse(text: str) -> Form:
    ps = pieces(text)
    plain = [p.text for p in ps if not p.quoted and p.text not in (SENTENCE, CLAUSE)]
    lang = language(plain)
    ok = readable(text)
    if lang != "en" or not ok:
        return Form(lang, ok, tuple(p.text for p in ps if p.text not in (SENTENCE, CLAUSE)))
    return Form(lang, ok, english_form(ps))


def _starts(seq: list[str], phrase: tuple[str, ...]) -> bool:
    return len(seq) >= len(phrase) and tuple(seq[: len(phrase)]) == phrase


def _strip_opening(seq: list[str]) -> bool:
    """Drop one opener or request frame from the start of a sentence; True if one was."""
    for p in en.OPENERS:
        if _starts(seq, p):
            del seq[: len(p)]
            if seq and seq[0] == CLAUSE:
                del seq[0]
            return True
    for p in en.WEAK_OPENERS:  # only before a comma or a question, or as the whole sentence
        if _starts(seq, p) and (len(seq) == len(p) or seq[len(p)] == CLAUSE):
            del seq[: len(p) + 1]
            return True
        if (_starts(seq, p) and len(seq) > len(p) + 1 and seq[len(p)] in _QUESTION_WORDS
                and p not in _CONTENT_OPENERS):
            del seq[: len(p)]
            return True
    for p in en.REQUEST_FRAMES:
        if _starts(seq, p) and len(seq) > len(p):
            if p in INFO_FRAMES and seq[len(p)] not in INFO_NEXT:
                continue
            del seq[: len(p)]
            if p in INFO_FRAMES and len(seq) > 2 and seq[1] in ("i", "we") and seq[2] not in _QUESTION_START:
                seq.insert(1, "do")  # "tell me how I register" = "how do I register"
            return True
    return False


def _strip_closing(seq: list[str]) -> bool:
    """Drop one closer ("thanks", "please") that ends a sentence after a comma, or is one."""
    for p in en.CLOSERS:
        n = len(p)
        if len(seq) >= n and tuple(seq[-n:]) == p and (len(seq) == n or seq[-n - 1] == CLAUSE):
            del seq[-n - 1 :]
            return True
    return False


def _unfront(seq: list[str]) -> list[str]:
    """A phrase fronted before a comma moves back to the end of its sentence:
    "in the app, how do I X" -> "how do I X in the app"."""
    if seq and seq[0] in en.FRONTED and CLAUSE in seq[1:7]:
        k = seq.index(CLAUSE)
        rest = seq[k + 1 :]
        if rest and CLAUSE not in seq[1:k] and rest[0] in _QUESTION_WORDS:
            return rest + seq[:k]
    return seq




def _sentences(seq: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for w in seq:
        if w == SENTENCE:
            out.append([])
        else:
            out[-1].append(w)
    return [s for s in out if s]


_MAX_FRAME = max(len(p) for p in en.FRAMES)


def english_form(ps: tuple[Piece, ...]) -> tuple[str, ...]:
    # quoted spans become one literal piece each, never touched by the tables
    seq = [('"' + p.text + '"') if p.quoted else p.text for p in ps if p.text not in en.HESITATIONS or p.quoted]
    kept: list[str] = []
    for sentence in _sentences(seq):
        while sentence and sentence[0] == CLAUSE:
            del sentence[0]
        while sentence and (_strip_opening(sentence) or _strip_closing(sentence)):
            pass
        kept.extend(_unfront(sentence))
    seq = [w for w in kept if w != CLAUSE]
    out: list[str] = []
    i = 0
    while i < len(seq):
        for n in range(min(_MAX_FRAME, len(seq) - i), 0, -1):
            canon = en.FRAMES.get(tuple(seq[i : i + n]))
            if canon is not None and (i + n == len(seq) or seq[i + n] not in en.STATIVE):
                out.extend(canon)
                i += n
                break
        else:
            out.append(seq[i])
            i += 1
    words: list[str] = []
    prev = ""
    for w in out:
        if w in en.NEUTRAL and prev not in en.KEEP_AFTER:
            prev = w
            continue
        prev = w
        words.append(canonical(w))
    return tuple(words)


@functools.lru_cache(maxsize=WORD_MEMO)
def canonical(w: str) -> str:
    """One English word to its canonical form: numbers, spelling, inflection, synonym."""
    if w.startswith('"') or w == LETTER_A:
        return w
    if w in en.NUMBERS:
        return en.NUMBERS[w]
    if w in en.ORDINALS:
        return en.ORDINALS[w]
    w = en.SPELLINGS.get(w, w)
    w = en.ANALYSE.get(w, w)
    w = _ize(w)
    w = _singular(w)
    return en.SYNONYMS.get(w, w)


def _ize(w: str) -> str:
    for suffix, us in (("ise", "ize"), ("ised", "ized"), ("ises", "izes"), ("ising", "izing"),
                       ("isation", "ization"), ("isations", "izations")):
        if w.endswith(suffix) and w[: -len(suffix)] in en.IZE_STEMS:
            return w[: -len(suffix)] + us
    return w


def _singular(w: str) -> str:
    """A plural noun (or a verb's -s form) to the word without it, when the vocabulary knows
    that word; otherwise the word itself."""
    if len(w) < 4 or not w.endswith("s") or w in en.NOT_PLURAL or w.endswith(("ss", "us", "is")) or not w.isalpha():
        return w
    vocab = vocabulary()
    candidates: tuple[str, ...]
    if w.endswith("ies"):
        candidates = (w[:-3] + "y", w[:-1])
    elif w.endswith("es"):
        candidates = (w[:-1], w[:-2])
    else:
        candidates = (w[:-1],)
    for c in candidates:
        if c in vocab:
            return c
    # an unknown word (a misspelt plural: "mondys") loses its s, so the misspelling of
    # the singular can be recognised; a known word keeps it
    return w[:-1] if vocab and w not in vocab else w


# ---------------------------------------------------------------------------------------
# misspellings
# ---------------------------------------------------------------------------------------

_AFFIXES = ("un", "non", "dis", "in", "im", "il", "ir", "de", "anti", "counter", "mis", "re", "over", "under")
_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
#: Letters next to each other on a QWERTY keyboard (same row, or the rows above and below).
_NEIGHBOURS: dict[str, frozenset[str]] = {}
for _r, _row in enumerate(_ROWS):
    for _c, _ch in enumerate(_row):
        near = {_row[i] for i in (_c - 1, _c + 1) if 0 <= i < len(_row)}
        for _other in (_r - 1, _r + 1):
            if 0 <= _other < len(_ROWS):
                near |= {_ROWS[_other][i] for i in (_c - 1, _c, _c + 1) if 0 <= i < len(_ROWS[_other])}
        _NEIGHBOURS[_ch] = frozenset(near)
_FAR = 3  # the cost of replacing a letter by one not next to it: never a typo


def _edit_distance(a: str, b: str, limit: int) -> int:
    """Typing distance (optimal string alignment), stopping early above `limit`: a letter
    dropped or added, two neighbours swapped, or a letter replaced by a key next to it cost
    1; a letter replaced by a distant one (nitrate/nitrite, stationary/stationery) is a
    different word, not a typo. Symmetric."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] | None = None
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            x, y = a[i - 1], b[j - 1]
            cost = 0 if x == y else 1 if y in _NEIGHBOURS.get(x, ()) else _FAR
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if prev2 is not None and i > 1 and j > 1 and x == b[j - 2] and a[i - 2] == y:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


def typo(x: str, y: str) -> bool:
    """One of the two is a misspelling of the other: not a word the model knows, one typing
    slip away (see _edit_distance), same first letter; the other a known word.
    Symmetric."""
    return _typo(*sorted((x, y)))


@functools.lru_cache(maxsize=WORD_MEMO)
def _typo(x: str, y: str) -> bool:
    if x == y or x[:1] != y[:1] or not (x.isalpha() and y.isalpha() and x.isascii() and y.isascii()):
        return False
    vocab = vocabulary()
    if (x in vocab) == (y in vocab):  # two real words, or two the model does not know
        return False
    if any(y == p + x or x == p + y for p in _AFFIXES):
        return False
    shorter = min(len(x), len(y))
    # one slip: two (a letter dropped here, another added there) can spell another word
    # (chlorine/chloride, stationary/stationery)
    limit = 1 if shorter >= 5 else 0
    if limit == 0:
        if shorter == 4 and abs(len(x) - len(y)) == 1:
            short, long_ = (x, y) if len(x) < len(y) else (y, x)
            # a doubled letter written once: "aply" for "apply"
            return any(long_[i] == long_[i + 1] and short == long_[:i] + long_[i + 1 :] for i in range(len(long_) - 1))
        return False
    return _edit_distance(x, y, limit) <= limit


# ---------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    neutral: bool
    why: str


def verify(a: Form, b: Form, explain: bool = True) -> Verdict:
    """Whether every difference between the two forms is neutral. Symmetric: it looks at
    the pair only through symmetric tests (equality, sorted pairs, multisets).
    explain=False skips listing the differences of a refused pair (the index's case)."""
    if not a.readable or not b.readable:
        return Verdict(False, "text the model cannot read (another script or unknown pieces)")
    if a.language is None or b.language is None:
        return Verdict(False, "not English: no tables, only normalized-equal merges")
    if not a.words or not b.words:
        return Verdict(False, "nothing left after the tables (greeting or thanks only)")
    if a.words == b.words:
        return Verdict(True, "equal after the tables")
    if len(a.words) == len(b.words):
        pairs = [(x, y) for x, y in zip(a.words, b.words) if x != y]
        if all(typo(x, y) for x, y in pairs):
            return Verdict(True, "misspelling: " + ", ".join("/".join(sorted(p)) for p in pairs))
    if not explain:
        return Verdict(False, "not neutral")
    if sorted(a.words) == sorted(b.words):
        return Verdict(False, "same words in another order")
    return Verdict(False, describe(a.words, b.words))


def describe(a: tuple[str, ...], b: tuple[str, ...]) -> str:
    """The differences, listed in a symmetric way (the two sides sorted)."""
    x, y = sorted((a, b))
    parts = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, x, y, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        left, right = " ".join(x[i1:i2]) or "-", " ".join(y[j1:j2]) or "-"
        parts.append("/".join(sorted((left, right))))
    return "not neutral: " + "; ".join(parts[:6])
