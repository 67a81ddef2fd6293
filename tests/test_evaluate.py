"""`herd eval` (proxy.evaluate): runs on a small subset and writes the expected JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from proxy import evaluate
from proxy.matcher import GUARDS


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("eval") / "eval.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = evaluate.main([
            "--datasets", "questions,conversations,herd", "--limit", "3", "--sweep", "0.70:0.90:0.10",
            "--threshold", "0.8", "--json", str(out), "--items",
        ])
    assert rc == 0
    return json.loads(out.read_text()), buf.getvalue()


def test_json_structure(small_run: tuple[dict, str]) -> None:
    data, _ = small_run
    assert data["threshold"] == 0.8
    assert data["guards"] == sorted(GUARDS)
    assert set(data["datasets"]) == {"questions", "conversations", "herd"}
    for name, ds in data["datasets"].items():
        for key in ("n", "should_merge", "served", "served_rate", "traps", "traps_merged", "trap_rate",
                    "by_group", "sweep", "ablation", "items"):
            assert key in ds, (name, key)
        assert [row["threshold"] for row in ds["sweep"]] == [0.7, 0.8, 0.9]
        assert all({"served_rate", "trap_rate", "no_guards"} <= set(row) for row in ds["sweep"])
        assert set(ds["ablation"]) == set(GUARDS)
        assert len(ds["items"]) == ds["n"]
        for g in ds["by_group"].values():
            assert {"n", "merged", "rate", "should_merge"} <= set(g)


def test_questions_subset_is_labelled_per_category(small_run: tuple[dict, str]) -> None:
    q = small_run[0]["datasets"]["questions"]
    # three per category, ambiguous pairs in their own group, counted as traps
    assert {"near_repeat", "paraphrase", "negation", "entity_swap", "number_date", "scope"} <= set(q["by_group"])
    assert all(g["n"] <= 3 for g in q["by_group"].values())
    assert q["should_merge"] + q["traps"] == q["n"]
    assert "targets" in q and "best_threshold_at_1pct_traps" in q


def test_conversations_apply_the_history_rule(small_run: tuple[dict, str]) -> None:
    c = small_run[0]["datasets"]["conversations"]
    assert "history_equal" in c and "final_message_only" in c
    # a merge needs identical history: none of these pairs has it, so nothing merges
    merged = [i for i in c["items"] if i["merged"]]
    assert all(i["history_equal"] for i in merged)
    assert c["traps_merged"] == 0


def test_prints_tables(small_run: tuple[dict, str]) -> None:
    text = small_run[1]
    assert "== questions" in text and "should merge: served" in text and "traps: merged" in text
    assert "threshold" in text and "guard ablation" in text


def test_no_guard_switches_one_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "e.json"
    assert evaluate.main(["--datasets", "herd", "--limit", "1", "--no-guard", "numbers", "--json", str(out),
                          "--sweep", "0.8:0.8:0.1"]) == 0
    data = json.loads(out.read_text())
    assert "numbers" not in data["guards"] and "dates" in data["guards"]
    with pytest.raises(SystemExit):
        evaluate.main(["--datasets", "herd", "--no-guard", "numbrs", "--json", str(out)])


def test_parse_sweep() -> None:
    assert evaluate.parse_sweep("0.80:0.98:0.01")[:3] == [0.8, 0.81, 0.82]
    assert evaluate.parse_sweep("0.80:0.98:0.01")[-1] == 0.98
    with pytest.raises(argparse.ArgumentTypeError):
        evaluate.parse_sweep("0.9:0.8:0.1")


def test_split_keeps_alternate_pairs() -> None:
    every = evaluate.load_items("herd")
    even = evaluate.load_items("herd", split="even")
    odd = evaluate.load_items("herd", split="odd")
    assert [i["id"] for i in even] == [i["id"] for i in every[0::2]]
    assert [i["id"] for i in odd] == [i["id"] for i in every[1::2]]
    with pytest.raises(ValueError):
        evaluate.load_items("herd", split="third")
