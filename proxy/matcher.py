"""Semantic matching of final user messages: normalisation, similarity, and guards.

A semantic merge serves one answer to two requests. A wrong merge (two requests that
need different answers) is far worse than a missed saving, so a pair merges only when:

* everything but the final user message is identical (the caller groups requests by
  scope + history and only compares final messages within one group), and
* the final messages are equal after :func:`normalize` (case, whitespace, punctuation,
  Unicode), or
* both fit the embedder's window, their cosine similarity reaches the threshold, and
  every enabled guard passes, or
* both fit, and they are the same words in the same order up to misspellings and a short
  list of synonyms (typos scatter word pieces and drag the similarity down), and every
  enabled guard passes.

A message over the window (256 word pieces, special tokens counted) merges only with an
identical text: its merge key is the raw text, not the normalised one.

The guards are general rules over word classes, not a list of known pairs. Each looks
at one way two sentences that embed close together can still need different answers:

=============  ===========================================================================
numbers        numbers (digits, number words, ordinals) and units/currencies differ
dates          dates, times, weekdays, months, relative days (today/tomorrow), am/pm
identifiers    codes, versions, ids, URLs, e-mails, paths, quoted or `code` literals
entities       a capitalised name or acronym in one message is missing from the other
negation       a different number of negations (not, never, no, n't, without ...)
polarity       opposite poles of an axis (open/closed, include/exclude, allow/block,
               on/off, add/remove, increase/decrease ...), or un-/non-/dis- flips
scope          quantity and scope words (all/some/only/each/both/except/top ...)
comparatives   comparatives and superlatives (cheapest, more, best, least ...)
format         output format (json, table, bullet list, summary, short/detailed ...)
language       natural or programming language named, or the message's own language
roles          the same words in different roles (from X to Y vs from Y to X)
wording        a near-copy (same words, same order) that swaps or adds a content word
               that is not a spelling variant, an inflection or a listed synonym, unless
               the similarity clears the stricter near-copy threshold (0.93)
intent         below the confident threshold (0.75), both must ask the same kind of
               question (who / where / when / why / how much / how to), and what an
               existence question asks about ("is there a shuttle") must be named in both
=============  ===========================================================================

Everything here is pure Python + numpy; no HTTP, no model. The embedder is reached
through :class:`embeddings.batcher.BatchingEmbedder`.
"""

from __future__ import annotations

import difflib
import functools
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from embeddings.batcher import BatchingEmbedder

GUARDS: tuple[str, ...] = (
    "numbers",
    "dates",
    "identifiers",
    "entities",
    "negation",
    "polarity",
    "scope",
    "comparatives",
    "format",
    "language",
    "roles",
    "wording",
    "intent",
)

#: Calibrated on the evaluation in benchmarks/SEMANTIC.md (python -m proxy.evaluate).
DEFAULT_THRESHOLD = 0.62
DEFAULT_MAX_TOKENS = 256
#: A near-copy (this share of words the same, in order) that changes a content word needs
#: this similarity instead of the threshold.
DEFAULT_NEAR_COPY_RATIO = 0.6
DEFAULT_NEAR_COPY_THRESHOLD = 0.93
#: Below this similarity the embedding cannot tell a reworded paraphrase from a different
#: question about the same subject: the intent guard then also wants the same kind of question.
DEFAULT_CONFIDENT_THRESHOLD = 0.75
#: Below the threshold, SemanticIndex.best looks at this many nearest entries for a
#: misspelt copy, down to this similarity.
VARIANT_CANDIDATES = 4
VARIANT_FLOOR = 0.3
#: Texts longer than this many characters are treated as over the window without tokenizing.
MAX_CHARS = 20_000


# ---------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------

_CODE_SPAN = re.compile(r"```.*?```|`[^`\n]+`", re.DOTALL)
_APOSTROPHES = re.compile(r"['\u2018\u2019\u02bc\u2032`\u00b4]")
_ZERO_WIDTH = re.compile(r"[\u200b-\u200f\u2060\ufeff\u00ad]")
# Thousands separators: 1,000 -> 1000 (only before exactly three digits).
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# Punctuation that separates words. Between two digits . , : stay (3.5, 10:30); a hyphen
# stays next to a digit (covid-19, -5) and becomes a space between letters.
_SEPARATORS = re.compile(
    r"(?<!\d)[.,:](?!\d)|(?<=\d)[.,:](?!\d)|(?<!\d)[.,:](?=\d)"
    r"|[;!?\"()\[\]{}\u00a1\u00bf\u00ab\u00bb\u2010-\u2015\u201a-\u201f\u2026\u3001\u3002\u300c-\u300f\uff61-\uff64]"
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
    """The text with differences that never change an answer folded away.

    NFKC, case folding, whitespace collapsed, sentence punctuation and quotes dropped,
    apostrophes removed (don't = dont), thousands separators removed. Symbols that carry
    meaning stay (+ # $ % & * / = < > @ and currency signs), as do . , : between digits and
    a hyphen next to a digit. Text inside backticks (code) is kept verbatim.
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
# the lexicon: general English word classes (no pair of any benchmark is listed here)
# ---------------------------------------------------------------------------------------


def _words(s: str) -> frozenset[str]:
    return frozenset(s.split())


def _groups(spec: dict[str, str]) -> dict[str, str]:
    """{canonical: "word word ..."} -> {word: canonical}; the first listing of a word wins."""
    out: dict[str, str] = {}
    for canon, ws in spec.items():
        for w in ws.split():
            out.setdefault(w, canon)
    return out


STOPWORDS = _words(
    """a an the this that these those here there such
    i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his
    himself she her hers herself it its itself they them their theirs themselves someone
    somebody something anyone anybody anything
    is are was were be been being am isn aren wasn weren do does did doing done have has had having
    can could would should will shall may might must ought
    what whats which who whom whose when where why how whether
    if then than so and or but nor yet because as while though although unless
    of to in on at by for with from about into onto upon over under up down out off
    through across along around against among between toward towards via per
    again further once also too very really quite rather much
    s t d ll m re ve o y
    get gets got getting gotten go goes going went gone make makes made making
    let lets im ive id youre youve theyre thats theres whats hows wheres whos whens
    i'm i've i'd i'll you're you've you'll we're we've they're they've that's there's what's how's
    where's who's when's it's he's she's let's
    """
)

#: Politeness, hesitation and framing words: they never change what is asked.
LIGHT = _words(
    """please pls plz thanks thank thx ta cheers hello hi hey hiya greetings dear sorry
    um umm uh uhh er erm hmm ah oh ok okay alright yeah yep well so just like actually basically
    literally honestly really anyway anyways btw wondering wonder curious quick quickly question
    know tell help assist want wanted wanting need needs needed needing wish would like love
    possible possibly able available way ways process procedure steps step usually typically
    normally generally exactly kindly also still even find-out
    """
)
#: Courtesy formulas removed before the guards look at a message.
_COURTESY = re.compile(
    r"\b(?:many\s+thanks|thanks|thank\s+you|thx|cheers)(?:\s+(?:so|very)\s+much|\s+a\s+lot|\s+in\s+advance|\s+again)?\b"
    r"|\bsorry(?:\s+to\s+(?:bother|trouble|disturb)\s+you)?\b"
    r"|\b(?:a\s+)?(?:silly|quick|stupid|dumb|random|simple)\s+(?:question|one|q)\b"
    r"|\b(?:hi|hello|hey|hiya|morning|evening|afternoon)\s+(?:team|all|everyone|folks|guys|there|again)\b"
    r"|\b(?:just\s+|i\s+was\s+|i'm\s+|im\s+)wondering\b|\bif\s+you\s+don'?t\s+mind\b|\bif\s+possible\b"
    r"|\b(?:please|kindly|pls|plz)\b",
    re.IGNORECASE,
)
_GREETING = re.compile(
    r"^\s*(?:(?:hi|hello|hey|hiya|greetings|good\s+(?:morning|afternoon|evening)|morning|afternoon|evening)"
    r"(?:\s+there)?\s*[!,.:;-]+\s*)+",
    re.IGNORECASE,
)

NEGATORS = _words(
    """not no never none nobody nothing nowhere neither nor without cannot cant dont doesnt didnt
    isnt arent wasnt werent wont wouldnt shouldnt couldnt mustnt neednt havent hasnt hadnt aint
    shant mightnt non n't"""
)

# Number words -> value.
_NUMBER_WORDS = {
    "zero": 0, "nought": 0, "nil": 0, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
    "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17,
    "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "dozen": 12, "twice": 2,
    "thrice": 3, "half": 0.5, "quarter": 0.25,
}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000, "billion": 1_000_000_000,
           "trillion": 1_000_000_000_000}
_ORDINALS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
    "eighth": 8, "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12, "thirteenth": 13,
    "fourteenth": 14, "fifteenth": 15, "sixteenth": 16, "seventeenth": 17, "eighteenth": 18,
    "nineteenth": 19, "twentieth": 20, "thirtieth": 30, "hundredth": 100,
}
_ORDINAL_SUFFIX = re.compile(r"^(\d+)(st|nd|rd|th)$")
# Suffixes on a number: 10k, 2m, 1.5bn.
_NUMBER_SCALE_SUFFIX = {"k": 1000, "m": 1_000_000, "mn": 1_000_000, "bn": 1_000_000_000}

#: Units and currencies -> canonical name. Currencies and measures count wherever they
#: appear; the words in _UNIT_AFTER_NUMBER_ONLY only right after a number.
UNITS = _groups({
    "GBP": "£ gbp pound pounds quid sterling pence penny",
    "USD": "$ usd dollar dollars buck bucks cent cents",
    "EUR": "€ eur euro euros",
    "JPY": "¥ jpy yen",
    "INR": "₹ inr rupee rupees",
    "CHF": "chf franc francs",
    "%": "% percent percentage",
    "kg": "kg kgs kilo kilos kilogram kilograms kilogramme kilogrammes",
    "g": "g gram grams gramme grammes",
    "mg": "mg milligram milligrams",
    "lb": "lb lbs",
    "oz": "oz ounce ounces",
    "stone": "st stone stones",
    "tonne": "tonne tonnes ton tons",
    "km": "km kms kilometre kilometres kilometer kilometers",
    "m": "m metre metres meter meters",
    "cm": "cm centimetre centimetres centimeter centimeters",
    "mm": "mm millimetre millimetres millimeter millimeters",
    "mile": "mile miles mi",
    "ft": "ft foot feet",
    "inch": "inch inches",
    "yard": "yard yards yd yds",
    "litre": "l litre litres liter liters",
    "ml": "ml millilitre millilitres milliliter milliliters",
    "pint": "pint pints",
    "gallon": "gallon gallons",
    "celsius": "°c celsius centigrade c",
    "fahrenheit": "°f fahrenheit f",
    "kelvin": "kelvin",
    "kb": "kb kilobyte kilobytes",
    "mb": "mb megabyte megabytes meg megs",
    "gb": "gb gig gigs gigabyte gigabytes",
    "tb": "tb terabyte terabytes",
    "mbps": "mbps",
    "kbps": "kbps",
    "gbps": "gbps",
    "kwh": "kwh",
    "kw": "kw kilowatt kilowatts",
    "watt": "w watt watts",
    "calorie": "kcal calorie calories cal cals",
    "mph": "mph",
    "kph": "kph",
    "bedroom": "bed beds bedroom bedrooms",
    "star": "star stars",
    "x": "x",
    "p": "p",
})
_UNIT_AFTER_NUMBER_ONLY = _words("m mi c f g l w st cal cals x p bed beds bedroom bedrooms star stars stone stones")
#: Durations: (number, unit) becomes seconds, so "14 days" equals "two weeks".
DURATIONS = {
    **dict.fromkeys(["second", "seconds", "sec", "secs", "s"], 1),
    **dict.fromkeys(["minute", "minutes", "min", "mins"], 60),
    **dict.fromkeys(["hour", "hours", "hr", "hrs", "h"], 3600),
    **dict.fromkeys(["day", "days"], 86400),
    **dict.fromkeys(["week", "weeks", "wk", "wks"], 7 * 86400),
    **dict.fromkeys(["fortnight", "fortnights"], 14 * 86400),
    **dict.fromkeys(["month", "months", "mo"], 30 * 86400),
    **dict.fromkeys(["year", "years", "yr", "yrs"], 365 * 86400),
    **dict.fromkeys(["decade", "decades"], 3650 * 86400),
}

_YEARS = _words("year years yr yrs")

DATE_WORDS = _groups({
    "monday": "monday mon mondays", "tuesday": "tuesday tue tues tuesdays",
    "wednesday": "wednesday wed weds wednesdays", "thursday": "thursday thu thur thurs thursdays",
    "friday": "friday fri fridays", "saturday": "saturday sat saturdays", "sunday": "sunday sun sundays",
    "january": "january jan", "february": "february feb", "march": "march mar", "april": "april apr",
    "may": "may", "june": "june jun", "july": "july jul", "august": "august aug",
    "september": "september sep sept", "october": "october oct", "november": "november nov",
    "december": "december dec",
    "today": "today todays tonight tonights", "tomorrow": "tomorrow tomorrows tmrw tmr tomoz",
    "yesterday": "yesterday yesterdays", "now": "now currently", "weekday": "weekday weekdays",
    "weekend": "weekend weekends", "morning": "morning mornings", "afternoon": "afternoon afternoons",
    "evening": "evening evenings", "night": "night nights overnight", "noon": "noon midday",
    "midnight": "midnight", "am": "am", "pm": "pm", "daily": "daily everyday",
    "weekly": "weekly", "fortnightly": "fortnightly", "monthly": "monthly",
    "annual": "annual annually yearly", "quarterly": "quarterly", "hourly": "hourly",
    "spring": "spring", "summer": "summer", "autumn": "autumn", "winter": "winter",
    "christmas": "christmas xmas", "easter": "easter", "same-day": "same-day", "next-day": "next-day",
    "next": "next upcoming coming", "last": "last past previous prior", "this": "this current",
    "ago": "ago", "later": "later", "soon": "soon", "recent": "recent recently",
})
# Month/day names that are also ordinary words count only next to a number or capitalised.
_AMBIGUOUS_DATES = _words("march may mar sat sun wed jun jul aug sep dec oct nov spring fall mon")
# next/last/this/past ... are date words only before a time word ("next week").
_DATE_MODIFIERS = _words("next upcoming coming last past previous prior this current")
_TIME_NOUNS = _words(
    """day days week weeks month months year years weekend weekends morning afternoon evening
    night time term quarter season spring summer autumn winter monday tuesday wednesday thursday
    friday saturday sunday january february march april may june july august september october
    november december christmas easter hour hours minute minutes decade century fortnight"""
)

# Polarity axes. Each word has an axis and a pole; two messages with different poles on
# one axis need different answers. Axes in MARKED: the "-" pole refuses even when the other
# message says nothing on that axis ("closed" vs a message with neither open nor closed).
_AXES: dict[str, dict[str, str]] = {
    "open": {"+": "open opens opened opening reopen", "-": "close closes closed closing shut shuts"},
    "include": {"+": "include includes included including inclusive",
                "-": "exclude excludes excluded excluding exclusive except excepting"},
    "permit": {"+": """allow allows allowed allowing permit permits permitted permission let accept
                       accepts accepted accepting approve approves approved approval grant grants granted
                       authorise authorised authorize authorized agree agrees agreed""",
               "-": """ban bans banned banning block blocks blocked blocking forbid forbids forbidden
                       prohibit prohibits prohibited disallow disallowed deny denies denied refuse
                       refuses refused reject rejects rejected rejection decline declines declined revoke
                       revokes revoked restrict restricts restricted barred disapprove disagree veto"""},
    "enable": {"+": "enable enables enabled enabling activate activates activated turn-on switch-on",
               "-": "disable disables disabled disabling deactivate deactivates deactivated turn-off switch-off"},
    "switch": {"+": "on", "-": "off"},
    "inout": {"+": "in into inside internal", "-": "out outside external"},
    "updown": {"+": "up", "-": "down"},
    "login": {"+": "login log-in sign-in signin", "-": "logout log-out sign-out signout"},
    "optin": {"+": "opt-in", "-": "opt-out"},
    "check": {"+": "check-in", "-": "check-out"},
    "start": {"+": "start starts started starting begin begins began beginning resume resumes resumed continue continues",
              "-": """stop stops stopped stopping end ends ended ending pause paused pausing halt halted quit
                      quitting finish finished terminate terminated suspend suspended cease ceased
                      discontinue discontinued cancel cancels cancelled canceled cancelling canceling
                      cancellation"""},
    "add": {"+": "add adds added adding insert inserted create creates created install installed attach attached",
            "-": """remove removes removed removing delete deletes deleted deleting uninstall uninstalled
                    detach detached erase erased clear cleared drop dropped"""},
    "amount": {"+": """increase increases increased increasing raise raises raised raising grow grows growing
                       rise rises rising boost upgrade upgrades upgraded extend extended higher larger bigger""",
               "-": """decrease decreases decreased decreasing reduce reduces reduced reducing lower lowered
                       cut cuts shrink downgrade downgrades downgraded shorten smaller"""},
    "trade": {"+": "buy buys buying bought purchase purchases purchased", "-": "sell sells selling sold"},
    "lend": {"+": "borrow borrows borrowed borrowing", "-": "lend lends lent lending"},
    "send": {"+": "send sends sent sending", "-": "receive receives received receiving"},
    "import": {"+": "import imports imported importing", "-": "export exports exported exporting"},
    "load": {"+": "upload uploads uploaded uploading", "-": "download downloads downloaded downloading"},
    "push": {"+": "push pushes pushed", "-": "pull pulls pulled"},
    "deposit": {"+": "deposit deposits deposited pay-in", "-": "withdraw withdraws withdrawn withdrew withdrawal withdrawals"},
    "credit": {"+": "credit credits credited", "-": "debit debits debited"},
    "money": {"+": "income earnings revenue", "-": "expense expenses expenditure outgoings spending"},
    "win": {"+": "win wins won winning winner winners", "-": "lose loses lost losing loser losers"},
    "pass": {"+": "pass passes passed passing", "-": "fail fails failed failing failure"},
    "arrive": {"+": "arrive arrives arrived arriving arrival arrivals",
               "-": "depart departs departed departing departure departures leave leaves leaving"},
    "enter": {"+": "enter enters entered entering entry entrance", "-": "exit exits exited exiting"},
    "join": {"+": "join joins joined joining enrol enroll enrols enrolled subscribe subscribed",
             "-": "unsubscribe unsubscribed"},
    "direction": {"+": "incoming inbound", "-": "outgoing outbound"},
    "place": {"+": "indoor indoors", "-": "outdoor outdoors"},
    "level": {"+": "upstairs above", "-": "downstairs below"},
    "bound": {"+": "over exceeding beyond", "-": "under"},
    "when": {"+": "before prior within during until till", "-": "after following afterwards"},
    "timing": {"+": "early earlier earliest", "-": "late later latest delayed"},
    "order": {"+": "ascending asc", "-": "descending desc"},
    "way": {"+": "forward forwards", "-": "backward backwards"},
    "side": {"+": "left", "-": "right"},
    "end": {"+": "top", "-": "bottom"},
    "face": {"+": "front", "-": "back rear"},
    "limit": {"+": "maximum max", "-": "minimum min"},
    "sex": {"+": "male men man mens gentlemen boy boys", "-": "female women woman womens ladies girl girls"},
    "spouse": {"+": "husband husbands", "-": "wife wives"},
    "parent": {"+": "mother mum mom mothers", "-": "father dad fathers"},
    "offspring": {"+": "son sons", "-": "daughter daughters"},
    "sibling": {"+": "brother brothers", "-": "sister sisters"},
    "age": {"+": "adult adults grown-up", "-": "child children kid kids baby babies infant infants toddler toddlers teen teenager teenagers"},
    "job": {"+": "employer employers", "-": "employee employees"},
    "let": {"+": "landlord landlords landlady", "-": "tenant tenants renter renters"},
    "deal": {"+": "buyer buyers", "-": "seller sellers vendor"},
    "mail": {"+": "sender", "-": "recipient recipients"},
    "where": {"+": "home domestic local short-haul", "-": "abroad overseas international foreign long-haul"},
    "access": {"+": "public", "-": "private"},
    "line": {"+": "online", "-": "offline in-store"},
    "temperature": {"+": "hot warm warmer hotter heat", "-": "cold cool colder cooler freezing"},
    "moisture": {"+": "wet", "-": "dry"},
    "light": {"+": "light bright", "-": "dark"},
    "speed": {"+": "fast faster fastest quick quicker quickest rapid", "-": "slow slower slowest"},
    "noise": {"+": "busy busier busiest loud noisy", "-": "quiet quieter quietest silent"},
    "spice": {"+": "spicy", "-": "mild"},
    "safety": {"+": "safe safer safest", "-": "unsafe dangerous risky harmful hazardous"},
    "law": {"+": "legal lawful lawfully legally", "-": "illegal unlawful illegally unlawfully"},
    "health": {"+": "healthy", "-": "unhealthy"},
    "quality": {"+": "good better best great excellent outstanding", "-": "bad worse worst poor inadequate terrible awful"},
    "function": {"+": "working works properly functioning", "-": "fault faults faulty broken broke defective malfunction malfunctioning"},
    "sign": {"+": "positive", "-": "negative"},
    "truth": {"+": "true correct accurate", "-": "false incorrect wrong inaccurate"},
    "outcome": {"+": "success successful successfully", "-": "unsuccessful failure"},
    "validity": {"+": "valid", "-": "invalid expired"},
    "availability": {"+": "available", "-": "unavailable"},
    "possibility": {"+": "possible", "-": "impossible"},
    "duty": {"+": "compulsory mandatory required obligatory", "-": "optional voluntary"},
    "price": {"+": "free", "-": "paid chargeable"},
    "cost": {"+": "cheap cheaper cheapest inexpensive affordable", "-": "expensive pricey costly"},
    "share": {"+": "full whole entire", "-": "part partial"},
    "count": {"+": "single sole individual", "-": "joint shared double twin"},
    "merit": {"+": "benefit benefits advantage advantages pro pros upside upsides",
              "-": "drawback drawbacks disadvantage disadvantages con cons downside downsides risk risks"},
    "feeling": {"+": "like likes love loves", "-": "dislike dislikes hate hates"},
    "visibility": {"+": "show shows showing visible", "-": "hide hides hiding hidden invisible"},
    "punctual": {"+": "on-time punctual", "-": "delay delays"},
    "avoid": {"-": "avoid avoids avoided avoiding skip skipping prevent prevents prevented refrain lack lacking"},
    "most": {"+": "most more", "-": "least less fewer fewest"},
    "effect": {"+": "improve improves improved improving enhance enhances boost boosts",
               "-": "damage damages damaged damaging hurt hurts harm harms harmed worsen worsens ruin ruins ruined"},
    "tenure": {"+": "own owner owners homeowner homeowners owned", "-": "rented renting rental renter"},
    "study": {"+": "undergraduate undergraduates bachelor bachelors bachelor's",
              "-": "postgraduate postgraduates master master's masters phd doctorate doctoral"},
    "payment": {"+": "pay pays paying payment payments charge charged charging",
                "-": "refund refunds refunded refunding reimburse reimbursed reimbursement"},
}
MARKED = frozenset(
    ["open", "include", "permit", "enable", "switch", "inout", "updown", "login", "optin", "check", "start", "add", "amount", "safety", "law", "health", "quality", "function", "truth", "outcome", "validity", "availability", "possibility", "merit", "avoid", "feeling", "visibility", "punctual", "most", "effect"]
)
#: Axes whose "-" poles all end or take away something: "close my account" asks what
#: "delete my account" asks, "kick someone out" what "remove someone" asks. A "-" pole on one
#: of them is not silence to a "-" pole on another (opposite poles of one axis still clash).
_ENDING_AXES = frozenset(["open", "start", "add", "enable", "join", "login", "switch", "optin", "inout"])
POLARITY: dict[str, tuple[str, str]] = {}
for _axis, _poles in _AXES.items():
    for _pole, _ws in _poles.items():
        for _w in _ws.split():
            POLARITY.setdefault(_w, (_axis, _pole))
# Words with other common senses ("in", "like", "back"): they clash with an opposite pole
# but never count against silence.
_POLARITY_WEAK = _words("own in into up on over under back hot most more less top after before like likes "
                        "cancel cancels cancelled canceled cancelling canceling cancellation "
                        "within during until till working works properly light left right front")
#: Word-building prefixes written with a hyphen: self-employed, non-members, ex-partner.
_PREFIX_PARTICLE = re.compile(r"\b(self|anti|ex|semi|pre|post|co|multi|sub|super|over|under|re|un|dis|mis)-(?=[^\W\d_])", re.IGNORECASE)
#: Prefixes that flip or change a word's meaning: safe/unsafe, lock/unlock.
AFFIXES = ("un", "non", "dis", "in", "im", "il", "ir", "de", "anti", "counter", "mis", "self", "re",
           "pre", "post", "sub", "over", "under", "co", "ex")

SCOPE_WORDS = _groups({
    "all": "all every each entire whole everything everyone everybody everywhere always altogether",
    "some": "some several few certain various",
    "many": "many lots numerous multiple",
    "only": "only solely exclusively",
    "both": "both", "either": "either", "neither": "neither",
    "except": "except excluding besides",
    "top": "top", "bottom": "bottom",
    "first": "first", "last": "last final", "next": "next", "previous": "previous prior earlier",
    "latest": "latest newest", "oldest": "oldest earliest",
    "average": "average median typical", "total": "total overall combined cumulative",
    "approx": "approximately approx roughly nearly almost",
    "exactly": "precisely",
    "extra": "extra additional another",
    "same": "same identical", "different": "different",
})

COMPARATIVE_STEMS = _words(
    """cheap expensive fast slow quick big small large tiny high low long short old new young easy hard
    difficult safe strong weak heavy light hot cold warm cool near far close rich poor great simple
    healthy popular common rare good bad busy quiet loud wide narrow deep shallow thick thin fresh
    clean dirty soft efficient reliable secure accurate powerful affordable convenient comfortable nice"""
)
_IRREGULAR_DEGREE = {
    "better": ("good", "cmp"), "best": ("good", "sup"), "worse": ("bad", "cmp"), "worst": ("bad", "sup"),
    "more": ("more", "cmp"), "most": ("more", "sup"), "less": ("less", "cmp"), "least": ("less", "sup"),
    "fewer": ("less", "cmp"), "fewest": ("less", "sup"), "further": ("far", "cmp"),
    "furthest": ("far", "sup"), "farther": ("far", "cmp"), "farthest": ("far", "sup"),
    "elder": ("old", "cmp"), "eldest": ("old", "sup"),
}

FORMAT_WORDS = _groups({
    "json": "json jsonl", "yaml": "yaml yml", "xml": "xml", "csv": "csv tsv", "html": "html",
    "markdown": "markdown md", "latex": "latex tex", "sql": "sql", "regex": "regex regexp",
    "table": "table tables tabular", "list": "list lists listing", "bullets": "bullet bullets bulleted",
    "numbered": "numbered", "paragraph": "paragraph paragraphs para", "sentence": "sentence sentences",
    "word": "word words", "summary": "summary summarise summarize summarised summarized tldr recap",
    "essay": "essay essays", "poem": "poem poems poetry verse rhyme rhyming", "haiku": "haiku",
    "limerick": "limerick", "story": "story stories", "tweet": "tweet tweets", "code": "code snippet snippets",
    "script": "script", "outline": "outline", "diagram": "diagram chart graph plot",
    "slides": "slide slides presentation", "steps": "step-by-step", "example": "example examples",
    "short": "short shorter brief briefly concise concisely succinct terse",
    "long": "long longer detailed detail lengthy elaborate in-depth thorough comprehensive",
    "formal": "formal professional", "casual": "casual informal conversational",
    "funny": "funny humorous joke jokes witty", "simple": "eli5 layman",
    "uppercase": "uppercase caps capitals", "lowercase": "lowercase",
    "pdf": "pdf", "docx": "docx", "spreadsheet": "spreadsheet excel xlsx",
})
# Ambiguous format words ("list" is also a verb, "long" an adjective): they clash only
# with another format word, never with silence.
_FORMAT_WEAK = _words("word words list lists listing long longer short shorter detail detailed code "
                      "step-by-step story script outline plot graph chart table caps capitals")

LANGUAGE_WORDS: dict[str, str] = {w: w for w in ["english", "french", "spanish", "german", "italian", "portuguese", "dutch", "russian", "chinese", "mandarin", "cantonese", "japanese", "korean", "arabic", "hindi", "urdu", "bengali", "punjabi", "gujarati", "tamil", "telugu", "turkish", "polish", "swedish", "norwegian", "danish", "finnish", "icelandic", "greek", "hebrew", "thai", "vietnamese", "indonesian", "malay", "tagalog", "filipino", "swahili", "welsh", "irish", "gaelic", "ukrainian", "czech", "slovak", "hungarian", "romanian", "bulgarian", "serbian", "croatian", "latin", "persian", "farsi", "pashto", "amharic", "somali", "yoruba", "zulu", "afrikaans", "catalan", "basque", "esperanto", "python", "javascript", "typescript", "java", "kotlin", "swift", "rust", "golang", "ruby", "php", "perl", "scala", "haskell", "elixir", "erlang", "clojure", "lua", "dart", "julia", "matlab", "fortran", "cobol", "bash", "powershell", "zsh", "sql", "nosql", "css", "objective-c", "assembly", "solidity", "groovy", "ocaml", "lisp", "prolog", "vba", "react", "vue", "angular", "svelte", "django", "flask", "rails", "laravel", "nodejs", "deno", "jquery", "pandas", "numpy", "pytorch", "tensorflow"]}
LANGUAGE_WORDS.update({"brazilian": "portuguese", "castilian": "spanish", "farsi": "persian", "golang": "go"})

# A few function words per language: enough to tell which language a message is written in.
_LANG_MARKERS = {
    "en": _words("the is are and of to what how do does can i my you your with for this that it"),
    "es": _words("el la los las es son y de que qué cómo como por para con mi tu una un está puedo"),
    "fr": _words("le la les est sont et de que quoi comment pour avec mon ma mes une un je vous nous"),
    "de": _words("der die das ist sind und von zu was wie ich mein meine mit für ein eine nicht kann"),
    "it": _words("il lo la gli le è sono e di che come per con mio mia una un posso non"),
    "pt": _words("o a os as é são e de que como para com meu minha uma um não posso você"),
    "nl": _words("de het een is zijn en van wat hoe ik mijn met voor niet kan"),
}

#: Near-synonyms that never change an answer. Small on purpose: each entry lets a
#: near-copy merge that the wording guard would otherwise refuse. A group whose first
#: word is a stopword ("get") makes its words stopwords too.
SYNONYMS = _groups({
    "get": "get obtain receive acquire request",
    "be": "be stay stays remain remains",
    "do": "do offer offers provide provides",
    "change": "change update modify edit amend alter adjust switch",
    "start": "start begin commence",
    "buy": "buy purchase",
    "shop": "shop store",
    "child": "child children kid kids",
    "baby": "baby babies infant infants",
    "fix": "fix repair mend",
    "delete": "delete erase",
    "big": "big large",
    "small": "small little",
    "fast": "fast quick rapid speedy",
    "fastest": "fastest quickest",
    "cheap": "cheap inexpensive",
    "problem": "problem issue trouble",
    "flat": "flat apartment",
    "holiday": "holiday vacation",
    "film": "film movie",
    "luggage": "luggage baggage",
    "rubbish": "rubbish trash garbage",
    "cost": "cost price fee pricing",
    "car": "car vehicle",
    "photo": "photo picture photograph",
    "email": "email e-mail",
    "website": "website site",
    "phone": "phone telephone mobile cellphone",
    "doctor": "doctor gp physician",
    "job": "job employment",
    "sofa": "sofa couch",
    "autumn": "autumn fall",
    "show": "show display",
    "send": "send submit",
    "move": "move transfer",
    "delivery": "delivery shipping postage",
    "parcel": "parcel package",
    "register": "register enrol enroll sign-up signup",
    "cancel": "cancel terminate",
    "previous": "previous prior earlier",
    "create": "create set-up setup",
    "include": "include come-with",
    "mute": "mute silence",
    "atm": "atm atms cashpoint cashpoints cash-machine",
    "dispute": "dispute challenge contest",
    "choose": "choose select pick",
    "need": "need require",
    "use": "use utilise utilize",
    "talk": "talk speak",
    "reply": "reply respond answer",
    "mistake": "mistake error",
    "activate": "activate go-live",
    "enough": "enough sufficient",
    "allowed": "allowed permitted",
})
_SYNONYM_STOPS = frozenset(w for w, canon in SYNONYMS.items() if canon in STOPWORDS)

#: Two-word verbs read as one word: "turn off" is "disable", "sign up" is "register".
PHRASES = {
    ("turn", "on"): "turn-on", ("switch", "on"): "switch-on", ("turn", "off"): "turn-off",
    ("switch", "off"): "switch-off", ("log", "in"): "log-in", ("log", "into"): "log-in",
    ("sign", "in"): "sign-in", ("log", "out"): "log-out", ("sign", "out"): "sign-out",
    ("sign", "up"): "sign-up", ("opt", "in"): "opt-in", ("opt", "out"): "opt-out",
    ("check", "in"): "check-in", ("check", "out"): "check-out", ("set", "up"): "set-up",
    ("come", "with"): "come-with", ("comes", "with"): "come-with", ("on", "time"): "on-time",
    ("find", "out"): "find-out", ("shut", "down"): "shut", ("close", "down"): "close",
    ("united", "states"): "usa", ("united", "kingdom"): "uk", ("great", "britain"): "uk",
    ("go", "live"): "go-live", ("goes", "live"): "go-live",
    ("best", "way"): "way", ("easiest", "way"): "way", ("right", "way"): "way",
}

_US_SPELLING = (
    (re.compile(r"(?<=[^aeiou])our(s|ed|ing|ite|ites|able)?$"), r"or\1"),  # colour, favourite
    (re.compile(r"(?<=[^aeiou])re(s|d)?$"), r"er\1"),  # centre, metre
    (re.compile(r"is(e|es|ed|ing|ation|ations)$"), r"iz\1"),  # organise
    (re.compile(r"ys(e|es|ed|ing)$"), r"yz\1"),  # analyse
    (re.compile(r"ogue(s)?$"), r"og\1"),  # catalogue
)


def _fold_spelling(w: str) -> str:
    if len(w) < 6:
        return w
    for rx, repl in _US_SPELLING:
        w2 = rx.sub(repl, w)
        if w2 != w:
            return w2
    return w


#: Words (and word pairs) whose stem and misspelling verdicts are remembered: most words of a
#: message were seen in earlier ones, and the misspelling checks compare each unknown word
#: with many table entries (extract_features: ~280 -> ~155 us a message here).
WORD_MEMO = 16_384


@functools.lru_cache(maxsize=WORD_MEMO)
def _stem(w: str) -> str:
    """A crude suffix stripper: enough to see that "waiting" and "wait" are one word."""
    if len(w) <= 3 or not w.isalpha():
        return w
    w = _fold_spelling(w)
    for suffix, repl, min_len in (("ies", "y", 5), ("ied", "y", 5), ("sses", "ss", 5), ("ations", "", 8),
                                  ("ation", "", 7), ("ings", "", 6), ("ing", "", 5), ("ed", "", 4),
                                  ("es", "", 5), ("s", "", 4)):
        if w.endswith(suffix) and len(w) >= min_len:
            if suffix == "s" and w.endswith(("ss", "us", "is")):
                break
            base = w[: len(w) - len(suffix)] + repl
            if suffix in ("ing", "ed", "ings", "ation", "ations") and len(base) > 2 and base[-1] == base[-2] and base[-1] not in "lsz":
                base = base[:-1]
            w = base
            break
    if len(w) > 3 and w.endswith("e"):
        w = w[:-1]
    return w


def _canon(w: str) -> str:
    """A word's (or a stem's) synonym class, else its stem."""
    c = SYNONYMS.get(w)
    if c is not None:
        return c
    s = _stem(w)
    return _SYNONYM_STEMS.get(s) or _SYNONYM_STEMS.get(w) or s


_SYNONYM_STEMS = {_stem(w): canon for w, canon in SYNONYMS.items()}


#: Hyphenated words the lexicon lists: the tokenizer keeps them whole.
_COMPOUNDS = frozenset(
    w for table in (POLARITY, DATE_WORDS, FORMAT_WORDS, SYNONYMS, LANGUAGE_WORDS, UNITS, SCOPE_WORDS)
    for w in table if "-" in w
) | frozenset(w for w in LIGHT | NEGATORS if "-" in w)

# ---------------------------------------------------------------------------------------
# features: what a message says, in word classes
# ---------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\d{1,2}:\d{2}(?::\d{2})?"  # clock time
    r"|\d+(?:[.,/]\d+)*"  # number, decimal, 1,000, 2025/26
    r"|[^\W\d_]+(?:'[^\W\d_]+)*"  # word, with inner apostrophes (don't)
    r"|[£$€¥₹%°#@+&]"
)
_SENTENCE_END = set(".!?:;\n\r")
_OPEN_MARKS = set("\"'([{«“‘*-•–—,")
_IDENT_PATTERNS = re.compile(
    r"https?://\S+|www\.\S+"  # URLs
    r"|[\w.+-]+@[\w-]+\.[\w.-]+"  # e-mail
    r"|(?:~|\.{1,2}|[\w.-]+)?/[\w.@~-]+(?:/[\w.@~-]+)+"  # paths (two slashes or more)
    r"|\b[\w-]+\.(?:py|js|ts|json|yaml|yml|toml|txt|csv|md|html|css|java|go|rs|rb|php|sh|sql|xml|pdf|docx?|xlsx?|png|jpe?g|gif|zip|exe|log)\b"
    r"|(?<![\w@])[@#][A-Za-z_]\w*"  # @mention, #tag
    r"|\bv?\d+(?:\.\d+){2,}\b|\bv\d+(?:\.\d+)*\b"  # versions: 3.2.1, v2
    r"|\b[A-Za-z]+[_.][A-Za-z0-9_.]*[A-Za-z0-9]\b"  # snake_case, dotted.names
    r"|\b[a-z]+[A-Z]\w*\b"  # camelCase
    r"|\b(?=[A-Za-z-]*\d)(?=[\d-]*[A-Za-z])[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*\b"  # letters and digits
    r"|\b\d+(?:[-_]\d+){2,}\b"  # 12-34-56 style codes
)
# A number with a unit, ordinal or scale suffix (10GB, 3rd, 7pm, 2-year) is a number, not an id.
_NUMBER_LIKE = re.compile(r"^\d+(?:[.,]\d+)?(?:-?[a-z]{1,10})*$", re.IGNORECASE)
_QUOTED = re.compile(r"```(.*?)```|`([^`\n]+)`|\"([^\"\n]{1,200})\"|“([^”\n]{1,200})”|(?<!\w)'([^'\n]{2,200})'(?!\w)", re.DOTALL)
_SCRIPTS = (
    ("latin", 0x0041, 0x024F), ("greek", 0x0370, 0x03FF), ("cyrillic", 0x0400, 0x04FF),
    ("hebrew", 0x0590, 0x05FF), ("arabic", 0x0600, 0x06FF), ("devanagari", 0x0900, 0x097F),
    ("thai", 0x0E00, 0x0E7F), ("hangul", 0x1100, 0x11FF), ("cjk", 0x3040, 0x30FF),
    ("cjk", 0x3400, 0x9FFF), ("hangul", 0xAC00, 0xD7AF),
)
_NOT_ENTITY = _words("i i'm i've i'd i'll ok okay a am pm ps fyi asap etc eg ie vs tv hi hey hello thanks please sorry dear")
#: Acronyms that are common nouns, not names: the wording guard judges them like any word.
_COMMON_ACRONYMS = _words("pc pcs ceo ceos cfo cto coo md hr atm atms pin id ids faq faqs diy eta gp gps sms "
                          "dm dms pdf app apps usb wifi otp ssn")
#: Other names of one country.
_COUNTRY_ALIASES = {"america": "usa", "usa": "usa", "us": "usa", "britain": "uk", "uk": "uk"}
#: Weekdays and months are compared by the dates guard, currencies by the numbers guard.
_NOT_NAMES = frozenset(w for w, c in DATE_WORDS.items() if c in _TIME_NOUNS) | frozenset(
    w for w in UNITS if len(w) >= 2 and w not in _UNIT_AFTER_NUMBER_ONLY)


@dataclass(frozen=True)
class Token:
    text: str  # as written (NFKC)
    low: str  # lower case, possessive 's removed
    start: bool  # first word of a sentence
    pos: int = 0  # offsets in the text
    end: int = 0


@dataclass(frozen=True)
class Features:
    """What the guards compare, computed once per message."""

    words: tuple[str, ...]  # stems of all tokens, in order (entity look-ups)
    seq: tuple[str, ...]  # canonical words without fillers, in order (near-copy test)
    raw_seq: tuple[str, ...]  # the same words as written (lower case)
    content: frozenset[str]  # stems of content words
    numbers: tuple[str, ...]  # sorted canonical numbers (durations in seconds)
    units: frozenset[str]
    dates: frozenset[str]
    identifiers: frozenset[str]
    entities: tuple[tuple[str, ...], ...]  # capitalised names / acronyms, as stem tuples
    negations: int
    polarity: frozenset[tuple[str, str]]  # (axis, pole); pole ends in "~" for a weak word
    prefixes: frozenset[str]
    scope: frozenset[str]
    comparatives: frozenset[tuple[str, str]]
    formats: frozenset[str]  # "?" suffix: an ambiguous format word
    languages: frozenset[str]
    script: str
    lang: str | None
    roles: tuple[tuple[str, str], ...]  # (role, canonical head word)
    intents: frozenset[str]  # kinds of question asked: who where when why quant
    acronyms: frozenset[str] = frozenset()  # entities written as acronyms (lower case)
    asked_for: frozenset[str] = frozenset()  # what "is there a X" / "is X available" asks about


def _fold(word: str) -> str:
    w = word.lower()
    if w.endswith("'s"):
        w = w[:-2]
    elif w.endswith("s'"):
        w = w[:-1]
    return w


def _tokens(text: str) -> list[Token]:
    out: list[Token] = []
    prev_end = -1
    for m in _TOKEN.finditer(text):
        low = _fold(m.group(0))
        # a hyphenated compound the lexicon knows ("long-haul", "check-out") stays one word
        if out and prev_end >= 0 and m.start() == prev_end + 1 and text[prev_end] == "-":
            joined = out[-1].low + "-" + low
            if joined in _COMPOUNDS:
                out[-1] = Token(out[-1].text + "-" + m.group(0), joined, out[-1].start, out[-1].pos, m.end())
                prev_end = m.end()
                continue
        j = m.start() - 1
        while j >= 0 and (text[j] in " \t" or text[j] in _OPEN_MARKS):
            j -= 1
        start = j < 0 or text[j] in _SENTENCE_END
        out.append(Token(m.group(0), low, start, m.start(), m.end()))
        prev_end = m.end()
    # two-word verbs
    merged: list[Token] = []
    i = 0
    while i < len(out):
        if (out[i].low == "many" and i > 0 and out[i - 1].low == "how" and i + 1 < len(out)
                and out[i + 1].low in DURATIONS and out[i + 1].low not in ("s", "h", "mo")):
            # "how many days does it take" asks "how long does it take"
            merged.append(Token(out[i].text, "long", out[i].start, out[i].pos, out[i + 1].end))
            i += 2
        elif i + 1 < len(out) and (out[i].low, out[i + 1].low) in PHRASES:
            merged.append(Token(out[i].text, PHRASES[(out[i].low, out[i + 1].low)], out[i].start, out[i].pos, out[i + 1].end))
            i += 2
        else:
            t = out[i]
            alias = _COUNTRY_ALIASES.get(t.low)
            if alias is not None and (t.low != "us" or t.text == "US"):
                t = Token(t.text, alias, t.start, t.pos, t.end)
            merged.append(t)
            i += 1
    return merged


def _number_value(s: str) -> float | None:
    s2 = s.replace(",", "") if re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", s) else s
    try:
        return float(s2)
    except ValueError:
        return None  # 9:15, 2025/26 ...


def _script_of(text: str) -> str:
    counts: dict[str, int] = {}
    for ch in text:
        o = ord(ch)
        if o < 0x41:
            continue
        for name, lo, hi in _SCRIPTS:
            if lo <= o <= hi:
                counts[name] = counts.get(name, 0) + 1
                break
    return max(counts, key=counts.__getitem__) if counts else ""


def _language_of(words: list[str]) -> str | None:
    if len(words) < 4:
        return None
    hits = {lang: sum(w in marks for w in words) for lang, marks in _LANG_MARKERS.items()}
    ranked = sorted(hits.items(), key=lambda kv: -kv[1])
    (best, top), (_, second) = ranked[0], ranked[1]
    return best if top >= 2 and top >= 2 * second else None


def _degree(w: str) -> tuple[str, str] | None:
    if w in _IRREGULAR_DEGREE:
        return _IRREGULAR_DEGREE[w]
    for suffix, deg in (("iest", "sup"), ("ier", "cmp"), ("est", "sup"), ("er", "cmp")):
        if w.endswith(suffix) and len(w) > len(suffix) + 2:
            base = w[: -len(suffix)]
            cands = {base, base + "e"} | ({base + "y"} if suffix.startswith("i") else set())
            if len(base) > 2 and base[-1] == base[-2]:
                cands.add(base[:-1])
            for c in cands:
                if c in COMPARATIVE_STEMS:
                    return (SYNONYMS.get(c, c), deg)
    return None


def _numbers(toks: list[Token]) -> tuple[list[str], set[str], set[int]]:
    """Numbers (durations in seconds), units, and the indexes of tokens they used."""
    numbers: list[str] = []
    units: set[str] = set()
    used: set[int] = set()
    n = len(toks)
    i = 0
    while i < n:
        t = toks[i]
        w = t.low
        value: float | None = None
        j = i + 1
        if t.text[0].isdigit():
            if ":" in t.text or "/" in t.text:
                numbers.append(t.text)
                used.add(i)
                i += 1
                continue
            value = _number_value(t.text)
            if value is None:
                numbers.append(t.text)
                used.add(i)
                i += 1
                continue
            if j < n and toks[j].low in _NUMBER_SCALE_SUFFIX and not toks[j].text[0].isupper():
                value *= _NUMBER_SCALE_SUFFIX[toks[j].low]
                j += 1
        elif w in _ORDINALS or (_ORDINAL_SUFFIX.match(w)):
            m = _ORDINAL_SUFFIX.match(w)
            numbers.append(f"#{_ORDINALS[w] if w in _ORDINALS else int(m.group(1))}")  # type: ignore[union-attr]
            used.add(i)
            i += 1
            continue
        elif w in _NUMBER_WORDS or w in _SCALES:
            total, current = 0.0, 0.0
            j = i
            while j < n:
                lw = toks[j].low
                if lw in _NUMBER_WORDS:
                    current += _NUMBER_WORDS[lw]
                elif lw == "one" and (j > i or (j + 1 < n and toks[j + 1].low in _SCALES)):
                    current += 1  # "twenty one", "one hundred"; a lone "one" is not counted
                elif lw in _SCALES:
                    current = max(current, 1.0) * _SCALES[lw]
                    if _SCALES[lw] >= 1000:
                        total, current = total + current, 0.0
                elif lw == "and" and j + 1 < n and toks[j + 1].low in _NUMBER_WORDS and j > i:
                    pass
                else:
                    break
                j += 1
            value = total + current
        if value is None:
            if w in UNITS and w not in _UNIT_AFTER_NUMBER_ONLY:
                units.add(UNITS[w])
                used.add(i)
            i += 1
            continue
        used.update(range(i, j))
        # a unit right after the number (allowing "-": 2-year, and "of": 2 years of)
        k = j
        if k + 1 < n and toks[k].low in _YEARS and toks[k + 1].low == "old":
            numbers.append(f"{value:g}")  # an age: "an 18-year-old" is "at 18"
            used.update((k, k + 1))
            i = k + 2
            continue
        if k < n and toks[k].low in DURATIONS:
            numbers.append(f"{value * DURATIONS[toks[k].low]:g}s")
            used.add(k)
            i = k + 1
            continue
        # the unit a number is counted in belongs to it: "10 km" is not "10 miles"
        unit = ""
        if k < n and toks[k].low in UNITS:
            unit = UNITS[toks[k].low]
            used.add(k)
            k += 1
        elif i > 0 and toks[i - 1].low in UNITS and toks[i - 1].low not in _UNIT_AFTER_NUMBER_ONLY:
            unit = UNITS[toks[i - 1].low]  # £50, $3
        numbers.append(f"{value:g}{unit}")
        if unit:
            units.add(unit)
        i = k
    return numbers, units, used


#: A part of the day right after a clock hour is am or pm: "seven in the morning" is "7am".
_DAY_PARTS = {"morning": "am", "afternoon": "pm", "evening": "pm", "night": "pm", "today": "pm"}
_HOUR_WORDS = frozenset(w for w, v in _NUMBER_WORDS.items() if isinstance(v, int) and 1 <= v <= 12) | {"one", "o'clock"}
_RANGE_JOINERS = _words("to through thru till until")
_DAY_NAMES = _words("today tomorrow monday tuesday wednesday thursday friday saturday sunday")


def _after_hour(toks: list[Token], i: int) -> bool:
    for k in range(i - 1, max(-1, i - 5), -1):
        u = toks[k]
        if u.text[0].isdigit() or u.low in _HOUR_WORDS:
            return True
        if u.low not in ("in", "the", "this", "at", "on") and DATE_WORDS.get(u.low) not in _DAY_NAMES:
            return False
    return False


def _dates(toks: list[Token]) -> set[str]:
    dates: set[str] = set()
    n = len(toks)
    skip = -1
    for i, t in enumerate(toks):
        if i <= skip:
            continue
        w = t.low
        if ":" in t.text and t.text[0].isdigit():
            dates.add("clock")
            continue
        if w not in DATE_WORDS:
            w = _misspelt(w, DATE_WORDS)
            if w is None:
                continue
        canon = DATE_WORDS[w]
        if canon in _DAY_PARTS and (w != "today" or t.low.startswith("tonight")) and _after_hour(toks, i):
            dates.add(_DAY_PARTS[canon])  # "7 this evening", "3 o'clock tomorrow afternoon"
            dates.discard("this:" + canon)
            continue
        if canon == "now" and i > 0 and toks[i - 1].low == "what":
            continue  # "what now?"
        if canon in ("monday", "saturday") and i + 1 < n:
            # "Monday to Friday", "Mon-Fri": weekdays; "Saturday and Sunday": the weekend
            end, span = ("friday", "weekday") if canon == "monday" else ("sunday", "weekend")
            joiners = _RANGE_JOINERS if canon == "monday" else _RANGE_JOINERS | {"and"}
            j = i + 1 if DATE_WORDS.get(toks[i + 1].low) == end else i + 2 if (
                i + 2 < n and toks[i + 1].low in joiners and DATE_WORDS.get(toks[i + 2].low) == end) else 0
            if j:
                dates.add(span)
                skip = j
                continue
        near_number = (i > 0 and toks[i - 1].text[0].isdigit()) or (i + 1 < n and toks[i + 1].text[0].isdigit())
        if w in _DATE_MODIFIERS:
            if i + 1 < n and toks[i + 1].low in _TIME_NOUNS:
                dates.add(f"{canon}:{DATE_WORDS.get(toks[i + 1].low, toks[i + 1].low)}")
        elif w in _AMBIGUOUS_DATES:
            if near_number or (t.text[0].isupper() and not t.start):
                dates.add(canon)
        elif canon in ("am", "pm"):
            if i > 0 and toks[i - 1].text[0].isdigit():
                dates.add(canon)
        else:
            dates.add(canon)
    return dates


_MISSPELT_INDEX: dict[int, dict[str, list[str]]] = {}


def _misspelt(w: str, table: dict[str, str]) -> str | None:
    """The entry of `table` that `w` misspells, if `w` is not a word the model knows."""
    if len(w) < 5 or not w.isalpha() or w in _vocabulary():
        return None
    index = _MISSPELT_INDEX.get(id(table))
    if index is None:  # the table's entries of 5 letters or more, by first letter, in table order
        index = {}
        for k in table:
            if len(k) >= 5:
                index.setdefault(k[:1], []).append(k)
        _MISSPELT_INDEX[id(table)] = index
    n = len(w)
    for k in index.get(w[:1], ()):
        if abs(len(k) - n) <= 2 and _typo_pair(w, k):
            return k
    return None


def _entities(toks: list[Token], body: str) -> tuple[tuple[str, ...], ...]:
    """Capitalised words that do not start a sentence, and acronyms (not in ALL CAPS or
    Title Case text, where capitals say nothing)."""
    letters = [c for c in body if c.isalpha()]
    if not letters or sum(c.isupper() for c in letters) / len(letters) > 0.6:
        return ()
    # Title Case capitalises function words too ("How To Reset My Password").
    function = [t for t in toks if not t.start and t.low in STOPWORDS and t.low != "i" and t.text[0].isalpha()]
    if len(function) >= 2 and sum(t.text[0].isupper() for t in function) / len(function) > 0.5:
        return ()
    out: list[tuple[str, ...]] = []
    run: list[str] = []
    for t in toks:
        s = t.text
        acronym = len(s) >= 2 and s.isupper() and s.isalpha()
        cap = s[:1].isupper() and not t.start
        if (cap or acronym) and s[0].isalpha() and t.low not in _NOT_ENTITY and t.low not in _COMMON_ACRONYMS and (
                t.low not in _NOT_NAMES):
            run.append(_stem(t.low))
            continue
        if run:
            out.append(tuple(run))
        run = []
    if run:
        out.append(tuple(run))
    return tuple(out)


def extract_features(text: str) -> Features:
    raw = unicodedata.normalize("NFKC", text)
    raw = _ZERO_WIDTH.sub("", raw).replace("\u2019", "'").replace("\u2018", "'")
    body = _COURTESY.sub(". ", _GREETING.sub("", raw))
    toks = _tokens(body)
    lows = [t.low for t in toks]
    n = len(toks)

    # identifiers and quoted literals, from the text as written
    idents: set[str] = set()
    for m in _IDENT_PATTERNS.finditer(body):
        s = m.group(0).rstrip(".,;:!?)")
        if _NUMBER_LIKE.match(s):
            continue
        idents.add(s.casefold())
    for m in _QUOTED.finditer(raw):
        lit = next(g for g in m.groups() if g is not None)
        idents.add(("`" + lit.strip()) if m.group(0).startswith("`") else ('"' + normalize(lit)))

    numbers, units, used = _numbers(toks)
    dates = _dates(toks)

    negations = 0
    polarity: set[tuple[str, str]] = set()
    scope: set[str] = set()
    comparatives: set[tuple[str, str]] = set()
    formats: set[str] = set()
    languages: set[str] = set()
    for k, w in enumerate(lows):
        if w in NEGATORS or w.endswith("n't"):
            negations += 1
        pw = w if w in POLARITY else _misspelt(w, POLARITY)
        if pw is not None:
            axis, pole = POLARITY[pw]
            polarity.add((axis, pole + ("~" if pw in _POLARITY_WEAK else "")))
        if w in SCOPE_WORDS and not (k > 0 and lows[k - 1] == "how"):
            scope.add(SCOPE_WORDS[w] + ("-n" if k + 1 < n and toks[k + 1].text[0].isdigit() else ""))
        deg = _degree(w)
        if deg and not (k > 0 and lows[k - 1] in ("no", "any")):  # "no longer" is not a comparison
            comparatives.add(deg)
        if w in FORMAT_WORDS:
            formats.add(FORMAT_WORDS[w] + ("?" if w in _FORMAT_WEAK else ""))
        if w in LANGUAGE_WORDS:
            languages.add(LANGUAGE_WORDS[w])
    for m in re.finditer(r"(?<![\w+#])(c\+\+|c#|f#|\.net)(?![\w+#])", body, re.IGNORECASE):
        languages.add(m.group(1).lower())
    prefixes = {m.group(1).lower() for m in _PREFIX_PARTICLE.finditer(body)}

    # content words: what the message is about
    content: set[str] = set()
    seq: list[str] = []
    raw_seq: list[str] = []
    for k, t in enumerate(toks):
        w = t.low
        if w in LIGHT:
            continue
        raw_seq.append(w)
        if w in _SYNONYM_STOPS:
            continue
        seq.append(_canon(w) if t.text[0].isalpha() else w)
        if (not t.text[0].isalpha() or k in used or w in STOPWORDS or w in NEGATORS or w.endswith("n't")
                or (w == "time" and k > 0 and lows[k - 1] == "what")):
            continue
        content.add(_stem(w))

    return Features(
        words=tuple(_stem(w) for w in lows),
        seq=tuple(seq),
        raw_seq=tuple(raw_seq),
        content=frozenset(content),
        numbers=tuple(sorted(numbers)),
        units=frozenset(units),
        dates=frozenset(dates),
        identifiers=frozenset(idents),
        entities=_entities(toks, body),
        negations=negations,
        polarity=frozenset(polarity),
        prefixes=frozenset(prefixes),
        scope=frozenset(scope),
        comparatives=frozenset(comparatives),
        formats=frozenset(formats),
        languages=frozenset(languages),
        script=_script_of(body),
        lang=_language_of(lows),
        roles=_roles(toks),
        intents=_intents(toks, body),
        acronyms=frozenset(t.low for t in toks if len(t.text) >= 2 and t.text.isupper() and t.text.isalpha()),
        asked_for=_asked_for(lows),
    )


_CLAUSE_FILLERS = _words("so and but or then also well ok okay um uh er just")
_EMBEDDING_VERBS = _words("tell know ask wondering wonder see check find-out sure idea")
_QUANT_NEXT = _words("much many long often far old big soon quickly early late")
_CAUSE_NEXT = _words("causes caused causing cause makes made")
_TIME_HEADS = _words("time times hours date dates day")
_COST_WORDS = _words("cost costs price prices fee fees charge charges charged pay paid bill billed rate rates")


def _intents(toks: list[Token], body: str) -> frozenset[str]:
    """The kinds of question a message asks, from its question words at the start of a
    sentence or clause, or after "tell me" / "do you know": who, where, when, why, quant."""
    out: set[str] = set()
    n = len(toks)
    for i, t in enumerate(toks):
        w = t.low
        if w not in ("who", "whom", "whose", "where", "when", "why", "how", "what", "by", "until", "is"):
            continue
        if w == "is" and not (i + 2 < n and toks[i + 1].low == "there" and (
                toks[i + 2].low in _STEP_NOUNS or i + 3 < n and toks[i + 3].low in _STEP_NOUNS)):
            continue
        k = i - 1
        while k >= 0 and toks[k].low in _CLAUSE_FILLERS:
            k -= 1
        clause_start = t.start or k < 0 or _clause_break(body, toks, k, i)
        embedded = k >= 0 and (toks[k].low in _EMBEDDING_VERBS or (toks[k].low in ("me", "us") and k > 0 and toks[k - 1].low in _EMBEDDING_VERBS))
        if not (clause_start or embedded):
            continue
        nx = toks[i + 1].low if i + 1 < n else ""
        if w in ("who", "whom", "whose"):
            out.add("who")
        elif w == "where":
            out.add("where")
        elif w == "when" or (w == "what" and nx in ("time", "date", "day")) or (w in ("by", "until") and nx in ("when", "what")):
            out.add("when")
        elif w == "why" or (w == "how" and nx == "come") or (w == "what" and nx in _CAUSE_NEXT):
            out.add("why")
        elif w == "what" and _asks_for_time(toks, i + 1):
            out.add("when")
        elif w == "how" and nx in _QUANT_NEXT:
            out.add("quant")
        elif w == "how" and (nx in _HOWTO_NEXT or not nx or toks[i + 1].start):
            out.add("howto")
        elif w == "what" and _asks_for_steps(toks, i + 1) or w == "is":
            out.add("howto")  # "what's the way to", "is there a way to"
    if "quant" in out and any(t.low in _COST_WORDS for t in toks):
        out.discard("quant")  # "how much does it cost" asks what "what's the price" asks
    return frozenset(out)


def _asks_for_time(toks: list[Token], j: int) -> bool:
    """ "what is the check-in time", "what are your opening hours": a "what" question whose
    subject is a time asks when."""
    n = len(toks)
    if j < n and toks[j].low in ("is", "are", "was", "will"):
        j += 1
    if j < n and toks[j].low in _DETERMINERS:
        j += 1
    else:
        return False
    for k in range(j, min(n, j + 3)):
        w = toks[k].low
        if w in _TIME_HEADS:
            return k + 1 >= n or toks[k + 1].start or toks[k + 1].low in ("for", "of", "on", "at", "in")
        if w in STOPWORDS and w not in _DETERMINERS:
            return False
    return False


_VAGUE_PLACES = _words("somewhere anywhere place places option options facility facilities way ways")
_HOWTO_NEXT = _words("do does can could should would will might must to i we")
_STEP_NOUNS = _words("way ways process procedure steps step")


def _asks_for_steps(toks: list[Token], j: int) -> bool:
    """ "what's the way to", "what is the process for", "what do I need to do to"."""
    w = [t.low for t in toks[j : j + 6]]
    if w[:1] and w[0] in ("is", "are"):
        w = w[1:]
    if w[:1] and w[0] in _DETERMINERS:
        return len(w) > 1 and w[1] in _STEP_NOUNS or len(w) > 2 and w[2] in _STEP_NOUNS
    if w[:1] == ["steps"]:
        return True
    return len(w) >= 3 and w[0] in ("do", "should", "must") and w[1] in ("i", "we") and (
        w[2] == "do" or w[2:4] == ["need", "to"] or w[2:4] == ["have", "to"])


def _asked_for(lows: list[str]) -> frozenset[str]:
    """The thing an existence question asks about: "is there a shuttle", "is parking
    available", "are there any vegan options" (its first content word, canonical)."""
    out: set[str] = set()
    n = len(lows)
    for i, w in enumerate(lows):
        j = -1
        if w in ("is", "are") and i + 1 < n and lows[i + 1] == "there":
            j = i + 2
        elif w in ("available", "availability") and i >= 2:
            k = i - 2
            while k >= 0 and lows[k] not in ("is", "are"):
                k -= 1
            j = k + 1 if k >= 0 and i - 1 - k <= 4 else -1
        if j < 0:
            continue
        for k in range(j, min(n, j + 4)):
            x = lows[k]
            if x in _VAGUE_PLACES:
                break
            if x in STOPWORDS or x in _DETERMINERS or x in LIGHT or x in NEGATORS or x in SCOPE_WORDS:
                continue
            if x.isalpha():
                out.add(_canon(x))
            break
    return frozenset(out)


def _clause_break(body: str, toks: list[Token], k: int, i: int) -> bool:
    """Is there a comma, semicolon, colon or dash between token k and token i?"""
    return any(c in ",;:\u2013\u2014-" for c in body[toks[k].end : toks[i].pos])


_ROLE_PREPS = {"from": "src", "to": "dst", "into": "dst", "onto": "dst", "towards": "dst", "toward": "dst",
               "than": "cmp", "instead": "alt", "vs": "vs", "versus": "vs"}
_DETERMINERS = _words("a an the my your our their his her its this that these those some any each every")


def _roles(toks: list[Token]) -> tuple[tuple[str, str], ...]:
    """(role, head word) for the word each from/to/into/than governs."""
    out: list[tuple[str, str]] = []
    n = len(toks)
    for i, t in enumerate(toks):
        role = _ROLE_PREPS.get(t.low)
        if role is None:
            continue
        seen_det = False
        for j in range(i + 1, min(n, i + 5)):
            u = toks[j]
            if u.low in _ROLE_PREPS:
                break
            if u.low in _DETERMINERS:
                seen_det = True
                continue
            if u.text[0].isalpha() and u.low not in STOPWORDS:
                noun = u.text[0].isupper() or u.low in UNITS or u.low in FORMAT_WORDS or u.low in LANGUAGE_WORDS
                if t.low == "to" and not seen_det and not noun:
                    break  # "to get": an infinitive, not a destination
                out.append((role, _canon(u.low)))
                break
    return tuple(out)


# ---------------------------------------------------------------------------------------
# guards: (features a, features b, similarity, config) -> True when the pair may merge
# ---------------------------------------------------------------------------------------


def _guard_numbers(a: Features, b: Features, score: float, cfg: MatchConfig) -> bool:
    return a.numbers == b.numbers and a.units == b.units


def _guard_dates(a: Features, b: Features, score: float, cfg: MatchConfig) -> bool:
    return a.dates == b.dates


def _guard_identifiers(a: Features, b: Features, score: float, cfg: MatchConfig) -> bool:
    return a.identifiers == b.identifiers


def _mentions(words: tuple[str, ...], phrase: tuple[str, ...]) -> bool:
    k = len(phrase)
    if k == 1:
        w = phrase[0]
        return w in words or any(_typo_pair(w, x) for x in words if x[:1] == w[:1])
    return any(words[i : i + k] == phrase for i in range(len(words) - k + 1))


def _first_position(words: tuple[str, ...], phrase: tuple[str, ...]) -> int:
    k = len(phrase)
    for i in range(len(words) - k + 1):
        if words[i : i + k] == phrase:
            return i
    return -1


_INITIALS_SKIP = _words("of and the for to in on &")


def _spelled_out(acronym: str, words: tuple[str, ...]) -> bool:
    """Do consecutive content words of `words` spell `acronym` ("2FA": "two-factor
    authentication", "DWP": "Department for Work and Pensions")?"""
    k = len(acronym)
    if not 2 <= k <= 6:
        return False
    heads = [w for w in words if w not in _INITIALS_SKIP]
    for i in range(len(heads) - k + 1):
        if all(heads[i + j][:1] == acronym[j] and heads[i + j] not in STOPWORDS for j in range(k)):
            return True
    return False


def _named(e: tuple[str, ...], mine: Features, other: Features) -> bool:
    return _mentions(other.words, e) or (len(e) == 1 and e[0] in mine.acronyms and _spelled_out(e[0], other.words))


def _guard_entities(a: Features, b: Features, score: float, cfg: MatchConfig) -> bool:
    if a.entities == b.entities and len(a.entities) < 2:
        return True
    # Every name either message capitalises must appear (in any case, or spelt out for an
    # acronym) in the other one ...
    if not (all(_named(e, a, b) for e in a.entities) and all(_named(e, b, a) for e in b.entities)):
        return False
    # ... and two or more names must come in the same order (from Octopus to British Gas).
    names = list(dict.fromkeys(a.entities + b.entities))
    if len(names) < 2:
        return True
    pos_a = [(p, e) for e in names if (p := _first_position(a.words, e)) >= 0]
    pos_b = [(p, e) for e in names if (p := _first_position(b.words, e)) >= 0]
    common = {e for _, e in pos_a} & {e for _, e in pos_b}
    order_a = [e for _, e in sorted(pos_a) if e in common]
    order_b = [e for _, e in sorted(pos_b) if e in common]
    return order_a == order_b


def _guard_negation(a: Features, b: Features, score: float, cfg: MatchConfig) -> bool:
    return a.negations == b.negations


def _guard_polarity(a: Features, b: Features, score: float, cfg: MatchConfig) -> bool:
    if a.prefixes != b.prefixes:
        return False
    if a.polarity == b.polarity:
        return True
    pa: dict[str, set[str]] = {}
    pb: dict[str, set[str]] = {}
    for axis, pole in a.polarity:
        pa.setdefault(axis, set()).add(pole)
    for axis, pole in b.polarity:
        pb.setdefault(axis, set()).add(pole)
    for axis in pa.keys() | pb.keys():
        sa = {p.rstrip("~") for p in pa.get(axis, ())}
        sb = {p.rstrip("~") for p in pb.get(axis, ())}
        if sa == sb:
            continue
        if sa and sb:
            return False  # opposite poles, or one message names both
        only = pa.get(axis) or pb.get(axis) or set()
        if axis in MARKED and "-" in only:
            if axis in _ENDING_AXES:
                silent = pb if pa.get(axis) else pa
                if any(ax in _ENDING_AXES and any(p[0] == "-" for p in poles) for ax, poles in silent.items()):
                    continue  # "close" against "delete": both end something
            return False  # "closed" against silence
    return True


def _guard_scope(a: Features, b: Features, score: float, cfg: MatchConfig) -> bool:
    return a.scope == b.scope


#: Comparatives of size that say what "increase"/"reduce" say: "make it bigger".
_SIZE_POLES = {"big": "+", "large": "+", "high": "+", "long": "+", "small": "-", "low": "-", "short": "-"}


def _guard_comparatives(a: Features, b: Features, score: float, cfg: MatchConfig) -> bool:
    if a.comparatives == b.comparatives:
        return True
    # "make the text bigger" asks what "increase the font size" asks
    for mine, other in ((a.comparatives - b.comparatives, b), (b.comparatives - a.comparatives, a)):
        for stem, deg in mine:
            pole = _SIZE_POLES.get(stem)
            if deg != "cmp" or pole is None or ("amount", pole) not in other.polarity:
                return False
    return True


def _guard_format(a: Features, b: Features, score: float, cfg: MatchConfig) -> bool:
    if a.formats == b.formats:
        return True
    strong_a = {f for f in a.formats if not f.endswith("?")}
    strong_b = {f for f in b.formats if not f.endswith("?")}
    all_a = {f.rstrip("?") for f in a.formats}
    all_b = {f.rstrip("?") for f in b.formats}
    # A clear format word must be matched; ambiguous ones ("list", "short") only clash
    # with a different format word.
    if not (strong_a <= all_b and strong_b <= all_a):
        return False
    return not (all_a and all_b) or all_a == all_b


def _guard_language(a: Features, b: Features, score: float, cfg: MatchConfig) -> bool:
    if a.languages != b.languages:
        return False
    if a.script and b.script and a.script != b.script:
        return False
    return not (a.lang and b.lang and a.lang != b.lang)


def _guard_roles(a: Features, b: Features, score: float, cfg: MatchConfig) -> bool:
    shared = {_canon(w) for w in a.words} & {_canon(w) for w in b.words}
    ra = {(r, w) for r, w in a.roles if w in shared}
    rb = {(r, w) for r, w in b.roles if w in shared}
    if ra == rb:
        return True
    # The same shared word in two roles, or one role held by different shared words.
    for mine, other in ((ra, rb), (rb, ra)):
        for r, w in mine:
            if any(w2 == w and r2 != r for r2, w2 in other):
                return False
            if any(r2 == r and w2 != w for r2, w2 in other) and (r, w) not in other:
                return False
    return True


@functools.lru_cache(maxsize=1)
def _vocabulary() -> frozenset[str]:
    """Whole words of the model's WordPiece vocabulary (typos are rarely among them)."""
    try:
        import json

        from embeddings.embedder import default_tokenizer_path

        with open(default_tokenizer_path(), encoding="utf-8") as f:
            vocab = json.load(f)["model"]["vocab"]
        return frozenset(w for w in vocab if w.isalpha())
    except (OSError, ValueError, KeyError):  # pragma: no cover - no vocabulary: no pair is a typo
        return frozenset()


def _edit_distance(a: str, b: str, limit: int) -> int:
    """Damerau-Levenshtein (optimal string alignment), stopping early above `limit`."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] | None = None
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if prev2 is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


def _affix_pair(x: str, y: str) -> bool:
    """y is x with a meaning-changing prefix (or the reverse): safe/unsafe, lock/unlock."""
    if len(x) > len(y):
        x, y = y, x
    if len(x) < 3:
        return False
    return any(y == p + x for p in AFFIXES) or (x.endswith("ful") and y == x[:-3] + "less") or (
        x.endswith("less") and y == x[:-4] + "ful")


@functools.lru_cache(maxsize=WORD_MEMO)
def _typo_pair(x: str, y: str) -> bool:
    """A likely misspelling: close in spelling, same first letter, and not two real words."""
    if x == y or x[:1] != y[:1] or not (x.isalpha() and y.isalpha()):
        return False
    vocab = _vocabulary()
    known_x, known_y = x in vocab, y in vocab
    if known_x and known_y:
        return False
    shorter = min(len(x), len(y))
    limit = 2 if shorter >= 8 else 1 if shorter >= 5 else 0
    if limit == 0 and shorter == 4 and len(x) != len(y):
        short, long_ = (x, y) if len(x) < len(y) else (y, x)
        # a doubled letter written once: "aply" for "apply"
        return len(long_) == 5 and any(long_[i] == long_[i + 1] and short == long_[:i] + long_[i + 1:] for i in range(4))
    if limit == 0 or _affix_pair(x, y):
        return False
    return _edit_distance(x, y, limit) <= limit


def lexical_variant(a: Features, b: Features) -> bool:
    """The same words in the same order, up to misspellings and listed synonyms: a
    near-repeat whatever its similarity (typos scatter word pieces and drag it down)."""
    if len(a.raw_seq) != len(b.raw_seq) or a.raw_seq == b.raw_seq and a.seq == b.seq and not a.raw_seq:
        return False
    return all(x == y or _canon(x) == _canon(y) or _typo_pair(x, y) for x, y in zip(a.raw_seq, b.raw_seq))


def _equivalent(x: str, y: str) -> bool:
    return x == y or _canon(x) == _canon(y) or _typo_pair(x, y)


def near_copy_ratio(a: Features, b: Features) -> float:
    """How much of the two messages is the same words in the same order (0..1)."""
    return difflib.SequenceMatcher(None, a.seq, b.seq, autojunk=False).ratio()


def _guard_wording(a: Features, b: Features, score: float, cfg: MatchConfig) -> bool:
    """A near-copy of the other message (same words, same order) that swaps or adds a
    content word is about that word: it merges only if the word is a spelling variant,
    inflection or listed synonym of its partner, or the similarity clears the stricter
    near-copy threshold."""
    da = set(a.content - b.content)
    db = set(b.content - a.content)
    if (da or db) and lexical_variant(a, b):
        return True
    for x in da:
        for y in db:
            if _affix_pair(x, y):
                return False
    for x in list(da):
        for y in list(db):
            if y in db and _equivalent(x, y):
                da.discard(x)
                db.discard(y)
                break
    if not da and not db:
        return True
    if near_copy_ratio(a, b) < cfg.near_copy_ratio:
        return True  # reworded: the embedding and the other guards judge it
    return score >= cfg.near_copy_threshold


def _guard_intent(a: Features, b: Features, score: float, cfg: MatchConfig) -> bool:
    """Below the confident threshold, both must ask the same kind of question
    ("Where is my order?" is not "Can I return my order?"), and what an existence question
    asks about ("is there a shuttle") must be named in the other message."""
    if score >= cfg.confident_threshold:
        return True
    if a.intents != b.intents:
        return False
    for mine, other in ((a, b), (b, a)):
        if mine.asked_for and not mine.asked_for <= {_canon(w) for w in other.raw_seq}:
            return False
    return True


_GUARD_FUNCS: dict[str, Callable[[Features, Features, float, MatchConfig], bool]] = {
    "numbers": _guard_numbers,
    "dates": _guard_dates,
    "identifiers": _guard_identifiers,
    "entities": _guard_entities,
    "negation": _guard_negation,
    "polarity": _guard_polarity,
    "scope": _guard_scope,
    "comparatives": _guard_comparatives,
    "format": _guard_format,
    "language": _guard_language,
    "roles": _guard_roles,
    "wording": _guard_wording,
    "intent": _guard_intent,
}
assert set(_GUARD_FUNCS) == set(GUARDS)


# ---------------------------------------------------------------------------------------
# the public API
# ---------------------------------------------------------------------------------------


def parse_guards(names: Iterable[str] | str | None) -> frozenset[str]:
    """Guard names to a set: "all", names, and "-name"/"!name"/"no-name" to switch one off."""
    if names is None:
        return frozenset(GUARDS)
    if isinstance(names, str):
        names = [n for n in re.split(r"[,\s]+", names) if n]
    names = list(names)
    on: set[str] = set()
    off: set[str] = set()
    if not names or all(n.startswith(("-", "!", "no-")) for n in names):
        on = set(GUARDS)
    for raw in names:
        n = raw.strip().lower()
        neg = n.startswith(("-", "!", "no-"))
        n = n[3:] if n.startswith("no-") else n.lstrip("-!")
        if n in ("all", "*"):
            (off if neg else on).update(GUARDS)
            continue
        if n in ("none", ""):
            continue
        if n not in _GUARD_FUNCS:
            raise ValueError(f"unknown guard {raw!r}; known: {', '.join(GUARDS)}")
        (off if neg else on).add(n)
    return frozenset(on - off)


@dataclass
class MatchConfig:
    threshold: float = DEFAULT_THRESHOLD
    guards: frozenset[str] = field(default_factory=lambda: frozenset(GUARDS))
    max_tokens: int = DEFAULT_MAX_TOKENS
    near_copy_threshold: float = DEFAULT_NEAR_COPY_THRESHOLD
    near_copy_ratio: float = DEFAULT_NEAR_COPY_RATIO
    confident_threshold: float = DEFAULT_CONFIDENT_THRESHOLD

    def __post_init__(self) -> None:
        self.guards = parse_guards(self.guards) if not isinstance(self.guards, frozenset) else self.guards
        unknown = self.guards - set(GUARDS)
        if unknown:
            raise ValueError(f"unknown guard(s) {sorted(unknown)}; known: {', '.join(GUARDS)}")
        if not 0.0 < float(self.threshold) <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        self.threshold = float(self.threshold)

    @classmethod
    def from_settings(cls, cfg: Any, max_tokens: int | None = None) -> MatchConfig:
        """From an object with `threshold` and `guards` (names; "all", "-name")."""
        threshold = getattr(cfg, "threshold", None)
        guards = getattr(cfg, "guards", None)
        return cls(
            threshold=DEFAULT_THRESHOLD if threshold is None else float(threshold),
            guards=parse_guards(guards),
            max_tokens=int(max_tokens or getattr(cfg, "max_tokens", None) or DEFAULT_MAX_TOKENS),
        )

    def without(self, *names: str) -> MatchConfig:
        return replace(self, guards=self.guards - set(names))


@dataclass(frozen=True)
class Probe:
    """One final user message, ready to compare."""

    text: str
    normalized: str
    vector: np.ndarray | None  # None: over the window (or no embedder): exact matches only
    fits: bool = True  # within the embedder's window
    key: str = ""  # merge key: normalized if it fits, else the text itself
    # The guard features, filled by the `features` property on first use. A field (not a
    # cached_property) so that copies made with dataclasses.replace keep them.
    _features: Features | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.normalized if self.fits else "\x00" + self.text)

    @property
    def features(self) -> Features | None:
        """The guard features (None over the window), computed on first use and kept.

        Lazy because extract_features costs more than the rest of a request's matching,
        and most requests never meet a candidate close enough to need the guards.
        """
        if not self.fits:
            return None
        if self._features is None:
            object.__setattr__(self, "_features", extract_features(self.text))
        return self._features


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
        self._guards = [(name, _GUARD_FUNCS[name]) for name in GUARDS if name in self.config.guards]

    # -- probes --------------------------------------------------------------------------

    def normalize(self, text: str) -> str:
        """The merge key of a final message (same as :meth:`key`): the normalized text if it
        fits the window, else the text itself, so an over-window message merges only when
        identical (invariant 8). Cheap: no embedding."""
        return self.key(text)

    def fits(self, text: str) -> bool:
        """Within the embedder's window (special tokens counted)? Cheap; no embedding."""
        if len(text) > MAX_CHARS:
            return False
        if self._fits is not None:
            return bool(self._fits(text, self.max_tokens))
        # No tokenizer: each word is at least one piece.
        return len(text.split()) + 2 <= self.max_tokens

    def key(self, text: str) -> str:
        """The merge key of a final message: its normalized form if it fits the window, else
        the text itself (an over-window message merges only when identical)."""
        return normalize(text) if self.fits(text) else "\x00" + text

    def prepare(self, text: str) -> Probe:
        """A probe without a vector (no embedding): enough for exact/normalized matches."""
        return Probe(text=text, normalized=normalize(text), vector=None, fits=self.fits(text))

    async def embed(self, probe: Probe) -> Probe:
        if probe.vector is not None or not probe.fits or self.embedder is None:
            return probe
        vector = await self.embedder.embed(probe.text)
        return replace(probe, vector=vector)

    async def probe(self, text: str) -> Probe:
        return await self.embed(self.prepare(text))

    def probe_with_vector(self, text: str, vector: np.ndarray | None) -> Probe:
        """A probe from a vector computed elsewhere (batch evaluation)."""
        p = self.prepare(text)
        return replace(p, vector=vector) if p.fits and vector is not None else p

    # -- decisions -----------------------------------------------------------------------

    def refusals(self, a: Probe, b: Probe, score: float | None = None, *, stop_at_first: bool = True) -> list[str]:
        """Names of the enabled guards that refuse the pair."""
        fa, fb = a.features, b.features
        if fa is None or fb is None:
            return ["window"]
        if score is None:
            score = float(np.dot(a.vector, b.vector)) if a.vector is not None and b.vector is not None else 0.0
        out = []
        for name, guard in self._guards:
            if not guard(fa, fb, score, self.config):
                out.append(name)
                if stop_at_first:
                    break
        return out

    def compare(self, a: Probe, b: Probe) -> float | None:
        """The similarity if `a` and `b` may merge, else None."""
        if a.key == b.key:
            return 1.0
        if a.vector is None or b.vector is None:
            return None
        score = float(np.dot(a.vector, b.vector))
        if score < self.config.threshold and not self.variant(a, b):
            return None
        if self.refusals(a, b, score):
            return None
        return score

    @staticmethod
    def variant(a: Probe, b: Probe) -> bool:
        """Same words in the same order up to typos and listed synonyms (merges below the threshold)."""
        return a.features is not None and b.features is not None and lexical_variant(a.features, b.features)

    def explain(self, a: Probe, b: Probe) -> dict[str, Any]:
        """Why a pair merges or not: score, normalized equality, every refusing guard."""
        same = a.key == b.key
        score = float(np.dot(a.vector, b.vector)) if a.vector is not None and b.vector is not None else None
        refused = [] if same else self.refusals(a, b, score, stop_at_first=False)
        if not same and (a.vector is None or b.vector is None):
            refused = ["window"]
        above = score is not None and score >= self.config.threshold
        variant = not same and score is not None and self.variant(a, b)
        return {
            "score": score,
            "normalized_equal": same,
            "variant": variant,
            "fits": a.fits and b.fits,
            "threshold": self.config.threshold,
            "above_threshold": above,
            "refused_by": refused,
            "merge": same or ((above or variant) and not refused),
        }


class SemanticIndex:
    """The in-flight messages of ONE group (scope + history): a matrix of their vectors."""

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
        """The most similar entry the matcher allows to merge with `probe`, or None."""
        same = self._keys.get(probe.key)
        if same:
            return same[0], 1.0
        if probe.vector is None or not self._ids or self._matrix is None:
            return None
        n = len(self._ids)
        scores = self._matrix[:n] @ np.asarray(probe.vector, dtype=np.float32).reshape(-1)
        threshold = self.matcher.config.threshold
        order = np.argsort(-scores, kind="stable")
        below = 0
        for row in order:
            row = int(row)
            score = float(scores[row])
            other = self._probes[row]
            if score < threshold:
                # Only a misspelt or synonym-swapped copy merges below the threshold;
                # look at a few of the nearest.
                below += 1
                if below > VARIANT_CANDIDATES or score < VARIANT_FLOOR:
                    break
                if not self.matcher.variant(probe, other):
                    continue
            if not self.matcher.refusals(probe, other, score):
                return self._ids[row], score
        return None
