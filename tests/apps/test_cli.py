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
    (["--strata", "0.5,0.75"], ["--strata", "decreasing"]),
    (["--strata", "1.5,0"], ["--strata", "[0, 1]"]),
    (["--strata", "half"], ["--strata"]),
    (["--strata", "--strata-k", "0"], ["--strata-k 0", "at least 1"]),
    (["--ctx-len", "4096"], ["--ctx-len", "at most"]),
    (["--n-sequences", "100000"], ["only", "tokens", "lower --n-sequences"]),
    # how a run executes (ExecSettings), checked before the model loads or the store exists
    (["--batch-size", "0"], ["--batch-size 0", "at least 1"]),
    (["--batch-size", "-4"], ["--batch-size -4", "at least 1"]),
    (["--workers", "0"], ["--workers 0", "at least 1"]),
    (["--task-retries", "-1"], ["--task-retries -1"]),
    (["--device", "tpu"], ["--device 'tpu'", "cpu"]),
    # sizes: a neuron has at most one example per sequence; a layer range is never expanded
    (["--k", "9"], ["--k 9", "--n-sequences is 8"]),
    (["--layers", "0-99999999999"], ["layer 2", "out of range"]),
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
    assert lines[-1] == "40 complete, 1 failed, 1 pending"


def test_damaged_root_metadata_is_one_line_and_left_alone(capsys, tiny_gpt2, tmp_path):
    out = tmp_path / "s.zarr"
    out.mkdir()
    (out / "zarr.json").write_text("garbage{")
    before = tree_digest(str(out))
    _assert_one_line_error(*_run(capsys, "status", str(out)), "zarr.json is damaged")
    _assert_one_line_error(*_run(capsys, "run", "--model", tiny_gpt2, "--dataset", "builtin:python-docs", "--out",
                                 str(out), "--n-sequences", "8", "--ctx-len", "16", "--k", "4", "--device", "cpu"),
                           "zarr.json is damaged")
    assert tree_digest(str(out)) == before


def test_explore_port_out_of_range(capsys, tmp_path):
    _assert_one_line_error(*_run(capsys, "explore", str(tmp_path / "s.zarr"), "--port", "99999"), "--port 99999")


def test_a_refused_run_keeps_the_users_empty_out_directory(capsys, base, tmp_path):
    (tmp_path / "s.zarr").mkdir()
    (tmp_path / "empty.txt").write_text("\n\n")
    rc, err = _run(capsys, *_with(base, "--dataset", str(tmp_path / "empty.txt")))
    _assert_one_line_error(rc, err, "no text")
    assert (tmp_path / "s.zarr").is_dir() and not any((tmp_path / "s.zarr").iterdir())


def _sae_train(model: str, out, *extra: str) -> list[str]:
    return ["sae", "train", "--model", model, "--dataset", "builtin:python-docs", "--layer", "0", "--out", str(out),
            "--n-sequences", "8", "--ctx-len", "16", "--steps", "2", "--device", "cpu", *extra]


@pytest.mark.parametrize("extra,words", [
    (["--architecture", "topk", "--topk", "999999"], ["--topk 999999", "1024 features"]),
    (["--expansion", "inf"], ["--expansion"]),
    (["--device", "tpu"], ["--device 'tpu'"]),
    (["--cache", "FILE"], ["--cache", "not a directory"]),
])
def test_sae_train_refuses_before_caching(capsys, tiny_gpt2, tmp_path, extra, words):
    (tmp_path / "afile").write_text("x")
    extra = [str(tmp_path / "afile") if e == "FILE" else e for e in extra]
    _assert_one_line_error(*_run(capsys, *_sae_train(tiny_gpt2, tmp_path / "sae", *extra)), *words)
    assert not (tmp_path / "sae").exists()  # no activations.zarr, nothing


def test_sae_train_checks_the_activation_dtype_before_loading_the_model(capsys, tmp_path):
    rc, err = _run(capsys, *_sae_train(str(tmp_path / "no-such-model"), tmp_path / "sae", "--activation-dtype", "int8"))
    _assert_one_line_error(rc, err, "--activation-dtype 'int8'")


@pytest.mark.parametrize("damage,words", [
    ("nan", ["W_enc", "NaN"]),
    ("no_features", ["at least one input and one feature"]),
    ("hook_layer", ["hook_layer", "'abc'"]),
])
def test_sae_evaluate_refuses_a_broken_sae(capsys, tiny_gpt2, tmp_path, damage, words):
    import json

    import torch
    from safetensors.torch import save_file

    from tests.apps.test_sae_evaluate import write_saelens_dir

    sae = tmp_path / "sae"
    t = write_saelens_dir(sae, 256, 0 if damage == "no_features" else 8, "blocks.1.mlp.hook_post", 1)
    if damage == "nan":
        t["W_enc"][3, 2] = torch.nan
        save_file(t, str(sae / "sae_weights.safetensors"))
    if damage == "hook_layer":
        cfg = json.loads((sae / "cfg.json").read_text())
        (sae / "cfg.json").write_text(json.dumps({**cfg, "hook_layer": "abc"}))
    rc, err = _run(capsys, "sae", "evaluate", "--sae", str(sae), "--model", tiny_gpt2, "--dataset",
                   "builtin:python-docs", "--out", str(tmp_path / "s.zarr"), "--n-sequences", "8", "--ctx-len", "16",
                   "--k", "4", "--device", "cpu")
    _assert_one_line_error(rc, err, *words)
    assert not (tmp_path / "s.zarr").exists()


def test_a_dask_address_nobody_answers_is_one_line_before_any_store(tmp_path, capsys):
    """--dask-address with no scheduler there: one `error:` line, exit 2, no store (checked before
    the store is created or the model loaded)."""
    import socket

    from neuron_embeddings.cli import main

    with socket.socket() as s:  # a free port: bound, never listened on, then released
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "s.zarr"
    for address, why in ((f"tcp://127.0.0.1:{port}", "no Dask scheduler answers"), ("nonsense", "tcp://HOST:PORT")):
        rc = main(["run", "--model", "builtin:all-MiniLM-L6-v2", "--dataset", "builtin:python-docs", "--out", str(out),
                   "--n-sequences", "4",
                   "--k", "2", "--dask-address", address])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("error:") and why in err[-1], err
        assert not out.exists()
