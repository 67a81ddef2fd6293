"""`herd eval` (proxy.semantic.evaluate): subsets, anyone's pairs, --explain, the sweep."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import pytest

from proxy.semantic import evaluate


def run(args: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = evaluate.main(args)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("eval") / "eval.json"
    rc, text = run(["--datasets", "questions,conversations,herd", "--limit", "3", "--sweep", "0.40:0.80:0.20",
                    "--threshold", "0.6", "--json", str(out), "--items"])
    assert rc == 0
    return json.loads(out.read_text()), text


def test_json_structure(small_run: tuple[dict, str]) -> None:
    data, _ = small_run
    assert data["threshold"] == 0.6 and data["languages"] == ["en"]
    assert set(data["datasets"]) == {"questions", "conversations", "herd"}
    for name, ds in data["datasets"].items():
        for key in ("n", "should_merge", "served", "served_rate", "traps", "traps_merged", "trap_rate",
                    "by_kind", "by_lang", "sweep", "items"):
            assert key in ds, (name, key)
        assert [row["threshold"] for row in ds["sweep"]] == [0.4, 0.6, 0.8]
        assert len(ds["items"]) == ds["n"]
        assert all(item["reason"] for item in ds["items"])


def test_questions_subset_is_labelled_per_kind(small_run: tuple[dict, str]) -> None:
    q = small_run[0]["datasets"]["questions"]
    assert {"near_repeat", "paraphrase", "negation", "entity_swap", "number_date", "scope"} <= set(q["by_kind"])
    assert all(g["should_merge"] + g["traps"] <= 3 for g in q["by_kind"].values())
    assert q["should_merge"] + q["traps"] == q["n"]
    assert "targets" in q and "best_threshold_at_1pct_traps" in q


def test_conversations_apply_the_history_rule(small_run: tuple[dict, str]) -> None:
    c = small_run[0]["datasets"]["conversations"]
    assert "history_equal" in c and "final_message_only" in c
    assert all(i["history_equal"] for i in c["items"] if i["merged"])
    assert c["traps_merged"] == 0


def test_herd_pairs_are_tabled_per_language(small_run: tuple[dict, str]) -> None:
    h = small_run[0]["datasets"]["herd"]
    assert {"en", "zh", "hi"} <= set(h["by_lang"])  # --limit 3 per kind keeps these
    text = small_run[1]
    assert "== herd" in text and "language" in text and "traps merged" in text


def test_pairs_file_with_explain(tmp_path: Path) -> None:
    pairs = tmp_path / "mine.jsonl"
    lines = [
        {"a": "How do I gain fat and lose muscle?", "b": "How do I lose fat and gain muscle?", "label": "different",
         "kind": "role_swap", "lang": "en"},
        {"a": "How do I reset my password?", "b": "how can I reset my password", "label": "same", "kind": "frame"},
        {"a": [{"role": "system", "content": "A"}, {"role": "user", "content": "hi"}],
         "b": [{"role": "system", "content": "B"}, {"role": "user", "content": "hi"}], "label": "different"},
    ]
    pairs.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "e.json"
    rc, text = run(["--pairs", str(pairs), "--explain", "--json", str(out), "--sweep", "0.5:0.5:0.1"])
    assert rc == 0
    ds = json.loads(out.read_text())["datasets"][str(pairs)]
    assert set(json.loads(out.read_text())["datasets"]) == {str(pairs)}  # --pairs alone: only that file
    assert ds["served"] == 1 and ds["traps_merged"] == 0 and ds["n"] == 3
    assert "same words in another order" in text and "equal after the tables" in text and "history differs" in text
    assert set(ds["by_kind"]) == {"role_swap", "frame", "pair"}


@pytest.mark.parametrize("line", ['{"a": "x", "b": "y", "label": "maybe"}', '{"a": "x", "label": "same"}', "not json"])
def test_bad_pairs_file_is_a_usage_error(tmp_path: Path, line: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line + "\n")
    with pytest.raises(SystemExit) as exc:
        run(["--pairs", str(bad), "--json", str(tmp_path / "e.json")])
    assert exc.value.code == 2


def test_parse_sweep() -> None:
    assert evaluate.parse_sweep("0.80:0.98:0.01")[:3] == [0.8, 0.81, 0.82]
    assert evaluate.parse_sweep("0.80:0.98:0.01")[-1] == 0.98
    with pytest.raises(argparse.ArgumentTypeError):
        evaluate.parse_sweep("0.9:0.8:0.1")


def test_best_threshold_prefers_the_highest_among_equals() -> None:
    from proxy.semantic import Decision

    rows = [evaluate.Row(str(i), "k", "en", same, Decision(False, "", score, verified=True, eligible=True))
            for i, (same, score) in enumerate([(True, 0.9), (True, 0.5), (False, 0.3)])]
    ds = evaluate.Dataset("x", rows)
    assert evaluate.best_threshold(ds, [0.2, 0.4, 0.5, 0.6], 0.0)["threshold"] == 0.5


def test_split_keeps_alternate_pairs() -> None:
    every = evaluate.load_items("herd")
    even = evaluate.load_items("herd", split="even")
    odd = evaluate.load_items("herd", split="odd")
    assert [i["id"] for i in even] == [i["id"] for i in every[0::2]]
    assert [i["id"] for i in odd] == [i["id"] for i in every[1::2]]
    with pytest.raises(ValueError):
        evaluate.load_items("herd", split="third")


def test_scrambled_pairs_swap_two_words_of_one_question() -> None:
    items = evaluate.load_items("scrambled")
    assert len(items) > 500 and not any(i["should_merge"] for i in items)
    def bag(s: str) -> list[str]:
        return sorted(w.strip("?.,!").lower() for w in s.split())

    assert all(i["a"] != i["b"] and bag(i["a"]) == bag(i["b"]) for i in items)
