"""`run --workers 2` from the command line (its own temporary Prefect server, a local Dask cluster):
the workers report to that one server instead of each starting a server of its own, they run
with glibc's own malloc trimming (not Dask's 64 KiB default), and the store is the same."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from neuron_embeddings.core.resources import malloc_environ
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
    servers, workers = set(), {}
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline:
        try:
            for c in root.children(recursive=True):
                line = " ".join(c.cmdline())
                if "uvicorn" in line:
                    servers.add(c.pid)
                elif "spawn_main" in line and c.pid not in workers:
                    workers[c.pid] = c.environ()
        except psutil.Error:  # a process ended while we looked
            pass
        time.sleep(0.1)
    err = p.stderr.read()
    assert p.wait(timeout=30) == 0, err[-2000:]
    assert "Traceback" not in err, err[-3000:]  # none at shutdown either (the server's output goes to a file)
    st = run_status(str(out))
    assert st.failed == 0 and st.pending == 0
    assert len(servers) == 1, f"{len(servers)} Prefect servers ran"
    assert len(workers) == 2
    assert all(e.get("MALLOC_TRIM_THRESHOLD_") != "65536" for e in workers.values())  # not Dask's default
    assert all({k: e.get(k) for k in malloc_environ()} == malloc_environ() for e in workers.values())
    assert all(e.get("OMP_NUM_THREADS") == "1" for e in workers.values())  # 2 cores over 2 workers
    ref = str(tmp_path / "ref.zarr")
    run_stages(ref, **options(tiny_gpt2))
    assert_same_arrays(contract_arrays(ref), contract_arrays(str(out)))
