"""The `embed` stage: per neuron shard, the exact top-k of the scan blocks' partial tables, and the
neuron embedding e = x ⊙ W_in[:, j] of every selected example (core.scan). Once the shard is
marked complete its partial tables are scratch: they are deleted (storage.store.release_scratch),
or, where the scan kept them in memory (tasks.kept), dropped once their layer is embedded."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from neuron_embeddings.core.scan import merge_blocks, merge_distribution, merge_strata, neuron_embeddings
from neuron_embeddings.storage import store as st
from neuron_embeddings.tasks.common import hand_over, maybe_fault, run_unit
from neuron_embeddings.tasks.kept import KeptScan, kept_scan


@task(name="embed-shard", task_run_name="embed-{shard[id]}", cache_policy=NO_CACHE)
def embed_shard(out: str, shard: dict, device: str = "auto", batch_size: int = 16) -> dict:
    """Read the shard's slice of every block, merge, embed, write topk/* and embeddings.
    (`device` and `batch_size`: the stages' common signature; unused here.)"""
    def work(store: st.Store) -> dict:
        s = store.settings()
        region = (shard["row"], slice(shard["start"], shard["stop"]))
        kept = kept_scan(out)
        parts = kept.region(region) if kept is not None else st.read_block_tables(store, region)
        top = merge_blocks(parts["key"], parts["act"], parts["seq"], parts["pos"], parts["x"], s.k, parts["win"])
        weights = st.read_weights(store, region)
        emb = neuron_embeddings(top.x, weights, s.embedding_dtype)
        del parts
        if s.strata:  # written before the top-k: their arrays, all present, are what the marker vouches for
            _embed_strata(out, store, shard, region, weights, kept)
        st.write_topk(store, region, top.act, top.seq, top.pos, top.win, emb)
        hand_over(out, shard["id"], embeddings=emb, act=top.act, seq=top.seq, pos=top.pos)
        return {"neurons": shard["stop"] - shard["start"], "examples": int((top.seq >= 0).sum()),
                "releases": st.scratch_keys(store, region)}  # deleted once this marker is written

    record = run_unit(out, "embed", shard["id"], work)
    kept = kept_scan(out)
    if kept is not None:  # this region's embeddings are durable (or were already)
        kept.embedded_region((shard["row"], slice(shard["start"], shard["stop"])))
    store = st.Store(out)  # also after a skip: a kill may have left some, a rescan may have rewritten them
    st.release_scratch(store, st.scratch_keys(store, (shard["row"], slice(shard["start"], shard["stop"]))),
                       midway=lambda: maybe_fault("release", shard["id"]))
    return {k: v for k, v in record.items() if k != "releases"}


def _embed_strata(out: str, store: st.Store, shard: dict, region: tuple, weights, kept: KeptScan | None) -> None:
    """The strata's examples (merged per stratum), their embeddings, and each unit's distribution."""
    s = store.settings()
    p = kept.region(region, "strata") if kept is not None else st.read_block_strata(store, region)
    strata, stratum = merge_strata(p["key"], p["act"], p["seq"], p["pos"], p["x"], p["win"], len(s.strata), s.strata_k)
    emb = neuron_embeddings(strata.x, weights, s.embedding_dtype)
    st.write_strata(store, region, strata.act, strata.seq, strata.pos, stratum, strata.win, emb)
    d = merge_distribution(p["hist"], p["sum"], p["count"], st.read_maxima(store)[region[0], region[1]])
    st.write_distribution(store, region, d.hist, d.positive_fraction, d.mean, d.max)
    hand_over(out, shard["id"], strata_embeddings=emb, strata_act=strata.act, stratum=stratum)
