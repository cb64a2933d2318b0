"""Neuron-shard batches: one Prefect task runs several shards through several stages.

A task per shard and stage costs Prefect work (task-run records, state changes, on a Dask worker a
round trip to the API) of the order of the shard's own compute (~50-80 ms for 256 GPT-2 neurons),
which on a 2-core machine ate the gain of a second worker. So the flow hands each task a contiguous
batch of shards and the task runs each shard through the stages in order (embed -> cluster ->
centroids), each stage of each shard with its own marker, exactly as separate tasks would: a
shard's failure is recorded on its marker and named in the task's error; the task goes on with the
next shard; a rerun or retry skips every stage whose marker says complete.
"""
from __future__ import annotations

import contextvars
import math
import os
from concurrent.futures import ThreadPoolExecutor

from prefect import task
from prefect.cache_policies import NO_CACHE
from threadpoolctl import threadpool_limits

from neuron_embeddings.core.scan import torch_threads
from neuron_embeddings.tasks.common import task_logger
from neuron_embeddings.tasks.registry import BY_NAME


class ShardBatchFailed(RuntimeError):
    """Some shards of a batch failed: one argument per failed shard, each naming it."""

    def __str__(self) -> str:
        return "; ".join(str(a) for a in self.args)


def shard_batches(shards: list[dict], workers: int, share: float = 1.5, min_batch: int = 4) -> list[list[dict]]:
    """Contiguous batches of shards, largest first, in rounds of one batch per worker: each
    round's batches take 1/(`share` x workers) of the shards still left each, at least
    `min_batch`, and the last round shares out what is left ("guided" scheduling).

    Every batch task costs its worker 60-70 ms of Prefect start-up (a settings object and two API
    clients per task), so few batches; the smaller late ones go to whichever worker is free first,
    so the workers finish together. Equal batches within a round keep the workers balanced even
    where the scheduler hands out the first tasks before any worker asks (Dask does, for the first
    few). Progress does not depend on the batches: it is read from the shards' markers."""
    out: list[list[dict]] = []
    i, n, workers = 0, len(shards), max(1, workers)
    while i < n:
        left = n - i
        size = max(min_batch, math.ceil(left / (share * workers)))
        if left - size * workers < min_batch * workers:  # the last round: what is left, shared evenly
            k = min(workers, max(1, left // min_batch))
            sizes = [left // k + (1 if j < left % k else 0) for j in range(k)]
        else:
            sizes = [size] * workers
        for size in sizes:
            out.append(shards[i:i + size])
            i += size
    return out


def shard_threads() -> int:
    """Shards a worker runs at a time: 2 where it has 2 cores or more (NE_TORCH_THREADS, set for
    the workers of a local cluster, else the machine's cores). A shard's NumPy, SciPy, torch and
    Zarr work releases the GIL for about half its time, so a second shard in flight fills the
    second core; more than two gain little."""
    if os.environ.get("NE_SHARD_THREADS"):  # an explicit choice (benchmarks compare 1 and 2)
        return max(1, int(os.environ["NE_SHARD_THREADS"]))
    cores = int(os.environ.get("NE_TORCH_THREADS") or os.cpu_count() or 1)
    return max(1, min(2, cores))


def run_shard_batch(out: str, shards: list[dict], stages: list[str], device: str = "auto", batch_size: int = 16,
                    threads: int | None = None) -> dict:
    """Each shard through `stages` (registry names) in order, `threads` shards at a time (default
    `shard_threads()`); a failed stage stops that shard's later stages only.
    Raises ShardBatchFailed naming the failed shards."""
    log = task_logger()
    fns = [(name, BY_NAME[name].task.fn) for name in stages]

    def one(shard: dict) -> str | None:
        for stage, fn in fns:
            try:
                fn(out, shard, device, batch_size)
            except Exception as e:  # noqa: BLE001 - recorded on the shard's marker by run_unit
                msg = str(e) if shard["id"] in str(e) else f"{stage} shard {shard['id']}: {type(e).__name__}: {e}"
                log.error("%s", msg)
                return msg
        return None

    threads = shard_threads() if threads is None else threads
    if threads <= 1 or len(shards) < 2:
        results = [one(shard) for shard in shards]
    else:
        # one BLAS / torch thread per shard, set once for all of them (both settings are global)
        with threadpool_limits(limits=1, user_api="blas"), torch_threads(1), ThreadPoolExecutor(threads) as pool:
            # each shard in its own copy of this context: Prefect's run logger works in the threads
            futures = [pool.submit(contextvars.copy_context().run, one, shard) for shard in shards]
            results = [f.result() for f in futures]
    failed = [m for m in results if m is not None]
    if failed:
        raise ShardBatchFailed(*failed)
    return {"shards": len(shards) - len(failed)}


@task(name="neuron-shards", task_run_name="shards-from-{shards[0][id]}", cache_policy=NO_CACHE)
def shard_batch(out: str, shards: list[dict], stages: list[str], device: str = "auto", batch_size: int = 16) -> dict:
    """A batch of neuron shards, each through `stages` (e.g. embed, cluster, centroids)."""
    return run_shard_batch(out, shards, stages, device, batch_size)
