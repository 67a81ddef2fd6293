"""English tables for the verifier: what may differ between two messages without
changing what they ask.

Every entry is a claim that a difference is meaning-neutral, so the tables are short and
each entry is vetted: when in doubt a word is left out (a missed merge costs one upstream
call; a wrong one serves a wrong answer). Written for herd; no pair of any benchmark is
listed here.
"""

from __future__ import annotations


def words(spec: str) -> list[str]:
    """The whitespace-separated words of `spec`."""
    return spec.split()


def _phrases(spec: str) -> tuple[tuple[str, ...], ...]:
    """Phrases, one per line or separated by '|', longest first."""
    out = {tuple(p.split()) for line in spec.strip().splitlines() for p in line.split("|") if p.strip()}
    return tuple(sorted(out, key=lambda p: (-len(p), p)))


def _groups(spec: dict[str, str]) -> dict[str, str]:
    """{canonical: "word word ..."} -> {word: canonical}."""
    out: dict[str, str] = {}
    for canon, listed in spec.items():
        for w in words(listed):
            if w in out:
                raise ValueError(f"{w!r} listed twice")
            out[w] = canon
    return out


#: Openers dropped from the start of a sentence (repeatedly, in any order): greetings,
#: apologies, hesitation, "quick question". Only at the start: "say hello in French" keeps
#: its hello.
OPENERS = _phrases("""
hi | hello | hey | hiya | greetings | hi there | hello there | hey there | hi all | hello all | hi team | hello team
hi everyone | hello everyone | sorry to bother you | sorry to trouble you | excuse me
quick question | a quick question | just a quick question | i have a question | i have a quick question
just wondering | i was wondering | i was just wondering | i am wondering | i wonder
so | ok | okay | ok so | okay so | oh | right so | but | and | but so
""")
#: Openers that are also ordinary words ("evening classes", "yes or no", "ER"): dropped
#: only before a comma, at the end of the sentence, or before a question word or auxiliary
#: ("yeah can I ...", "er how do I ...").
WEAK_OPENERS = _phrases("""
good morning | good afternoon | good evening | morning | afternoon | evening | yeah | yes | right | well
sorry | quick one | a quick one | silly question | a silly question | stupid question | a stupid question
dumb question | a dumb question | random question | question | wondering | thanks | thank you | please
er
""")

#: Closers dropped from the end of a sentence after a comma (or as a sentence of their own):
#: thanks, please.
CLOSERS = _phrases("""
please | thanks | thank you | thank you very much | thank you so much | thanks a lot | thanks so much
thanks in advance | thank you in advance | many thanks | cheers | thx | ty | if possible | if you can
if you do not mind | thanks again
""")

#: Request frames dropped from the start of a message (after openers): what follows is
#: the request itself ("could you summarise X" = "summarise X").
REQUEST_FRAMES = _phrases("""
please | kindly | can you | could you | would you | will you | can you please | could you please
would you please | will you please | please can you | please could you | i want you to | i need you to
i would like you to | would you be able to | can you help me | could you help me
tell me | please tell me | can you tell me | could you tell me | would you tell me | can you please tell me
could you please tell me | do you know | i want to know | i would like to know | i need to know
i would love to know | any idea | do you have any idea
""")

#: Phrases rewritten to one canonical phrase wherever they occur.
_FRAME_SPEC = {
    "how do i": """how can i | how could i | how should i | how would i | how to | how does one | how can one
                   how do i go about | how would one | how should one""",
    "where do i": "where can i | where could i | where should i",
    "who do i": "who should i | who can i",
    "what do i": "what should i",
    "do you have": "have you got",
    "can i": "could i | may i | am i able to | is it possible for me to",
    "log in": "login | sign in | signin | log on | logon",
    "log out": "logout | sign out | signout | log off | logoff",
    "set up": "setup",
    "email": "e mail",
    "ok": "okay",
}
FRAMES: dict[tuple[str, ...], tuple[str, ...]] = {
    tuple(p.split()): tuple(canon.split())
    for canon, spec in _FRAME_SPEC.items()
    for line in spec.splitlines() for p in line.split("|") if p.strip()
}

#: Verbs after which "how do I" is not "how can I" ("how do I look?" asks for an opinion,
#: "how can I look ..." for a method): a question frame before them is not rewritten.
STATIVE = frozenset(words("""look looks feel feels seem seems sound sounds smell smells taste tastes appear
be live know knew like love"""))

#: Hesitation sounds: not words, dropped wherever they occur (outside quotes).
HESITATIONS = frozenset(words("um umm ummm uh uhh uhm erm hmm hmmm"))

#: Prepositions that open a phrase a question may front before a comma ("In the app
#: settings, how do I ..." = "How do I ... in the app settings?"): the phrase moves back.
FRONTED = frozenset(words("in on at for to from near with by after before during inside outside"))

#: Words dropped wherever they occur: articles, the present tense of "be" (word order
#: between question and statement is carried by the words around it), politeness.
#: Not "a" marked as a letter (vitamin A) and not inside quotes.
NEUTRAL = frozenset(words("a an the is are am please kindly"))
#: ... except right after these words ("how do I say please in Italian").
KEEP_AFTER = frozenset(words("say says saying word words spell spelling mean means pronounce translate"))

#: Synonyms: a word and its canonical form. Only words that swap freely in requests.
SYNONYMS = _groups({
    "delete": "remove erase",
    "fix": "repair",
    "buy": "purchase",
    "start": "begin",
    "movie": "film",
    "car": "automobile",
    "big": "large",
    "tv": "television",
    "photo": "photograph",
    "get": "obtain",
    "fastest": "quickest",
    "change": "modify",
    "mom": "mum",
    "math": "maths",
    "shop": "store",
    "quote": "quotation",
})

#: British spellings to American ones (and the reverse pairs they stand for).
SPELLINGS = {
    "colour": "color", "colours": "colors", "favourite": "favorite", "favourites": "favorites",
    "centre": "center", "centres": "centers", "theatre": "theater", "theatres": "theaters", "tyre": "tire",
    "tyres": "tires", "licence": "license", "defence": "defense", "offence": "offense", "programme": "program",
    "programmes": "programs", "catalogue": "catalog", "grey": "gray", "aluminium": "aluminum",
    "jewellery": "jewelry", "behaviour": "behavior", "neighbour": "neighbor", "neighbours": "neighbors",
    "flavour": "flavor", "flavours": "flavors", "labour": "labor", "honour": "honor", "humour": "humor",
    "harbour": "harbor", "mould": "mold", "pyjamas": "pajamas", "fulfil": "fulfill", "enrol": "enroll",
    "travelling": "traveling", "travelled": "traveled", "cancelled": "canceled", "cancelling": "canceling",
    "labelled": "labeled", "labelling": "labeling", "modelling": "modeling", "counselling": "counseling",
    "fuelled": "fueled", "jewelled": "jeweled", "cosy": "cozy", "ageing": "aging", "judgement": "judgment",
}
#: Verbs spelt -ise in British English: -ise/-ised/-ises/-ising/-isation -> -ize...
IZE_STEMS = frozenset(words("""summar organ real recogn apolog optim custom priorit minim maxim categor visual final
util memor critic author special standard emphas personal normal initial synchron character general
modern stabil capital commercial central legal famil hospital vapor tenderiz"""))
ANALYSE = {"analyse": "analyze", "analysed": "analyzed", "analyses": "analyzes", "analysing": "analyzing",
           "paralyse": "paralyze", "catalyse": "catalyze"}

#: Plurals that are not the plural of the word without the s.
NOT_PLURAL = frozenset(words("""news glasses means series species physics mathematics politics economics ethics
clothes arms goods customs spirits savings premises headquarters thanks this his its us was has is
does yes gas bus plus lens bias chaos atlas alias canvas bonus virus status campus census
focus corpus genius minus sinus apparatus analysis basis crisis thesis axis diagnosis ios macos
minutes manners remains greens quarters outskirts odds looks wits grounds ashes
always perhaps sometimes towards afterwards across less unless whereas besides hers ours yours theirs
its as"""))

#: Number words -> digits (one to twenty, tens), ordinals -> 1st...
NUMBERS = {w: str(i) for i, w in enumerate(words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"))}
NUMBERS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
                "eighty": "80", "ninety": "90", "hundred": "100"})
ORDINALS = {w: f"{i + 1}{'st' if i == 0 else 'nd' if i == 1 else 'rd' if i == 2 else 'th'}" for i, w in enumerate(words(
    "first second third fourth fifth sixth seventh eighth ninth tenth"))}

#: Function words that tell English text from another language written in Latin letters.
FUNCTION_WORDS = frozenset(words("""the a an is are am was were be been do does did have has had i you he she it we they
me my your our their his her its this that these those what which who whom whose when where why how
of to in on at by for with from about into over under and or but not no if than then there here
can could would should will shall may might must please"""))
