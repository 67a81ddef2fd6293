"""Normalization: the differences that never change an answer, in any language.

:func:`normalize` is the merge key of a final message: two messages with the same key
merge without an embedding. It folds case, whitespace, sentence punctuation, quotes and
apostrophes (don't = dont) and thousands separators; symbols that carry meaning stay
(+ # $ % & * / = < > @, currency signs), as do . , : between digits and a hyphen next to
a digit. Text inside backticks (code) is kept verbatim.

:func:`pieces` splits a message into the pieces the verifier aligns: words (case folded,
English contractions expanded) and quoted spans, which stay whole and literal.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

_CODE_SPAN = re.compile(r"```.*?```|`[^`\n]+`", re.DOTALL)
_APOSTROPHES = re.compile(r"['\u2018\u2019\u02bc\u2032`\u00b4]")
_ZERO_WIDTH = re.compile(r"[\u200b-\u200f\u2060\ufeff\u00ad]")
# Thousands separators: 1,000 -> 1000 (only before exactly three digits).
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# Punctuation that separates words. Between two digits . , : stay (3.5, 10:30); a hyphen
# stays next to a digit (covid-19, -5) and becomes a space between letters.
_SEPARATORS = re.compile(
    r"(?<!\d)[.,:](?!\d)|(?<=\d)[.,:](?!\d)|(?<!\d)[.,:](?=\d)"
    r"|[;!?\"()\[\]{}\u00a1\u00bf\u00ab\u00bb\u2010-\u2015\u201a-\u201f\u2026\u3001\u3002\u300c-\u300f\uff01\uff0c\uff1a\uff1b\uff1f\uff61-\uff64]"
    r"|(?<![\d\s])-(?!\d)|(?<!\d\s)(?<=\s)-(?=\s)(?!\s\d)|^-(?=\s)|(?<=[^\W\d_])-$"
)
_SPACES = re.compile(r"\s+")


def _normalize_plain(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _ZERO_WIDTH.sub("", text)
    text = _APOSTROPHES.sub("", text)
    text = _THOUSANDS.sub("", text)
    text = _SEPARATORS.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def normalize(text: str) -> str:
    """The text with differences that never change an answer folded away (the merge key).

    Pure and cheap: the caller uses it as a merge key before any embedding.
    """
    if "`" not in text:
        return _normalize_plain(text)
    out: list[str] = []
    pos = 0
    for m in _CODE_SPAN.finditer(text):
        out.append(_normalize_plain(text[pos : m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(_normalize_plain(text[pos:]))
    return " ".join(p for p in out if p)


# ---------------------------------------------------------------------------------------
# pieces for the verifier
# ---------------------------------------------------------------------------------------

#: A quoted span: ```code```, `code`, "text", “text”, 'text' (two or more characters, not
#: an apostrophe inside a word). Its content is compared literally, never through tables.
_QUOTED = re.compile(
    r"```(.*?)```|`([^`\n]+)`|\"([^\"\n]{1,200})\"|\u201c([^\u201d\n]{1,200})\u201d"
    r"|(?<!\w)['\u2018]([^'\u2018\u2019\n]{2,200})['\u2019](?!\w)",
    re.DOTALL,
)
#: A capital A that is not the first word of a sentence is a letter (vitamin A, plan A),
#: not the article: it is marked so that the tables never drop it.
_LETTER_A = re.compile(r"(?<![.!?:;\n]\s)(?<=[\w,)]\s)A\b(?!['\u2019])")
LETTER_A = "a\u0332"  # a with a combining low line: never an article

#: English contractions (apostrophes already unified to ').
_CONTRACTIONS = {
    "can't": "can not", "cannot": "can not", "won't": "will not", "shan't": "shall not", "ain't": "is not",
    "let's": "let us", "it's": "it is", "that's": "that is", "what's": "what is", "where's": "where is",
    "who's": "who is", "how's": "how is", "there's": "there is", "here's": "here is", "he's": "he is",
    "she's": "she is", "when's": "when is", "why's": "why is",
    # without the apostrophe, as typed on phones (only forms that are not words themselves)
    "dont": "do not", "doesnt": "does not", "didnt": "did not", "isnt": "is not", "arent": "are not",
    "wasnt": "was not", "werent": "were not", "couldnt": "could not", "shouldnt": "should not",
    "wouldnt": "would not", "havent": "have not", "hasnt": "has not", "hadnt": "had not", "mustnt": "must not",
    "whats": "what is", "thats": "that is", "im": "i am", "ive": "i have", "youre": "you are",
    "theyre": "they are", "youve": "you have", "theyve": "they have", "weve": "we have", "hows": "how is",
    "wheres": "where is", "whos": "who is",
}
_SUFFIXES = (("n't", " not"), ("'re", " are"), ("'ve", " have"), ("'ll", " will"), ("'d", " would"), ("'m", " am"))


@dataclass(frozen=True)
class Piece:
    text: str
    quoted: bool = False


@functools.lru_cache(maxsize=16_384)
def expand(word: str) -> tuple[str, ...]:
    """One case-folded word (apostrophes as ') to its words: contractions expanded,
    a possessive 's dropped (Mary's -> mary; residents' -> residents)."""
    if word in _CONTRACTIONS:
        return tuple(_CONTRACTIONS[word].split())
    if "'" in word:
        for suffix, full in _SUFFIXES:
            if word.endswith(suffix) and len(word) > len(suffix):
                return (*expand(word[: -len(suffix)]), *full.split())
        word = word.removesuffix("'s")
        word = word.replace("'", "")
    return (word,) if word else ()


_WORD_SPLIT = re.compile(
    r"(?<!\d)[.,:](?!\d)|(?<=\d)[.,:](?!\d)|(?<!\d)[.,:](?=\d)"
    r"|[;!?\"()\[\]{}\u00a1\u00bf\u00ab\u00bb\u2010-\u2015\u201a-\u201f\u2026\u3001\u3002\u300c-\u300f\uff01\uff0c\uff1a\uff1b\uff1f\uff61-\uff64]"
    r"|(?<![\d\s])-(?!\d)|(?<!\d\s)(?<=\s)-(?=\s)(?!\s\d)|^-(?=\s)|(?<=[^\W\d_])-$"
)


#: Breaks between sentences and clauses, kept as pieces of their own for the tables
#: (openers end at a comma; a fronted phrase ends at one); never compared.
SENTENCE = "\x01"
CLAUSE = "\x02"
_SENTENCE_END = re.compile(
    r"(?<=[^\W\d_])\.(?=\s|$)|(?<=\d)\.(?=\s|$)|[!?\u3002\uff01\uff1f]+|\n\s*\n|\n(?=\s*[-*\u2022\d])"
)
_CLAUSE_END = re.compile(r"[,;:\u3001\uff0c\uff1b\uff1a](?=\s|$)|\s[-\u2013\u2014]+\s")


def _words(segment: str) -> list[Piece]:
    segment = _SENTENCE_END.sub(f" {SENTENCE} ", segment)
    segment = _CLAUSE_END.sub(f" {CLAUSE} ", segment)
    segment = _LETTER_A.sub(LETTER_A, segment)
    segment = unicodedata.normalize("NFKC", segment).casefold()
    segment = _ZERO_WIDTH.sub("", segment)
    segment = re.sub(r"['\u2018\u2019\u02bc\u2032\u00b4]", "'", segment)
    segment = _THOUSANDS.sub("", segment)
    segment = _WORD_SPLIT.sub(" ", segment)
    out: list[Piece] = []
    for raw in segment.split():
        if raw in (SENTENCE, CLAUSE):
            out.append(Piece(raw))
            continue
        raw = raw.strip("'")
        for w in expand(raw):
            out.append(Piece(w))
    return out


def pieces(text: str) -> tuple[Piece, ...]:
    """The message as pieces in order: words outside quotes, whole quoted spans."""
    if not any(q in text for q in "`\"\u201c'\u2018"):
        return tuple(_words(text))
    out: list[Piece] = []
    pos = 0
    for m in _QUOTED.finditer(text):
        out.extend(_words(text[pos : m.start()]))
        inner = next(g for g in m.groups() if g is not None)
        literal = _SPACES.sub(" ", unicodedata.normalize("NFKC", inner).casefold()).strip()
        if literal:
            out.append(Piece(literal, quoted=True))
        pos = m.end()
    out.extend(_words(text[pos:]))
    return tuple(out)
