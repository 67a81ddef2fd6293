"""Which language a message is in, and whether the embedding model can read it.

The verifier has tables for English only: a message in another language (another script,
or Latin letters with another language's function words) merges only when
normalized-equal. The default model (all-MiniLM-L6-v2) reads English; a configured model
declares its languages, and a language merges semantically only when the model declares
it AND the verifier has tables for it.
"""

from __future__ import annotations

import functools
import json
import unicodedata

from proxy.semantic import english
from proxy.semantic.english import words

#: Languages the verifier has tables for.
TABLES = {"en": english}

#: Function words of other languages written in Latin letters (none is an English word).
FOREIGN_WORDS = frozenset(words("""
le la les des est une pas je vous nous pour avec dans qui que et du au aux ne mon ma mes comment quel quelle
quels pourquoi cette sont suis avez puis peux sur leur
el los las es una por para con como cómo qué cuál dónde mi mis tu su sus del y está están puedo hay
cuando cuánto cuánta porque también pero muy ya eso esto
der das und ist nicht ich wie mein meine ein eine mit für auf zu kann bitte warum wo wann sie wir ihr
dem den des ob oder aber nur auch noch schon
não é você meu minha uma com são estou tem isso isto
il lo gli della delle sono perché questo questa anche molto
het een ik niet wat hoe waar mijn zijn
"""))
#: Letters never written in English.
_FOREIGN_MARKS = frozenset("¿¡ñßœæøåãõłđ")


@functools.lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """The whole words of the bundled model's WordPiece vocabulary."""
    try:
        from embeddings.embedder import default_tokenizer_path

        with open(default_tokenizer_path(), encoding="utf-8") as f:
            vocab = json.load(f)["model"]["vocab"]
    except (OSError, ValueError, KeyError):  # pragma: no cover - no vocabulary
        return frozenset()
    return frozenset(w for w in vocab if not w.startswith("##"))


@functools.lru_cache(maxsize=1)
def _known_chars() -> frozenset[str]:
    return frozenset(w for w in vocabulary() if len(w) == 1)


@functools.lru_cache(maxsize=65_536)
def _char_ok(ch: str) -> bool:
    """A character the default model reads (not its unknown piece) and that is Latin, a
    digit, a symbol or punctuation: BERT uncased strips accents before looking it up."""
    if ch.isspace() or ch.isascii():
        return True
    base = unicodedata.normalize("NFD", ch.lower())[0]
    if base.isalpha() and not unicodedata.name(base, "").startswith("LATIN"):
        return False
    if unicodedata.category(ch).startswith("M"):
        return True  # combining mark (our own letter-A marker)
    known = _known_chars()
    return not known or base in known or base.isascii()


def readable(text: str) -> bool:
    """Latin script with no piece the model would read as unknown."""
    return text.isascii() or all(_char_ok(ch) for ch in text)


def language(words: list[str]) -> str | None:
    """'en' for an English message in Latin letters; None for any other (or unknown)."""
    foreign = sum(w in FOREIGN_WORDS for w in words)
    native = sum(w in english.FUNCTION_WORDS for w in words)
    if foreign >= 2 and 2 * foreign >= native:
        return None
    if foreign and not native:
        return None
    letters = [ch for w in words for ch in w if ch.isalpha()]
    if any(ch in _FOREIGN_MARKS for ch in letters):
        return None
    if letters and sum(not ch.isascii() for ch in letters) * 10 > len(letters):
        return None
    if len(words) > 3 and not native:
        return None
    return "en"
