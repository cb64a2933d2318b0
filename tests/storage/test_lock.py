"""One writer per store: a live lock is refused, a stale one is taken over, the CLI says so."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from neuron_embeddings.storage import lock


def _hold_in_subprocess(url: str) -> subprocess.Popen:
    code = ("import sys, time; from neuron_embeddings.storage import lock; lock.acquire(sys.argv[1]); print('held', flush=True); "
            "time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _write_lock(url: str, **fields) -> None:
    rec = {"owner": "someone", "run": "", "host": socket.gethostname(), "pid": 1, "started": time.time(),
           "heartbeat": time.time(), **fields}
    from pathlib import Path

    Path(url).mkdir(parents=True, exist_ok=True)
    Path(url, lock.LOCK_NAME).write_text(json.dumps(rec))


def test_live_lock_of_another_process_is_refused(tmp_path):
    url = str(tmp_path / "s.zarr")
    p = _hold_in_subprocess(url)
    try:
        with pytest.raises(lock.StoreLocked, match=f"pid {p.pid}"):
            lock.acquire(url)
    finally:
        p.kill()
        p.wait()
    # the holder died without releasing: its lock is stale now (same host, pid gone) and is taken over
    with lock.writer_lock(url):
        assert lock.read_lock(url)["pid"] != p.pid
    assert lock.read_lock(url) is None


def test_stale_heartbeat_is_taken_over_fresh_one_is_not(tmp_path):
    url = str(tmp_path / "s.zarr")
    _write_lock(url, host="another-host", pid=12345, heartbeat=time.time() - 10)
    with pytest.raises(lock.StoreLocked, match="another-host"):
        lock.acquire(url, stale_after=60)
    _write_lock(url, host="another-host", pid=12345, heartbeat=time.time() - 120)
    with lock.writer_lock(url, stale_after=60):
        assert lock.read_lock(url)["host"] == socket.gethostname()


def test_reentrant_within_a_process(tmp_path):
    url = str(tmp_path / "s.zarr")
    with lock.writer_lock(url):
        with lock.writer_lock(url):
            pass
        assert lock.read_lock(url) is not None  # still held by the outer block
    assert lock.read_lock(url) is None


def test_cli_refuses_a_store_another_run_writes(capsys, tiny_gpt2, tmp_path):
    from neuron_embeddings.cli import main

    url = str(tmp_path / "s.zarr")
    p = _hold_in_subprocess(url)
    try:
        rc = main(["run", "--model", tiny_gpt2, "--dataset", "builtin:python-docs", "--out", url,
                   "--n-sequences", "8", "--ctx-len", "16", "--k", "4", "--device", "cpu"])
    finally:
        p.kill()
        p.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "being written by another run" in err[0], err
