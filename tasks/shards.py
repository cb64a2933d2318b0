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

import math
from typing import Callable

from tasks.common import task_logger


class ShardBatchFailed(RuntimeError):
    """Some shards of a batch failed: one argument per failed shard, each naming it."""

    def __str__(self) -> str:
        return "; ".join(str(a) for a in self.args)


def shard_batches(shards: list[dict], workers: int, per_worker: int = 8, max_batch: int = 16) -> list[list[dict]]:
    """Contiguous batches of shards: at least `per_worker` batches per worker (so the workers stay
    balanced and the progress moves), at most `max_batch` shards each."""
    n = len(shards)
    if n == 0:
        return []
    n_batches = min(n, max(per_worker * max(1, workers), math.ceil(n / max_batch)))
    edges = [round(i * n / n_batches) for i in range(n_batches + 1)]
    return [shards[a:b] for a, b in zip(edges[:-1], edges[1:]) if b > a]


def run_shard_batch(out: str, shards: list[dict], stages: list[tuple[str, Callable]],
                    fault_unit: str | None = None) -> dict:
    """Each shard through `stages` (name, fn(out, shard, fault_unit)) in order; a failed stage
    stops that shard's later stages only. Raises ShardBatchFailed naming the failed shards."""
    log = task_logger()
    failed: list[str] = []
    done = 0
    for shard in shards:
        for stage, fn in stages:
            try:
                fn(out, shard, fault_unit)
            except Exception as e:  # noqa: BLE001 - recorded on the shard's marker by run_unit
                msg = str(e) if shard["id"] in str(e) else f"{stage} shard {shard['id']}: {type(e).__name__}: {e}"
                failed.append(msg)
                log.error("%s", msg)
                break
        else:
            done += 1
    if failed:
        raise ShardBatchFailed(*failed)
    return {"shards": done}


def neuron_shard_stages() -> list[tuple[str, Callable]]:
    """The per-shard stages after the scan, in order."""
    from tasks.cluster import cluster_store_shard
    from tasks.embed import embed_shard
    from tasks.similar import centroid_shard

    return [("embed", embed_shard), ("cluster", cluster_store_shard), ("centroids", centroid_shard)]


def shard_batch(out: str, shards: list[dict], fault_unit: str | None = None) -> dict:
    """embed, cluster and centroids of a batch of neuron shards."""
    return run_shard_batch(out, shards, neuron_shard_stages(), fault_unit)


def _make_task():
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(name="neuron-shards", task_run_name="shards-from-{shards[0][id]}",
                cache_policy=NO_CACHE)(shard_batch)


shard_batch_task = _make_task()
