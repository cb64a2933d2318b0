"""`run` from the command line with its own temporary Prefect server: with `--workers 2` (a local
Dask cluster) the workers report to that one server instead of each starting a server of its own,
they run with glibc's own malloc trimming (not Dask's 64 KiB default), the server booted while the
model loaded, and the store is the same; a run refused after the server started leaves none."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import psutil

from neuron_embeddings.core.resources import malloc_environ
from neuron_embeddings.flows.server import TemporaryServer
from neuron_embeddings.storage.store import Store
from neuron_embeddings.tasks.registry import run_status
from tests.helpers import assert_same_arrays, contract_arrays, options, run_stages


def test_two_workers_report_to_the_runs_own_server(tiny_gpt2, tmp_path):
    out = tmp_path / "w2.zarr"
    cmd = [sys.executable, "-m", "neuron_embeddings.cli", "run", "--model", tiny_gpt2, "--dataset",
           "builtin:python-docs", "--out", str(out), "--n-sequences", "24", "--ctx-len", "32", "--k", "6",
           "--shard-size", "64", "--embedding-dtype", "float32", "--device", "cpu", "--workers", "2"]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(HF_HUB_OFFLINE="1", PREFECT_HOME=str(tmp_path / "prefect-home"))
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    root = psutil.Process(p.pid)
    servers, workers, seen = {}, {}, {}  # seen: worker pid -> (parent pid, command line)
    most_at_once = 0  # Dask's nanny may restart a worker that was slow to start: never more than 2 at once
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline:
        try:
            alive = 0
            for c in root.children(recursive=True):
                line = " ".join(c.cmdline())
                if "uvicorn" in line:
                    servers.setdefault(c.pid, c.create_time())
                elif "spawn_main" in line:
                    alive += 1
                    if c.pid not in workers:
                        workers[c.pid] = c.environ()
                        seen[c.pid] = (c.ppid(), line)
            most_at_once = max(most_at_once, alive)
        except psutil.Error:  # a process ended while we looked
            pass
        time.sleep(0.1)
    err = p.stderr.read()
    assert p.wait(timeout=30) == 0, err[-2000:]
    assert "Traceback" not in err, err[-3000:]  # none at shutdown either (the server's output goes to a file)
    st = run_status(str(out))
    assert st.failed == 0 and st.pending == 0
    assert len(servers) == 1, f"{len(servers)} Prefect servers ran"
    prepare = json.loads(Store(str(out)).marker_record("prepare", "all"))
    assert min(servers.values()) < prepare["completed"] - prepare["seconds"]  # launched before the model loaded
    assert most_at_once == 2 and len(workers) >= 2, (most_at_once, seen, err[-2000:])
    if len(workers) > 2:  # a restarted worker: say so in the test summary
        warnings.warn(f"{len(workers)} worker processes over the run (at most 2 at once): {seen}", stacklevel=1)
    assert all(e.get("MALLOC_TRIM_THRESHOLD_") != "65536" for e in workers.values())  # not Dask's default
    assert all({k: e.get(k) for k in malloc_environ()} == malloc_environ() for e in workers.values())
    assert all(e.get("OMP_NUM_THREADS") == "1" for e in workers.values())  # 2 cores over 2 workers
    ref = str(tmp_path / "ref.zarr")
    run_stages(ref, **options(tiny_gpt2))
    assert_same_arrays(contract_arrays(ref), contract_arrays(str(out)))


def _launched_by(pid: int) -> list[psutil.Process]:
    """Running server launchers (flows.server) whose parent was the process `pid`."""
    out = []
    for q in psutil.process_iter(["cmdline", "status"]):
        cmd = q.info["cmdline"] or []
        if len(cmd) > 3 and "die-with-parent" in cmd[2] and cmd[3] == str(pid) and q.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(q)
    return out


def test_a_server_stopped_before_it_answered_is_gone():
    server = TemporaryServer()  # launched at once; not waited for
    proc = psutil.Process(server.process.pid)
    assert _launched_by(os.getpid()) == [proc]
    server.stop()
    assert not proc.is_running() and not _launched_by(os.getpid())


def test_a_run_refused_after_the_server_started_is_one_line_and_leaves_no_server(tiny_gpt2, tmp_path):
    """--k above --n-sequences is found once the run is resolved, after the server was launched:
    one error line, exit 2, and no server left."""
    cmd = [sys.executable, "-m", "neuron_embeddings.cli", "run", "--model", tiny_gpt2, "--dataset",
           "builtin:python-docs", "--out", str(tmp_path / "r.zarr"), "--n-sequences", "4", "--ctx-len", "16",
           "--k", "6", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(HF_HUB_OFFLINE="1", PREFECT_HOME=str(tmp_path / "prefect-home"))
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --k 6"), err[-2000:]
    assert not _launched_by(p.pid)
