"""A run killed with SIGKILL part-way, then rerun with the same command: the same store as an
uninterrupted run (real CLI processes, each with its own temporary Prefect server). SIGTERM ends a
run like Ctrl-C; whatever ends it, none of its processes (the Prefect server, Dask workers) outlive it."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from neuron_embeddings.core.plan import block_id
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


def _still_running(procs: list[psutil.Process], grace: float = 10.0) -> list[psutil.Process]:
    """Those of `procs` still running (not zombies) after up to `grace` seconds."""
    deadline = time.time() + grace
    while True:
        alive = []
        for q in procs:
            try:
                if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                    alive.append(q)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


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
    children = psutil.Process(p.pid).children(recursive=True)
    assert any("uvicorn" in " ".join(c.cmdline()) for c in children)  # its temporary Prefect server
    os.kill(p.pid, signal.SIGKILL)  # the command only: its children must go with it
    p.wait()
    orphans = _still_running(children)
    for q in orphans:
        q.kill()
    assert not orphans, [" ".join(q.cmdline())[:200] for q in orphans]
    st = run_status(str(out))
    assert st.pending > 0  # it really was cut short
    if point == "embed":  # the scan kept its tables in memory (tasks.kept): they died with the run
        scan = json.loads((marker_root(out) / "scan" / f"{block_id(0)}.done").read_text())
        assert scan.get("tables") == "memory"
    done = subprocess.run(_cli(tiny_gpt2, str(out)), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    if point == "embed":
        assert "rescanning" in done.stdout + done.stderr
    st = run_status(str(out))
    assert st.failed == 0 and st.pending == 0
    ref = tmp_path / "ref.zarr"
    run_stages(str(ref), **options(tiny_gpt2, n_sequences=N_SEQ, ctx_len=CTX, k=K, shard_size=SHARD))
    assert_same_arrays(contract_arrays(str(ref)), contract_arrays(str(out)))


def test_sigterm_is_one_line_releases_the_lock_and_leaves_no_process(tiny_gpt2, tmp_path):
    """SIGTERM while the shards run on two Dask workers: exit 143, the lock released, one line that
    gives the command to resume, no traceback, and no process of the run left after it."""
    out, err_path = tmp_path / "s.zarr", tmp_path / "stderr.txt"
    cmd = _cli(tiny_gpt2, str(out)) + ["--workers", "2", "--scan-blocks", "1"]
    with open(err_path, "w") as err_file:
        p = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                             stderr=err_file, start_new_session=True)
    try:
        root, deadline, children = psutil.Process(p.pid), time.time() + 180, []
        while p.poll() is None and time.time() < deadline:
            try:
                children = root.children(recursive=True)
                if _reached(out, "scan") and sum("spawn_main" in " ".join(c.cmdline()) for c in children) >= 2:
                    break
            except psutil.Error:
                pass
            time.sleep(0.1)
        assert p.poll() is None, "the run finished before it could be stopped"
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=120)
        orphans = _still_running(children)
    finally:
        os.killpg(p.pid, signal.SIGKILL) if p.poll() is None else None
    for q in orphans:
        q.kill()
    err = err_path.read_text()
    assert rc == 143, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    resume = shlex.join(["neuron-embeddings", *cmd[3:]])
    assert err.strip().splitlines()[-1] == f"interrupted by SIGTERM; to resume, rerun: {resume}", err[-1000:]
    assert not (out / "_lock.json").exists()
    assert not orphans, [" ".join(q.cmdline())[:200] for q in orphans]
    assert run_status(str(out)).pending > 0
