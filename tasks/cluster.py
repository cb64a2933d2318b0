"""The `cluster` stage: cluster one neuron shard's embeddings (core.cluster); write clusters/* and metrics/*."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from threadpoolctl import threadpool_limits

from neuron_embeddings.core.cluster import cluster_shard
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
        st.write_clusters(store, region, res.labels, res.linkage, {m: getattr(res, m) for m in schema.METRICS})
        hand_over(out, shard["id"], labels=res.labels)
        return {"neurons": shard["stop"] - shard["start"], "examples": int(res.n_examples.sum()),
                "mean_clusters": round(float(res.n_clusters.mean()), 3)}

    return run_unit(out, "cluster", shard["id"], work)
