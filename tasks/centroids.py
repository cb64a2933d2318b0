"""The `centroids` stage: per neuron shard, each cluster's centroid and top token (core.similar)."""
from __future__ import annotations

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from neuron_embeddings.core.similar import cluster_centroids, cluster_top_tokens, peak_token_ids
from neuron_embeddings.storage import schema
from neuron_embeddings.storage import store as st
from neuron_embeddings.tasks.common import handed_over, run_unit


@task(name="centroids-shard", task_run_name="centroids-{shard[id]}", cache_policy=NO_CACHE)
def centroid_shard(out: str, shard: dict, device: str = "auto", batch_size: int = 16) -> dict:
    """A shard's cluster centroids and top tokens (whole chunks of similar/centroids, similar/top_token;
    no centroids in a run without the similar stage, and they are deleted once it is complete:
    tasks.similar). (`device` and `batch_size`: the stages' common signature; unused here.)"""
    def work(store: st.Store) -> dict:
        if not store.is_complete("cluster", shard["id"]):
            raise RuntimeError(f"centroids shard {shard['id']}: its cluster shard is not complete")
        region = (shard["row"], slice(shard["start"], shard["stop"]))

        def get(name: str, spec: schema.ArraySpec) -> np.ndarray:  # in memory when the shard's embed/cluster just ran here
            kept = handed_over(out, shard["id"], name)
            return kept if kept is not None else st.read(store, spec, region)

        labels = get("labels", schema.LABELS)
        cent = None  # only the similar stage reads the centroids: a run without it keeps the top tokens only
        if store.settings().similar:
            cent = cluster_centroids(get("embeddings", schema.EMBEDDINGS), labels, st.centroid_dtype(store))
        top, cnt = cluster_top_tokens(labels, peak_tokens(store, region, get("seq", schema.TOPK_SEQ),
                                                          get("pos", schema.TOPK_POS)))
        st.write_centroids(store, region, cent, top, cnt)
        return {"neurons": shard["stop"] - shard["start"], "clusters": int((top >= 0).sum())}

    return run_unit(out, "centroids", shard["id"], work)


def peak_tokens(store: st.Store, region: tuple, seq: np.ndarray | None = None, pos: np.ndarray | None = None) -> np.ndarray:
    """int32 [S, K] token id at each example's max token (-1 where no example)."""
    if seq is None or pos is None:
        seq, pos = st.read(store, schema.TOPK_SEQ, region), st.read(store, schema.TOPK_POS, region)
    ok = seq >= 0
    rows = np.unique(seq[ok])
    return peak_token_ids(seq, pos, rows, st.read_token_rows(store, rows) if ok.any() else None)
