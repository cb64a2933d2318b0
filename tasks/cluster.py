"""The `cluster` stage: cluster one neuron shard's embeddings (core.cluster); write clusters/* and metrics/*."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from threadpoolctl import threadpool_limits

import numpy as np

from neuron_embeddings.core.cluster import cluster_shard, cluster_spectrum
from neuron_embeddings.storage import schema
from neuron_embeddings.storage import store as st
from neuron_embeddings.tasks.common import hand_over, handed_over, run_unit


@task(name="cluster-shard", task_run_name="cluster-{shard[id]}", cache_policy=NO_CACHE)
def cluster_store_shard(out: str, shard: dict, device: str = "auto", batch_size: int = 16) -> dict:
    """Cluster one neuron shard's embeddings; write clusters/* and metrics/* (whole chunks).
    (`device` and `batch_size`: the stages' common signature; unused here.)"""
    def work(store: st.Store) -> dict:
        s = store.settings()
        region = (shard["row"], slice(shard["start"], shard["stop"]))
        if not store.is_complete("embed", shard["id"]):
            raise RuntimeError(f"cluster shard {shard['id']}: its embed shard is not complete")
        emb, act = handed_over(out, shard["id"], "embeddings"), handed_over(out, shard["id"], "act")
        if emb is None or act is None:
            emb, act = st.read(store, schema.EMBEDDINGS, region), st.read(store, schema.TOPK_ACT, region)
        # many tiny matrix products: one BLAS thread each (multi-threaded OpenBLAS on 16x50x768
        # products stalls for seconds when the cores are busy); parallelism comes from workers
        with threadpool_limits(limits=1, user_api="blas"):
            res = cluster_shard(emb, act, s.linkage, s.threshold)
            if s.strata:
                _cluster_spectrum(out, store, shard, region, emb, act)
        st.write_clusters(store, region, res.labels, res.linkage, {m: getattr(res, m) for m in schema.METRICS})
        hand_over(out, shard["id"], labels=res.labels)
        return {"neurons": shard["stop"] - shard["start"], "examples": int(res.n_examples.sum()),
                "mean_clusters": round(float(res.n_clusters.mean()), 3)}

    return run_unit(out, "cluster", shard["id"], work)


def _cluster_spectrum(out: str, store: st.Store, shard: dict, region: tuple, emb: np.ndarray, act: np.ndarray) -> None:
    """The top-k and the strata clustered together; clusters counted by source (0 = top-k, 1 + stratum)."""
    s = store.settings()
    got = [handed_over(out, shard["id"], n) for n in ("strata_embeddings", "strata_act", "stratum")]
    if any(g is None for g in got):
        got = [st.read(store, spec, region) for spec in (schema.STRATA_EMBEDDINGS, schema.STRATA_ACT, schema.STRATUM)]
    s_emb, s_act, stratum = got
    source = np.concatenate([np.zeros(act.shape, dtype=np.int64), 1 + np.maximum(stratum, 0)], axis=1)
    res = cluster_spectrum(np.concatenate([emb, s_emb], axis=1), np.concatenate([act, s_act], axis=1), source,
                           1 + len(s.strata), s.linkage, s.threshold)
    st.write_spectrum(store, region, res.labels, res.counts, res.n_clusters, res.mean_distance, res.below_only)
