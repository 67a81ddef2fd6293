"""The merge rule (proxy.semantic.decide): verify by difference, per class of issue 13.

Pairs are herd's own. Each class was seen merged by the matcher this package replaced
(proxy/matcher.py at its defaults: threshold 0.62, all guards, int8), and is refused now.
Vectors are the bundled model's own, so the embedding is as convinced as in production.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.semantic import MatchConfig, Matcher, Probe, SemanticIndex, decide, normalize
from proxy.semantic.verify import analyse

LONG = (
    "Here is the context for my question. I run a small bakery with two shops, one in the town centre and "
    "one near the station. We bake bread, cakes and pastries every morning from five, and we sell about four "
    "hundred loaves a day across both shops. Last month we started delivering to three cafes, which means the "
    "van leaves at seven and comes back by ten. The station shop opens at six thirty for commuters and closes "
    "at three, while the town shop opens at eight and closes at five thirty. We have six staff, two of them "
    "part time, and everyone works one Saturday in three. Our flour comes from a mill forty miles away and is "
    "delivered every Tuesday. "
)

# (class, a, b): each must NOT merge
TRAPS = [
    ("role", "How do I gain fat and lose muscle?", "How do I lose fat and gain muscle?"),
    ("role", "Why does my cat chase the dog?", "Why does my dog chase the cat?"),
    ("role", "Cheapest trains from Leeds to York", "Cheapest trains from York to Leeds"),
    ("role", "Should the tenant pay the landlord for repairs?", "Should the landlord pay the tenant for repairs?"),
    ("role", "Is tea healthier than coffee?", "Is coffee healthier than tea?"),
    ("range", "Count from 1 to 10", "Count from 10 to 1"),
    ("range", "Print the even numbers from 2 to 40", "Print the even numbers from 40 to 2"),
    ("ordinal", "Who was the second person to walk on the moon?", "Who was the first person to walk on the moon?"),
    ("antonym", "Turn left after the bank and right at the church", "Turn right after the bank and left at the church"),
    ("antonym", "Should I import before I export the data?", "Should I export before I import the data?"),
    ("antonym", "Why do rich countries lend to poor countries?", "Why do poor countries lend to rich countries?"),
    ("antonym", "Is it smart to buy high and sell low?", "Is it smart to buy low and sell high?"),
    ("script", "启用通知", "禁用通知"),
    ("script", "如何重置我的密码", "如何取消我的订阅"),
    ("script", "मेरा पासवर्ड रीसेट करें", "फ्रांस की राजधानी क्या है"),
    ("script", "आज मौसम कैसा है", "मेरा ऑर्डर कहाँ है"),
    ("script", "Как включить уведомления?", "Как отключить уведомления?"),
    ("script", "알림을 켜는 방법", "알림을 끄는 방법"),
    ("script", "วิธีรีเซ็ตรหัสผ่าน", "วิธียกเลิกการสมัครสมาชิก"),
    ("french", "Le magasin est ouvert le dimanche ?", "Le magasin n'est pas ouvert le dimanche ?"),
    ("french", "Je veux annuler ma commande", "Je ne veux pas annuler ma commande"),
    ("spanish", "¿Cómo dejo el modo activo?", "¿Cómo dejo el modo desactivo?"),
    ("spanish", "¿La tienda está abierta hoy?", "¿La tienda está cerrada hoy?"),
    ("long", LONG + "Which of my costs should I cut first?", LONG + "Which of my prices should I cut first?"),
    ("long", LONG + "Should I keep the van?", LONG + "Should I sell the van?"),
    ("long", LONG + "Summarise my week.", LONG + "Summarise my week. Answer as a table."),
    ("long", LONG + "What should I change?", LONG + "What should I change? Reply in German."),
]

# (class, a, b): each must merge (refused by the old matcher, or merged only by luck)
SAME = [
    ("case", "How deep is the river Thames, please?", "How deep is the River Thames?"),
    ("detected-as-portuguese", "Write a SQL query that counts the users per country",
     "Please write a SQL query that counts the users per country"),
    ("quoted", 'Define "serendipity", please', "Define 'serendipity'"),
    ("frame", "How do I reset my password?", "how can I reset my password"),
    ("frame", "Can you tell me what the capital of France is?", "What is the capital of France?"),
    ("opener", "Sorry to bother you, but how do I bleed a radiator?", "How do I bleed a radiator?"),
    ("fronted", "In the app settings, how do I change the language?",
     "How do I change the language in the app settings?"),
    ("typo", "How do I change the email adress on my acount?", "How do I change the email address on my account?"),
    ("spelling", "Summarise the plot of Hamlet", "Can you summarize the plot of Hamlet?"),
    ("long", LONG + "Can you summarise my week, please?", LONG + "Summarize my week."),
]


@pytest.fixture(scope="module")
def embedder():
    from embeddings.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="module")
def matcher(embedder) -> Matcher:
    return Matcher(None, MatchConfig(max_tokens=embedder.max_tokens), fits=embedder.fits)


def probes(matcher: Matcher, embedder, *texts: str) -> list[Probe]:
    vectors = embedder.embed(list(texts))
    return [matcher.probe_with_vector(t, v) for t, v in zip(texts, vectors)]


@pytest.mark.parametrize("kind, a, b", TRAPS, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(TRAPS)])
def test_traps_never_merge(matcher, embedder, kind, a, b):
    pa, pb = probes(matcher, embedder, a, b)
    d = decide(pa, pb, matcher.config)
    assert not d.merge, (kind, d)
    assert decide(pb, pa, matcher.config) == d


@pytest.mark.parametrize("kind, a, b", TRAPS, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(TRAPS)])
def test_traps_never_merge_even_when_the_embedding_calls_them_identical(matcher, kind, a, b):
    one = np.ones(4, dtype=np.float32) / 2
    pa, pb = matcher.probe_with_vector(a, one), matcher.probe_with_vector(b, one)
    assert not decide(pa, pb, matcher.config).merge


@pytest.mark.parametrize("kind, a, b", SAME, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(SAME)])
def test_neutral_differences_merge(matcher, embedder, kind, a, b):
    pa, pb = probes(matcher, embedder, a, b)
    d = decide(pa, pb, matcher.config)
    assert d.merge and not d.normalized_equal, (kind, d)
    assert decide(pb, pa, matcher.config) == d


def test_conjuncts_in_another_order_stay_refused(matcher, embedder):
    # "US and UK" = "UK and US", but "gain fat and lose muscle" shows an "and" does not
    # make an order neutral: the tables cannot prove it, so it costs one upstream call.
    pa, pb = probes(matcher, embedder, "Compare the US and the UK", "Compare the UK and the US")
    d = decide(pa, pb, matcher.config)
    assert not d.merge and "order" in d.reason


def test_normalized_equal_merges_in_any_language(matcher):
    for a, b in [("如何重置我的密码？", "如何重置我的密码"),
                 ("¿Cómo restablezco mi contraseña?", "cómo restablezco mi contraseña")]:
        d = decide(matcher.prepare(a), matcher.prepare(b), matcher.config)
        assert d.merge and d.normalized_equal


def test_over_the_window_never_merges_semantically(embedder):
    m = Matcher(None, MatchConfig(max_tokens=embedder.max_tokens), fits=embedder.fits)
    body = " ".join(f"Paragraph {i} repeats the same long remark about the report." for i in range(40))
    a, b = body + " Summarise it.", body + " Summarise it, please."
    assert not m.fits(a)
    one = np.ones(4, dtype=np.float32) / 2
    pa, pb = m.probe_with_vector(a, one), m.probe_with_vector(b, one)
    assert pa.vector is None and m.key(a) == "\x00" + a
    assert not decide(pa, pb, m.config).merge
    assert decide(pa, m.prepare(a), m.config).merge  # the identical text still does


def test_a_language_the_model_does_not_declare_is_refused_and_one_without_tables_too():
    one = np.ones(4, dtype=np.float32) / 2
    m = Matcher(None, MatchConfig(languages=("fr",)))
    a = m.probe_with_vector("How do I reset my password?", one)
    b = m.probe_with_vector("how can I reset my password", one)
    assert not decide(a, b, m.config).merge  # English is not declared by this model
    m = Matcher(None, MatchConfig(languages=("en", "de")))
    a, b = (m.probe_with_vector("Wie setze ich mein Passwort zurück?", one),
            m.probe_with_vector("Bitte, wie setze ich mein Passwort zurück?", one))
    d = decide(a, b, m.config)
    assert not d.merge and "normalized-equal" in d.reason  # declared, but no German tables


def test_a_greeting_alone_has_nothing_to_merge_on():
    one = np.ones(4, dtype=np.float32) / 2
    m = Matcher(None)
    assert not decide(m.probe_with_vector("Hello!", one), m.probe_with_vector("Thanks!", one)).merge


def test_the_threshold_is_a_second_witness(matcher):
    a, b = "How do I reset my password?", "how can I reset my password"
    x, y = np.array([1.0, 0.0], dtype=np.float32), np.array([0.0, 1.0], dtype=np.float32)
    d = decide(matcher.probe_with_vector(a, x), matcher.probe_with_vector(b, y), matcher.config)
    assert d.verified and not d.merge and "below" in d.reason


# -- the index -------------------------------------------------------------------------


def test_index_merges_only_what_decide_allows_and_in_either_order(matcher, embedder):
    texts = ["How do I gain fat and lose muscle?", "How do I lose fat and gain muscle?",
             "How can I lose fat and gain muscle, please?"]
    pa, pb, pc = probes(matcher, embedder, *texts)
    for first, second, expect in [(pa, pb, False), (pb, pa, False), (pb, pc, True), (pc, pb, True), (pa, pc, False)]:
        index = SemanticIndex(matcher)
        index.add("x", first)
        found = index.best(second)
        assert (found is not None) == expect
        assert (found is not None) == decide(first, second, matcher.config).merge


def test_the_verifier_runs_only_on_candidates(matcher):
    index = SemanticIndex(matcher)
    index.add("x", matcher.probe_with_vector("How do I reset my password?", np.array([1.0, 0.0], dtype=np.float32)))
    far = matcher.probe_with_vector("What is the capital of France?", np.array([0.0, 1.0], dtype=np.float32))
    assert index.best(far) is None
    assert not far._form  # never analysed: no candidate reached the threshold


def test_index_remove_and_exact_only(matcher):
    index = SemanticIndex(matcher)
    index.add("a", matcher.prepare("Hello there"))  # no vector: exact key only
    index.add("b", matcher.probe_with_vector("How do I reset my password?", np.array([1.0, 0.0], dtype=np.float32)))
    assert len(index) == 2 and index.best(matcher.prepare("hello there!")) == ("a", 1.0)
    index.remove("a")
    index.remove("b")
    assert len(index) == 0 and index.best(matcher.prepare("hello there")) is None


# -- properties --------------------------------------------------------------------------

WORDS = ["how", "do", "i", "can", "you", "please", "the", "a", "reset", "my", "password", "not", "from", "to",
         "1", "10", "fat", "muscle", "gain", "lose", "thanks", "hi", ",", "?", "is", "are", "colour", "color",
         "summarise", "summarize", "tell", "me", "what", "in", "app", "'quoted'", "A", "recieve", "receive"]
ONE = np.ones(4, dtype=np.float32) / 2
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.lists(st.sampled_from(WORDS), max_size=10), st.lists(st.sampled_from(WORDS), max_size=10),
       st.floats(0.0, 1.0))
def test_decide_is_symmetric(xs, ys, cos):
    m = Matcher(None)
    v1 = np.array([1.0, 0.0], dtype=np.float32)
    v2 = np.array([cos, np.sqrt(1 - cos * cos)], dtype=np.float32)
    a, b = m.probe_with_vector(" ".join(xs), v1), m.probe_with_vector(" ".join(ys), v2)
    assert decide(a, b, m.config) == decide(b, a, m.config)


CONTENT = ["fat", "muscle", "boston", "denver", "tenant", "landlord", "river", "bridge", "cat", "dog", "left",
           "right", "import", "export", "rich", "poor", "red", "blue", "coffee", "tea", "7", "12"]


@FAST
@given(st.lists(st.sampled_from(CONTENT), min_size=2, max_size=5, unique=True).flatmap(
    lambda ws: st.tuples(st.just(ws), st.permutations(ws))), st.sampled_from([" and ", " to ", " ", ", "]))
def test_permuting_content_words_never_merges(words_and_shuffled, joiner):
    words, shuffled = words_and_shuffled
    assume(list(shuffled) != list(words))
    m = Matcher(None)
    a = "Hi, how can I get from " + joiner.join(words) + ", please?"
    b = "How do I get from " + joiner.join(shuffled) + "?"
    assert not decide(m.probe_with_vector(a, ONE), m.probe_with_vector(b, ONE), m.config).merge


SCRIPTS = [(0x4E00, 0x4FFF), (0x0900, 0x097F), (0x0600, 0x06FF), (0x0E00, 0x0E7F), (0xAC00, 0xAD00),
           (0x0400, 0x04FF), (0x0370, 0x03FF), (0x05D0, 0x05EA), (0x3040, 0x30FF)]


@FAST
@given(st.sampled_from(SCRIPTS).flatmap(lambda r: st.tuples(
    st.text(st.characters(min_codepoint=r[0], max_codepoint=r[1]) | st.just(" "), min_size=1, max_size=12),
    st.text(st.characters(min_codepoint=r[0], max_codepoint=r[1]) | st.just(" "), min_size=1, max_size=12))))
def test_random_non_latin_text_merges_only_when_normalized_equal(pair):
    m = Matcher(None)
    a, b = m.probe_with_vector(pair[0], ONE), m.probe_with_vector(pair[1], ONE)
    assert decide(a, b, m.config).merge == (normalize(pair[0]) == normalize(pair[1]))


def test_forms_are_memoized_per_probe(matcher):
    p = matcher.prepare("How can I reset my password?")
    assert p.form is p.form and p.form.words == analyse("How do I reset my password").words


CONFUSABLE = [("sulfate", "sulfite"), ("nitrate", "nitrite"), ("interstate", "intrastate"),
              ("stationary", "stationery"), ("chlorine", "chloride"), ("hypertension", "hypotension")]


@pytest.mark.parametrize("x, y", CONFUSABLE)
def test_a_real_word_the_model_does_not_know_is_not_a_typo_of_its_neighbour(x, y):
    # The WordPiece vocabulary knows only one of each pair; a letter swapped for a distant
    # key, or one dropped and another added, spells another word, not a slip.
    m = Matcher(None)
    a, b = f"Is {x} safe to drink in water?", f"Is {y} safe to drink in water?"
    assert not decide(m.probe_with_vector(a, ONE), m.probe_with_vector(b, ONE), m.config).merge


def test_one_slip_is_a_typo():
    m = Matcher(None)
    for a, b in [("How do I chnage my adress?", "How do I change my address?"),
                 ("How do I recieve a refund?", "How do I receive a refund?")]:
        d = decide(m.probe_with_vector(a, ONE), m.probe_with_vector(b, ONE), m.config)
        assert d.merge and "misspelling" in d.reason


@pytest.mark.parametrize("a, b", [
    ("Where should I live?", "Where do I live?"),  # advice, or a fact about me
    ("How can I look younger?", "How do I look younger?"),
    ("How do I look?", "How should I look?"),
    ("Is there a way to cure cancer?", "Can I cure cancer?"),  # in general, or by me
    ("What is silence?", "What is mute?"),  # synonyms only as verbs
])
def test_frames_and_synonyms_hold_only_where_they_are_neutral(a, b):
    m = Matcher(None)
    assert not decide(m.probe_with_vector(a, ONE), m.probe_with_vector(b, ONE), m.config).merge


def test_the_model_declares_its_languages_in_the_config():
    from proxy.config import parse_settings

    upstreams = {"upstreams": {"u": {"base_url": "http://127.0.0.1:9/v1"}}}
    s = parse_settings({**upstreams, "coalesce": {"mode": "semantic", "model_languages": ["en", "de"]}})
    assert MatchConfig.from_settings(s.coalesce).languages == ("en", "de")
    assert MatchConfig.from_settings(parse_settings(upstreams).coalesce).languages == ("en",)


@pytest.mark.parametrize("a, b, merge", [
    ("er how do I apply for a parking permit", "How do I apply for a parking permit?", True),
    ("yeah can i um order food for collection", "Can I order food for collection?", True),
    ("ER wait times tonight?", "Wait times tonight?", False),
    ("Evening classes near me?", "Classes near me?", False),
    ("Right can I turn on red?", "Can I turn on red?", False),
])
def test_spoken_openers_before_a_question(a, b, merge):
    m = Matcher(None)
    assert decide(m.probe_with_vector(a, ONE), m.probe_with_vector(b, ONE), m.config).merge == merge
