"""One writer per store: a live lock is refused, a stale one is taken over, the CLI says so."""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuron_embeddings.storage import lock


def _hold_in_subprocess(url: str) -> subprocess.Popen:
    code = ("import sys, time; from neuron_embeddings.storage import lock; lock.acquire(sys.argv[1]); print('held', flush=True); "
            "time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _write_lock(url: str, raw: bytes | None = None, age: float = 0.0, **fields) -> None:
    """A lock file nobody holds: a record (or `raw` bytes) last touched `age` seconds ago."""
    rec = {"owner": "someone", "run": "", "host": socket.gethostname(), "pid": 1, "started": time.time(), **fields}
    Path(url).mkdir(parents=True, exist_ok=True)
    path = Path(url, lock.LOCK_NAME)
    path.write_bytes(json.dumps(rec).encode() if raw is None else raw)
    os.utime(path, (time.time() - age, time.time() - age))


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
    _write_lock(url, host="another-host", pid=12345, age=10)
    with pytest.raises(lock.StoreLocked, match="another-host"):
        lock.acquire(url, stale_after=60)
    _write_lock(url, host="another-host", pid=12345, age=120)
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


MALFORMED = {"list": b"[1,2,3]", "null": b"null", "pid-string": None, "heartbeat-string": None,
             "garbage": b"\xff\x00\x9c garbage", "empty": b"", "truncated": b'{"owner": "a", "ho'}


def _malformed(kind: str) -> bytes:
    rec = {"owner": "someone", "run": "", "host": socket.gethostname(), "pid": 1, "started": time.time()}
    if kind == "pid-string":
        return json.dumps({**rec, "pid": "abc"}).encode()
    if kind == "heartbeat-string":
        return json.dumps({**rec, "heartbeat": "soon"}).encode()
    return MALFORMED[kind]


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_lock_is_one_line_then_taken_over_when_stale(tmp_path, kind):
    url = str(tmp_path / "s.zarr")
    _write_lock(url, raw=_malformed(kind), age=5)
    with pytest.raises(lock.StoreLocked) as e:  # recent: it might be a run on a host whose locks we can't see
        lock.acquire(url, stale_after=60)
    msg = str(e.value)
    assert "\n" not in msg and lock.LOCK_NAME in msg and "not a lock this program wrote" in msg, msg
    assert lock.read_lock(url) == {"unreadable": lock.parse_lock(_malformed(kind))[1]}
    _write_lock(url, raw=_malformed(kind), age=61)  # stale by its mtime: taken over
    with lock.writer_lock(url, stale_after=60):
        assert lock.read_lock(url)["pid"] == os.getpid()
    assert lock.read_lock(url) is None


def test_a_malformed_lock_is_one_cli_error_line(capsys, tiny_gpt2, tmp_path):
    from neuron_embeddings.cli import main

    url = str(tmp_path / "s.zarr")
    _write_lock(url, raw=b"null")
    rc = main(["run", "--model", tiny_gpt2, "--dataset", "builtin:python-docs", "--out", url, "--n-sequences", "8",
               "--ctx-len", "16", "--k", "4", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and lock.LOCK_NAME in err[0], err


def _racer(url: str, trials: int, barrier, holders) -> None:
    """Per trial: wait for the stale lock, try to take it, hold it until every racer has tried."""
    for _ in range(trials):
        barrier.wait()
        try:
            lock.acquire(url, stale_after=60)
            got = True
        except lock.StoreLocked:
            got = False
        with holders.get_lock():
            holders.value += got
        barrier.wait()  # every racer has tried; the holders still hold
        barrier.wait()  # the main process has counted them
        if got:
            lock.release(url)
        barrier.wait()  # all released


def test_racing_takeovers_of_a_stale_lock_never_give_two_holders(tmp_path):
    """Three processes released at once on a stale (or absent) lock, 300 times: exactly one holds it."""
    url, n, trials = str(tmp_path / "s.zarr"), 3, 300
    ctx = multiprocessing.get_context("spawn")
    barrier, holders = ctx.Barrier(n + 1, timeout=60), ctx.Value("i", 0)
    procs = [ctx.Process(target=_racer, args=(url, trials, barrier, holders), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [dict(pid=int(dead.stdout)), dict(host="another-host", age=61), dict(raw=b"null", age=61), None]
    counts = []
    try:
        for t in range(trials):
            Path(url, lock.LOCK_NAME).unlink(missing_ok=True)
            if stale[t % len(stale)] is not None:
                _write_lock(url, **stale[t % len(stale)])
            holders.value = 0
            barrier.wait()
            barrier.wait()
            counts.append(holders.value)
            barrier.wait()
            barrier.wait()
    finally:
        for p in procs:
            p.join(timeout=30)
            p.kill()
    assert counts == [1] * trials, {c: counts.count(c) for c in set(counts)}
    assert not Path(url).exists() or os.listdir(url) == []  # no candidate file left behind


def test_object_storage_lock_takes_over_stale_and_malformed(tmp_path):
    """fsspec URLs (here memory://): a live lock is refused, a stale or malformed one taken over."""
    import fsspec

    url = f"memory://{tmp_path.name}/s.zarr"
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"/{tmp_path.name}/s.zarr/{lock.LOCK_NAME}", json.dumps(
        {"owner": "x", "host": "another-host", "pid": 5, "started": time.time(), "heartbeat": time.time()}).encode())
    with pytest.raises(lock.StoreLocked, match="another-host"):
        lock.acquire(url)
    fs.pipe_file(f"/{tmp_path.name}/s.zarr/{lock.LOCK_NAME}", json.dumps(
        {"owner": "x", "host": "another-host", "pid": 5, "started": 0, "heartbeat": time.time() - 300}).encode())
    with lock.writer_lock(url):
        assert lock.read_lock(url)["pid"] == os.getpid()
    fs.pipe_file(f"/{tmp_path.name}/s.zarr/{lock.LOCK_NAME}", b"[1,2,3]")
    with pytest.raises(lock.StoreLocked, match="not a lock this program wrote"):
        lock.acquire(url)  # written just now
    with lock.writer_lock(url, stale_after=-1):
        assert lock.read_lock(url)["pid"] == os.getpid()
    assert lock.read_lock(url) is None
