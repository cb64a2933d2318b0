"""Diagnostics behind the orchestration figures in the README (not a benchmark: no targets).

    .venv/bin/python scripts/diagnostics/diag_orchestration.py [--workdir DIR]

Needs the store that `benchmarks/bench_orchestration.py` leaves in its work directory (and reuses that
benchmark's helpers). Prints:
1. the cost of writing a chunk file over an existing one vs a new one (ext4 truncation);
2. the cost of one SSL context loading the certifi bundle (Prefect builds two per task);
3. a `--workers 2` rerun of the cluster stage (fresh chunk files): the CPU seconds of each process
   during the stage, and each batch task's span on the stage's clock (start offsets, the gaps
   between a worker's tasks, when the workers finish).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # scripts/diagnostics/ -> the repository root
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_orchestration's helpers


def file_writes(work: Path, n: int = 200) -> dict:
    out = {}
    for size in (1_000, 200_000):
        data = os.urandom(size)
        d = work / f"diag-files-{size}"
        d.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        for i in range(n):
            (d / f"f{i}").write_bytes(data)
        new = (time.perf_counter() - t0) / n
        os.sync()  # on disk, as a first run's chunks are by the time a rerun overwrites them
        t0 = time.perf_counter()
        for i in range(n):
            (d / f"f{i}").write_bytes(data)
        over = (time.perf_counter() - t0) / n
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
        out[size] = (new, over)
    return out


def ssl_context_ms(n: int = 20) -> float:
    import ssl

    import certifi

    ssl.create_default_context(cafile=certifi.where())
    t0 = time.perf_counter()
    for _ in range(n):
        ssl.create_default_context(cafile=certifi.where())
    return 1000 * (time.perf_counter() - t0) / n


def cluster_stage_with_cpu(work: Path) -> None:
    import psutil

    from bench_orchestration import CLUSTER_OUTPUTS, clear, markers
    from neuron_embeddings.core.plan import neuron_shards
    from neuron_embeddings.storage import store as st
    from neuron_embeddings.tasks.shards import shard_batches

    store = work / "run.zarr"
    clear(store, "cluster", CLUSTER_OUTPUTS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(work / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    s = st.Store(str(store))
    settings = s.settings()
    args = [str(ROOT / ".venv/bin/neuron-embeddings"), "run", "--model", str(work / "gpt2-small-random"),
            "--dataset", "builtin:python-docs", "--out", str(store), "--n-sequences", str(settings.n_sequences),
            "--ctx-len", str(settings.ctx_len), "--k", str(settings.k), "--device", "cpu", "--no-similar",
            "--workers", "2"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root, samples, names = psutil.Process(proc.pid), {}, {}
    while proc.poll() is None:
        now = time.time()
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                cpu = sum(p.cpu_times()[:2])
                if p.pid not in names:
                    cmd = " ".join(p.cmdline())
                    names[p.pid] = ("command (flow, Dask scheduler)" if p.pid == root.pid else
                                    "Prefect server" if "uvicorn" in cmd else "Dask worker or nanny")
                samples.setdefault(p.pid, []).append((now, cpu))
            except psutil.Error:
                pass
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"the run failed (exit {proc.returncode})")
    ms = markers(store, "cluster")
    start, end = ms[0][0] - ms[0][1]["seconds"], ms[-1][0]

    def at(series, t):
        before = [v for tt, v in series if tt <= t]
        return before[-1] if before else series[0][1]

    print(f"3. cluster stage, --workers 2: {end - start:.2f} s, shard bodies {sum(r['seconds'] for _, r in ms):.2f} s")
    print("   CPU seconds during the stage:")
    totals: dict[str, float] = {}
    for pid, series in samples.items():
        totals[names[pid]] = totals.get(names[pid], 0.0) + at(series, end) - at(series, start)
    for name, cpu in totals.items():
        print(f"     {name:32s} {cpu:6.2f} s")
    by_unit = {r["unit"]: (t - r["seconds"], t, r.get("worker", "?")) for t, r in ms}
    shards = [{"id": sh.id} for sh in neuron_shards(settings, int(s.attrs["d_mlp"]))]
    rows = []
    for batch in shard_batches(shards, 2):
        spans = [by_unit[sh["id"]] for sh in batch]
        rows.append((min(a for a, _, _ in spans) - start, max(b for _, b, _ in spans) - start, spans[0][2], len(batch)))
    print("   batch tasks (seconds from the stage's start):")
    for a, b, worker, n in sorted(rows):
        print(f"     worker {worker:24s} {n:3d} shards  {a:5.2f} -> {b:5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ne-bench-orch"))
    work = Path(ap.parse_args().workdir)
    if not (work / "run.zarr" / "zarr.json").exists():
        raise SystemExit(f"no store in {work}: run benchmarks/bench_orchestration.py first")
    print(f"command: {sys.executable} scripts/diagnostics/diag_orchestration.py --workdir {work}")
    for size, (new, over) in file_writes(work).items():
        print(f"1. writing a {size:,}-byte file: new {1000 * new:.3f} ms, over an existing one {1000 * over:.3f} ms")
    print(f"2. one SSL context with the certifi bundle: {ssl_context_ms():.1f} ms")
    cluster_stage_with_cpu(work)


if __name__ == "__main__":
    main()
