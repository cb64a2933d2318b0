"""A run killed with SIGKILL part-way, then rerun with the same command: the same store as an
uninterrupted run (real CLI processes, each with its own temporary Prefect server)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuron_embeddings.tasks.registry import run_status
from tests.helpers import assert_same_arrays, contract_arrays, marker_root, options, run_stages, state_dir

N_SEQ, CTX, K, SHARD = 160, 32, 6, 64


def _cli(tiny_gpt2: str, out: str) -> list[str]:
    return [sys.executable, "-m", "neuron_embeddings.cli", "run", "--model", tiny_gpt2, "--dataset",
            "builtin:python-docs", "--out", out, "--n-sequences", str(N_SEQ), "--ctx-len", str(CTX), "--k", str(K),
            "--shard-size", str(SHARD), "--embedding-dtype", "float32", "--device", "cpu", "--batch-size", "1"]


def _reached(out: Path, point: str) -> bool:
    if point == "scan":
        return any((state_dir(out) / "progress" / "scan").glob("*.json"))
    return len(list((marker_root(out) / "embed").glob("*.done"))) >= 1


@pytest.mark.parametrize("point", ["scan", "embed"])
def test_sigkill_then_rerun_gives_the_uninterrupted_store(tiny_gpt2, tmp_path, point):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "killed.zarr"
    # its own process group, so that the kill also takes its temporary Prefect server
    p = subprocess.Popen(_cli(tiny_gpt2, str(out)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 120
    while not _reached(out, point) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "the run finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    st = run_status(str(out))
    assert st.pending > 0  # it really was cut short
    done = subprocess.run(_cli(tiny_gpt2, str(out)), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    st = run_status(str(out))
    assert st.failed == 0 and st.pending == 0
    ref = tmp_path / "ref.zarr"
    run_stages(str(ref), **options(tiny_gpt2, n_sequences=N_SEQ, ctx_len=CTX, k=K, shard_size=SHARD))
    assert_same_arrays(contract_arrays(str(ref)), contract_arrays(str(out)))
