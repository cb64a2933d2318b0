"""The `similar` stage: for every cluster of a shard, the nearest clusters of other neurons, against
every shard's centroids (core.similar), which must all be complete: exact up to `EXACT_MAX` clusters
in the store (or on a GPU), else through an HNSW graph that each process builds once. Once every
similar shard is complete, the centroids are deleted (only this stage reads them)."""
from __future__ import annotations

import threading
import time

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from neuron_embeddings.core.plan import neuron_shards
from neuron_embeddings.core.similar import (MIN_CLUSTER_SIZE, ClusterSet, HnswIndex, cluster_centroids, cluster_sizes,
                                            compact, exact_search, nearest_clusters, scatter_neighbours, search_dtype)
from neuron_embeddings.storage import schema
from neuron_embeddings.storage import store as st
from neuron_embeddings.tasks.common import maybe_fault, run_unit, task_logger

_CACHE: dict[tuple, ClusterSet | HnswIndex | int] = {}
_BUILD = threading.Lock()  # one build of the search structures per process at a time
CACHE_BYTES = 2 * 2**30  # per process, exact search: all of a store's clusters, when they fit; else read shard by shard


def _shard_clusters(store: st.Store, sh, d_mlp: int, device: str) -> ClusterSet:
    """A shard's clusters: its stored centroids, or, where they were released (a rerun of this
    stage after it completed, e.g. a damaged shard), the same centroids recomputed from the
    embeddings and labels as the centroids stage computes them."""
    region = (sh.row, slice(sh.start, sh.stop))
    labels = st.read(store, schema.LABELS, region)
    cent = st.read_centroids(store, region)
    if cent is None:
        cent = cluster_centroids(st.read(store, schema.EMBEDDINGS, region), labels, st.centroid_dtype(store))
    return compact(cent, cluster_sizes(labels), sh.row, sh.start, d_mlp, device=device)


def _all_clusters(store: st.Store, shards, d_mlp: int, device: str, dtype: torch.dtype, n_all: int) -> ClusterSet | None:
    """Every shard's `n_all` clusters as one set ready to search, kept for the process's next
    shards (keyed by the centroid markers: recomputed centroids are read again); None when they
    would not fit in CACHE_BYTES."""
    key = _key(store, shards, "exact", device, dtype)
    with _BUILD:  # a batch's shards run two at a time: one of them reads, the other waits for it
        if key not in _CACHE:
            d_embed = store.array(schema.CENTROIDS).shape[-1]
            size = n_all * (d_embed * (st.centroid_dtype(store).itemsize + dtype.itemsize) + 20)  # + its search copy
            if size > CACHE_BYTES:
                return None
            _keep(key, ClusterSet.concat([_shard_clusters(store, sh, d_mlp, device) for sh in shards]).searchable(dtype))
        return _CACHE[key]


def _key(store: st.Store, shards, *what) -> tuple:
    """Cache key: the store and its centroid markers (recomputed centroids are read again)."""
    return (store.url, tuple(store.marker_record("centroids", sh.id) for sh in shards), *what)


def _keep(key: tuple, value) -> None:
    """Keep one store's search structures at a time (a new store or new centroids replace them)."""
    for k in [k for k in _CACHE if k[:2] != key[:2]]:
        del _CACHE[k]
    _CACHE[key] = value


def _n_clusters(store: st.Store, shards) -> int:
    """Clusters the search covers (of >= MIN_CLUSTER_SIZE examples) in the whole store."""
    key = _key(store, shards, "count")
    with _BUILD:
        if key not in _CACHE:
            labels = st.read(store, schema.LABELS)
            _keep(key, int((cluster_sizes(labels.reshape(-1, labels.shape[-1])) >= MIN_CLUSTER_SIZE).sum()))
        return _CACHE[key]


def _hnsw(store: st.Store, shards, d_mlp: int) -> HnswIndex:
    """Every shard's clusters in one HNSW graph, built once per process (CPU)."""
    key = _key(store, shards, "hnsw")
    with _BUILD:
        if key not in _CACHE:
            t0 = time.perf_counter()
            index = HnswIndex(ClusterSet.concat([_shard_clusters(store, sh, d_mlp, "cpu") for sh in shards]))
            task_logger().info("similar: HNSW graph of %d clusters built in %.1f s (%.2f GB)", len(index.refs),
                               time.perf_counter() - t0, index.nbytes / 1e9)
            _keep(key, index)
        return _CACHE[key]


@task(name="similar-shard", task_run_name="similar-{shard[id]}", cache_policy=NO_CACHE)
def similar_shard(out: str, shard: dict, device: str = "cpu", batch_size: int = 16) -> dict:
    """The nearest clusters of other neurons for every cluster of a shard. (`batch_size`: the
    stages' common signature; unused here.)"""
    def work(store: st.Store) -> dict:
        s, d_mlp = store.settings(), int(store.attrs["d_mlp"])
        shards = neuron_shards(s, d_mlp)
        missing = [sh.id for sh in shards if not store.is_complete("centroids", sh.id)]
        if missing:
            raise RuntimeError(f"similar shard {shard['id']}: centroid shards not complete: {missing[:3]}")
        dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = search_dtype(dev)
        me = next(sh for sh in shards if sh.id == shard["id"])
        lo, hi = (me.row * d_mlp + me.start, me.row * d_mlp + me.stop)
        n_all = _n_clusters(store, shards)
        if not exact_search(n_all, dev):
            index = _hnsw(store, shards, d_mlp)
            a, b = (int(torch.searchsorted(index.refs.owner_N, v)) for v in (lo, hi))
            query = index.refs.rows(slice(a, b))
            with torch.inference_mode():
                ids, cos = index.search(query, st.n_similar(store))
            how = {"search": "hnsw"}
        else:
            every = _all_clusters(store, shards, d_mlp, dev, dtype, n_all)
            if every is not None:
                a, b = (int(torch.searchsorted(every.owner_N, v)) for v in (lo, hi))
                query, refs = every.rows(slice(a, b)), [every]
            else:  # too big to keep: stream the shards (bounded memory, more reading)
                query = _shard_clusters(store, me, d_mlp, dev)
                refs = (_shard_clusters(store, sh, d_mlp, dev) for sh in shards)
            with torch.inference_mode():
                ids, cos = nearest_clusters(query, refs, st.n_similar(store), search_dtype=dtype)
            how = {"search": "exact", "search_dtype": str(dtype).removeprefix("torch.")}
        nb, cs = scatter_neighbours(query, ids, cos, me.stop - me.start, s.k, d_mlp, me.start)
        st.write_similar(store, (me.row, slice(me.start, me.stop)), nb, cs)
        return {"clusters": len(query), "store_clusters": n_all, **how}

    record = run_unit(out, "similar", shard["id"], work)
    release_centroids(out)  # also after a skip: a kill may have left some
    return record


def release_centroids(out: str) -> int:
    """Once every similar shard is complete, nothing reads `similar/centroids` again (the explorer
    reads the top tokens and the neighbours; a similar shard rerun later recomputes them): delete
    its chunks (storage.integrity does not count them as missing). Idempotent; a kill midway leaves
    the rest to the next run. Returns chunks deleted."""
    store = st.Store(out)
    s, d_mlp = store.settings(), int(store.attrs["d_mlp"])
    shards = neuron_shards(s, d_mlp)
    states = store.marker_states("similar")
    if not all(states.get(sh.id) == "complete" for sh in shards):
        return 0
    keys = [k for sh in shards for k in st.centroid_keys(store, (sh.row, slice(sh.start, sh.stop)))]
    return st.release_scratch(store, keys, midway=lambda: maybe_fault("release-centroids", "all"))
