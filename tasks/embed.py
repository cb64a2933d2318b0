"""The `embed` stage: per neuron shard, the exact top-k of the scan blocks' partial tables, and the
neuron embedding e = x ⊙ W_in[:, j] of every selected example (core.scan). Once the shard is
marked complete its partial tables are scratch: they are deleted (storage.store.release_scratch)."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from neuron_embeddings.core.scan import merge_blocks, neuron_embeddings
from neuron_embeddings.storage import store as st
from neuron_embeddings.tasks.common import hand_over, maybe_fault, run_unit


@task(name="embed-shard", task_run_name="embed-{shard[id]}", cache_policy=NO_CACHE)
def embed_shard(out: str, shard: dict, device: str = "auto", batch_size: int = 16) -> dict:
    """Read the shard's slice of every block, merge, embed, write topk/* and embeddings.
    (`device` and `batch_size`: the stages' common signature; unused here.)"""
    def work(store: st.Store) -> dict:
        s = store.settings()
        region = (shard["row"], slice(shard["start"], shard["stop"]))
        parts = st.read_block_tables(store, region)
        top = merge_blocks(parts["key"], parts["act"], parts["seq"], parts["pos"], parts["x"], s.k, parts["win"])
        emb = neuron_embeddings(top.x, st.read_weights(store, region), s.embedding_dtype)
        st.write_topk(store, region, top.act, top.seq, top.pos, top.win, emb)
        hand_over(out, shard["id"], embeddings=emb, act=top.act, seq=top.seq, pos=top.pos)
        return {"neurons": shard["stop"] - shard["start"], "examples": int((top.seq >= 0).sum()),
                "releases": st.scratch_keys(store, region)}  # deleted once this marker is written

    record = run_unit(out, "embed", shard["id"], work)
    store = st.Store(out)  # also after a skip: a kill may have left some, a rescan may have rewritten them
    st.release_scratch(store, st.scratch_keys(store, (shard["row"], slice(shard["start"], shard["stop"]))),
                       midway=lambda: maybe_fault("release", shard["id"]))
    return {k: v for k, v in record.items() if k != "releases"}
