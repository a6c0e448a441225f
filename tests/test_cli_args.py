"""``toap``'s arguments (toap_kit.cli): every numeric option has a range and no option takes an
empty string; a bad one is one argparse line and exit 2, before any work (issue 28, item 8)."""
from __future__ import annotations

import pytest

from toap_kit import cli, index, refine


def _refused(capsys, argv: list[str], *words: str) -> None:
    """``toap ARGV`` exits 2 with one line on stderr that names ``words``."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("toap "), err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("steps", ["-1", "-2", "0", "2001", "1000000000", "ten", "1.5"])
def test_refine_steps_out_of_range_are_refused(tmp_path, capsys, steps):
    """``--refine -1`` used to mean the default 100 steps (the const sentinel, typed), -2 was
    refused only later, and ``--refine 1000000000`` ran (an ETA of 415,115 h)."""
    _refused(capsys, ["protect", str(tmp_path / "me.jpg"), "-o", str(tmp_path / "out"), "--refine", steps],
             "--refine", f"1..{cli.REFINE_MAX_STEPS}", repr(steps))


def test_refine_steps_in_range_are_taken():
    parse = cli._parser().parse_args
    assert parse(["protect", "a.jpg", "-o", "out"]).refine == 0  # no refinement
    assert parse(["protect", "a.jpg", "-o", "out", "--refine", "1"]).refine == 1
    top = parse(["protect", "a.jpg", "-o", "out", "--refine", str(cli.REFINE_MAX_STEPS)]).refine
    assert top == cli.REFINE_MAX_STEPS >= 10 * refine.DEFAULT_STEPS
    bare = parse(["protect", "a.jpg", "-o", "out", "--refine"]).refine  # no number: the refinement's default
    assert bare is None and cli._refine_steps(bare) == refine.DEFAULT_STEPS and cli._refine_steps(0) == 0


@pytest.mark.parametrize("q", ["0", "101", "-5", "high"])
def test_jpeg_quality_out_of_range_is_an_argument_error(tmp_path, capsys, q):
    """It was refused only after the run had started (exit 1, as a runtime problem)."""
    _refused(capsys, ["protect", str(tmp_path / "me.jpg"), "-o", str(tmp_path / "out"), "--jpeg-quality", q],
             "--jpeg-quality", "1..100", repr(q))


def test_jpeg_quality_in_range_is_taken():
    parse = cli._parser().parse_args
    assert [parse(["protect", "a.jpg", "-o", "o", "--jpeg-quality", q]).jpeg_quality for q in ("1", "100")] == [1, 100]


@pytest.mark.parametrize("k", ["0", "-1", str(index.MILVUS_MAX_LIMIT + 1), "1e9", "ten"])
def test_search_k_out_of_range_is_refused(tmp_path, capsys, k):
    _refused(capsys, ["search", str(tmp_path / "me.jpg"), "--index", str(tmp_path / "faces.db"), "--k", k],
             "--k", f"1..{index.MILVUS_MAX_LIMIT}", repr(k))


def test_search_k_in_range_is_taken():
    parse = cli._parser().parse_args
    assert parse(["search", "a.jpg", "--index", "x.db"]).k == 10
    assert parse(["search", "a.jpg", "--index", "x.db", "--k", str(index.MILVUS_MAX_LIMIT)]).k == index.MILVUS_MAX_LIMIT


def _argvs(tmp_path) -> dict[str, list[str]]:
    photo, out, db = str(tmp_path / "me.jpg"), str(tmp_path / "out"), str(tmp_path / "faces.db")
    return {"protect": ["protect", photo, "-o", out], "verify": ["verify", photo, photo],
            "crawl": ["crawl", str(tmp_path), "--index", db], "search": ["search", photo, "--index", db]}


@pytest.mark.parametrize("command,option", [
    ("protect", "--perturbation"), ("verify", "--perturbation"), ("verify", "--simulate"), ("verify", "--engines"),
    ("crawl", "--engine"), ("crawl", "--index"), ("search", "--engine"), ("search", "--index")])
@pytest.mark.parametrize("empty", ["", "  "])
def test_empty_option_values_are_refused(tmp_path, capsys, command, option, empty):
    """``--engine ''`` and ``--simulate ''`` were taken as not given (the default engine, no
    platform profile) without a word."""
    argv = _argvs(tmp_path)[command]
    if option in argv:  # --index: replace the one given
        argv = argv[:argv.index(option)] + argv[argv.index(option) + 2:]
    _refused(capsys, argv + [option, empty], option, "empty")


@pytest.mark.parametrize("argv", [["protect", "", "-o", "OUT"], ["protect", "a.jpg", "-o", ""],
                                  ["protect", "-d", "", "-o", "OUT"], ["verify", "", "a.jpg"], ["verify", "a.jpg", ""],
                                  ["crawl", "", "--index", "OUT.db"], ["search", "", "--index", "OUT.db"]])
def test_empty_paths_are_refused(tmp_path, capsys, monkeypatch, argv):
    """An empty path is ``Path('')``, the current folder: ``toap protect '' -o out`` would have
    protected every photo under it, ``toap crawl ''`` indexed it."""
    monkeypatch.chdir(tmp_path)
    _refused(capsys, [a.replace("OUT", str(tmp_path / "out")) for a in argv], "empty")


@pytest.mark.parametrize("nets,words", [("faceres", ["--refine"]), ("dlib,arcface", ["dlib, mobileface, faceres", "'dlib,arcface'"]),
                                        ("dlib,dlib", ["distinct"])])
def test_against_needs_refine_and_known_networks(tmp_path, capsys, nets, words):
    """Issue 29: ``--against`` picks the refinement's networks; alone, or with a name outside
    ``recognizers.NAMES``, it is one argparse line."""
    refine_arg = [] if nets == "faceres" else ["--refine", "3"]
    _refused(capsys, ["protect", str(tmp_path / "me.jpg"), "-o", str(tmp_path / "out"), "--against", nets, *refine_arg],
             "--against", *words)
