"""herd outside its repository: what an installed wheel writes and says, and `herd demo`."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from benchmarks import harness, report


def test_results_go_under_the_checkout_here_and_under_the_current_directory_when_installed(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    assert harness.checkout_root() == root
    assert harness.results_dir("out", "x") == root / "benchmarks" / "out" / "x"
    # installed: the packages' folder is site-packages, which is no checkout (before: results
    # and the recorded commit came from site-packages and whatever repository held it)
    monkeypatch.setattr(harness, "_PACKAGES_ROOT", tmp_path / "site-packages")
    monkeypatch.chdir(tmp_path)
    assert harness.checkout_root() is None
    assert harness.results_dir("out", "x") == tmp_path / "herd-bench" / "out" / "x"
    assert report.git_revision(harness.checkout_root()) is None
    assert report.provenance("herd bench", ["--quick"])["git"] is None


def test_no_shipped_module_imports_the_tests():
    root = Path(__file__).resolve().parents[1]
    for package in ("proxy", "embeddings", "benchmarks"):
        for path in (root / package).rglob("*.py"):
            text = path.read_text()
            assert "from tests" not in text and "import tests" not in text, path


def test_eval_without_fow_cache_runs_herds_pairs_and_says_how_to_get_the_rest(tmp_path, monkeypatch, capsys):
    from proxy.semantic import evaluate

    monkeypatch.setattr(evaluate, "has_fow", lambda: False)
    monkeypatch.chdir(tmp_path)  # not a herd checkout: results go to ./herd-bench
    rc = evaluate.main(["--limit", "3", "--sweep", "0.40:0.80:0.20"])
    assert rc == 0
    out = tmp_path / "herd-bench" / "semantic-eval.json"
    err = capsys.readouterr().err
    assert "pip install fow-cache==0.1.0" in err and "herd[eval]" not in err
    assert set(json.loads(out.read_text())["datasets"]) == {"herd"}


def test_bench_without_matplotlib_skips_the_plots_and_says_so(monkeypatch):
    import importlib.util

    from benchmarks import __main__ as bench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    said = []
    monkeypatch.setattr(bench, "say", said.append)
    args = bench.build_parser().parse_args(["compare", "--quick"])
    bench.apply_defaults(args)
    bench.skip_plots_without_matplotlib(args)
    assert args.no_plots and "pip install matplotlib" in said[0]


def test_herd_demo_shows_what_herd_saved():
    from benchmarks.demo import run

    out = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run(out=out)
    text = out.getvalue()
    first, again, different = summary["bursts"]
    # a loaded machine may answer a straggler of the first burst from the cache: still one call
    assert (first["answers"], first["upstream_calls"]) == (20, 1)
    assert (again["answers"], again["upstream_calls"], again["roles"]) == (20, 0, "cache 20")
    assert (different["answers"], different["upstream_calls"]) == (5, 5)
    assert all(b["consistent"] for b in summary["bursts"])
    assert summary["upstream_calls"] == 6 and summary["tokens_saved"] > 0 and summary["dollars_saved"] > 0
    for words in ("upstream calls", "tokens saved", "dollars saved", "coalesce ratio"):
        assert words in text


@pytest.mark.parametrize("argv", [["demo", "--help"]])
def test_demo_is_a_herd_command(argv, capsys):
    from proxy.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0 and "herd demo" in capsys.readouterr().out
