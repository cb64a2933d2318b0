"""The command line: bad input is a one-line error, exit status 2, and damages nothing."""
from __future__ import annotations

import pytest

from neuron_embeddings.cli import main
from tests.helpers import options, run_stages, tree_digest


def _run(capsys, *args) -> tuple[int, str]:
    rc = main(list(args))
    err = capsys.readouterr().err
    return rc, err


def _assert_one_line_error(rc: int, err: str, *words: str) -> None:
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture()
def base(tiny_gpt2, tmp_path):
    return ["run", "--model", tiny_gpt2, "--dataset", "builtin:python-docs", "--out", str(tmp_path / "s.zarr"),
            "--n-sequences", "8", "--ctx-len", "16", "--k", "4", "--device", "cpu"]


@pytest.mark.parametrize("extra,words", [
    (["--layers", "5"], ["layer 5", "out of range", "2 layers"]),
    (["--layers", "x"], ["--layers"]),
    (["--k", "1"], ["--k 1", "at least 2"]),
    (["--threshold", "3"], ["--threshold", "(0, 2]"]),
    (["--threshold", "0"], ["--threshold"]),
    (["--linkage", "ward"], ["--linkage", "average"]),
    (["--selection", "band:1.5"], ["--selection"]),
    (["--ctx-len", "4096"], ["--ctx-len", "at most"]),
    (["--n-sequences", "100000"], ["only", "tokens", "lower --n-sequences"]),
])
def test_bad_options(capsys, base, tmp_path, extra, words):
    rc, err = _run(capsys, *base, *extra)
    _assert_one_line_error(rc, err, *words)
    assert not (tmp_path / "s.zarr").exists()  # nothing created


def test_unknown_model(capsys, tmp_path):
    rc, err = _run(capsys, "run", "--model", str(tmp_path / "no-such-model"), "--dataset", "builtin:python-docs",
                   "--out", str(tmp_path / "s.zarr"))
    _assert_one_line_error(rc, err, "--model", "cannot load")


def _with(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


@pytest.mark.parametrize("flag,make,words", [
    ("--dataset", lambda p: p / "missing.txt", ["not found"]),
    ("--dataset", lambda p: (p / "empty.txt").write_text("\n\n") and p / "empty.txt", ["no text"]),
    ("--out", lambda p: (p / "afile").write_text("x") and p / "afile" / "s.zarr", ["--out", "not a directory"]),
])
def test_bad_paths(capsys, base, tmp_path, flag, make, words):
    rc, err = _run(capsys, *_with(base, flag, str(make(tmp_path))))
    _assert_one_line_error(rc, err, *words)


def test_store_made_with_other_settings_is_refused_and_untouched(capsys, tiny_gpt2, tmp_path):
    out = str(tmp_path / "s.zarr")
    run_stages(out, **options(tiny_gpt2, n_sequences=8, ctx_len=16, k=4))
    before = tree_digest(out)
    rc, err = _run(capsys, "run", "--model", tiny_gpt2, "--dataset", "builtin:python-docs", "--out", out,
                   "--n-sequences", "8", "--ctx-len", "16", "--k", "5", "--device", "cpu",
                   "--embedding-dtype", "float32")
    _assert_one_line_error(rc, err, "other settings", "k: 4")
    assert tree_digest(out) == before


def test_status_of_missing_store(capsys, tmp_path):
    rc, err = _run(capsys, "status", str(tmp_path / "nothing.zarr"))
    _assert_one_line_error(rc, err, "no store")


def test_status_lists_states(capsys, tiny_gpt2, tmp_path):
    out = str(tmp_path / "s.zarr")
    run_stages(out, **options(tiny_gpt2, n_sequences=8, ctx_len=16, k=4))
    from neuron_embeddings.storage.store import Store

    Store(out).clear_marker("cluster", "L01-N00000")
    Store(out).clear_marker("cluster", "L01-N00064")
    Store(out).mark_failed("cluster", "L01-N00064", "RuntimeError: boom")
    assert main(["status", out]) == 0
    text = capsys.readouterr().out
    lines = text.strip().splitlines()
    assert "failed  cluster/L01-N00064: RuntimeError: boom" in text
    assert "pending cluster/L01-N00000" in text
    assert lines[-1] == "32 complete, 1 failed, 1 pending"
