"""Sizes that would exhaust the machine are answered before anything is allocated: a one-line
error, exit status 2, nothing created, under an address-space limit (a command that built its
arrays first would die of MemoryError with a traceback, or never answer)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import marker_root

AS_LIMIT = 3 << 30  # bytes of address space for the whole process: torch's import included

# each case: (argv after the subcommand's model/dataset/out, words of the error)
BOMBS = [
    (["run", "--layers", "0-99999999999"], ["--layers", "out of range"]),
    (["run", "--n-sequences", "64", "--k", "100000"], ["--k 100000", "--n-sequences"]),
    (["run", "--n-sequences", "99999999999"], ["--n-sequences 99999999999"]),
    (["run", "--n-sequences", "100000000", "--k", "100000000", "--ctx-len", "2"], ["top-k tables", "--k"]),
    (["run", "--n-sequences", "100000", "--k", "1000", "--ctx-len", "2", "--scan-blocks", "100000"],
     ["the store", "disk"]),
    (["sae", "train", "--layer", "0", "--expansion", "1e7"], ["--expansion"]),
    (["sae", "train", "--layer", "0", "--n-sequences", "99999999999"], ["--n-sequences 99999999999"]),
]

SCRIPT = """
import contextlib, io, json, sys, time
from neuron_embeddings.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except BaseException as e:  # a traceback in the CLI would be a defect: report it
            import traceback
            rc, _ = 99, traceback.print_exc(file=err)
    results.append({"rc": rc, "err": err.getvalue(), "seconds": time.perf_counter() - t0})
from neuron_embeddings.core import models
print(json.dumps({"results": results, "models_loaded": len(models._CACHE)}))
"""


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def _argv(case: list[str], model: str, out: Path) -> list[str]:
    if case[0] == "run":
        return ["run", "--model", model, "--dataset", "builtin:python-docs", "--out", str(out), "--device", "cpu",
                *case[1:]]
    return ["sae", "train", "--model", model, "--dataset", "builtin:python-docs", "--out", str(out),
            "--device", "cpu", *case[2:]]


def test_size_bombs_are_refused_before_anything_is_allocated(tiny_gpt2, tmp_path):
    outs = [tmp_path / f"out{i}" for i in range(len(BOMBS))]
    argvs = [_argv(case, tiny_gpt2, out) for (case, _), out in zip(BOMBS, outs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(argvs)], capture_output=True, text=True,
                       preexec_fn=_limited, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    results = report["results"]
    assert report["models_loaded"] == 0  # every case answered from the model's config alone
    for (case, words), out, res in zip(BOMBS, outs, results):
        lines = [line for line in res["err"].splitlines() if line.strip()]
        assert res["rc"] == 2, (case, res["err"][-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res["err"], (case, lines)
        for w in words:
            assert w in lines[0], (case, w, lines[0])
        assert not out.exists(), case  # no store, no cache, no directory


FULL_DISK_SCRIPT = """
import contextlib, io, json, sys
from neuron_embeddings.cli import main
from neuron_embeddings.storage.store import Store
err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc = main(json.loads(sys.argv[1]))
try:  # a marker bigger than the file size limit: its temporary file must not stay behind
    Store(sys.argv[2]).mark_failed("scan", "B0000", "x" * 100_000)
    marker = "written"
except OSError as e:
    marker = type(e).__name__
print(json.dumps({"rc": rc, "err": err.getvalue(), "marker": marker}))
"""


def _file_size_limited() -> None:
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_a_full_disk_during_prepare_is_one_line_and_leaves_no_temporary_files(tiny_gpt2, tmp_path):
    out = tmp_path / "s.zarr"
    argv = ["run", "--model", tiny_gpt2, "--dataset", "builtin:python-docs", "--out", str(out), "--n-sequences", "512",
            "--ctx-len", "64", "--k", "4", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, json.dumps(argv), str(out)], capture_output=True,
                       text=True, preexec_fn=_file_size_limited, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    lines = [line for line in res["err"].splitlines() if line.strip()]
    assert res["rc"] == 1 and len(lines) == 1 and "Traceback" not in res["err"], res["err"][-2000:]
    assert lines[0].startswith("error: writing the store") and "rerun the same command" in lines[0]
    assert res["marker"] == "OSError"
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert (marker_root(out) / "prepare" / "all.failed").exists()  # the fault is recorded; a rerun resumes
