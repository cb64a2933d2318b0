"""Which Prefect task runner executes the shards: threads for one worker, Dask for more."""
from __future__ import annotations

from neuron_embeddings.tasks.registry import PRELOAD


def task_runner(workers: int = 1, dask_address: str | None = None):
    """One worker: a thread pool of 1 in this process. N workers: a local Dask cluster of N
    single-threaded worker processes. --dask-address: an existing Dask cluster."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    if workers > 1:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(workers))
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=1)


def check_dask_address(address: str | None, timeout: float = 5.0) -> None:
    """A one-line error unless a Dask scheduler accepts connections at `address` (tcp://HOST:PORT),
    checked before anything is created."""
    if not address:
        return
    import socket
    from urllib.parse import urlsplit

    from neuron_embeddings.core.errors import UserError

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if parts.scheme not in ("tcp", "tls") or not host or not port:
        raise UserError(f"--dask-address {address!r}: write the scheduler's address as tcp://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"--dask-address {address}: no Dask scheduler answers there ({e.strerror or e}); start "
                        "one (dask scheduler) or leave the option out to run on this machine") from None


def local_cluster_kwargs(workers: int) -> dict:
    """`LocalCluster` arguments for `workers` single-threaded worker processes on this machine
    (and the Dask settings they need, set here, before the workers are spawned)."""
    import os

    import dask

    from neuron_embeddings.core.resources import malloc_environ

    threads = str(max(1, (os.cpu_count() or 1) // workers))  # no oversubscription of the cores
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
           "NE_TORCH_THREADS": threads}
    # Dask's workers default to MALLOC_TRIM_THRESHOLD_=65536, which hands every freed buffer
    # back to the OS: a shard's 20-80 MB arrays then page-fault in again each time, and two
    # workers on 2 cores ran ~1.4x slower per shard than two plain processes. They get the
    # settings the CLI's own process makes (core.resources.keep_freed_memory), as glibc reads
    # them at start.
    dask.config.set({**{f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in malloc_environ().items()},
                     # the workers' statistical profiler samples every thread's stack every
                     # 10 ms for the dashboard, which this local cluster does not serve
                     "distributed.worker.profile.enabled": False})
    # each worker imports the shard stages (SciPy's clustering, ...) as it starts, not when
    # its first batch arrives: otherwise the second worker begins the shard phase ~0.2 s late
    preload = [*PRELOAD, __name__]  # and this module's dask_setup
    return {"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
            "env": env, "preload": preload}


def dask_setup(worker) -> None:
    """In each local worker process, as it starts (a Dask preload): ignore SIGINT (a terminal's
    Ctrl-C reaches the whole process group; the run itself then stops its workers), and keep a
    worker still busy with a task when the run stops from printing the traceback of its failed
    heartbeat (the scheduler of a local cluster lives in the run's process: it is gone only when
    the run ends)."""
    import logging
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("distributed.worker").addFilter(
        lambda record: not record.getMessage().startswith("Failed to communicate with scheduler during heartbeat"))
