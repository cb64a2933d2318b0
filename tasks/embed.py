"""Merge + embed: per neuron shard, the exact top-k of the scan blocks' partial tables, and the
neuron embedding e = x ⊙ W_in[:, j] of every selected example."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from neuron_embeddings.storage import store as st
from neuron_embeddings.tasks.common import hand_over, run_unit
from neuron_embeddings.tasks.scan import merge_blocks, neuron_embeddings


def embed_shard(out: str, shard: dict, fault_unit: str | None = None) -> dict:
    """Read the shard's slice of every block, merge, embed, write topk/* and embeddings."""
    def work(store: st.Store) -> dict:
        s = store.settings()
        row, sl = shard["row"], slice(shard["start"], shard["stop"])
        parts = {n: st.read(store, f"scan/{n}", (slice(None), row, sl)) for n in ("key", "act", "seq", "pos", "x", "win")}
        top = merge_blocks(parts["key"], parts["act"], parts["seq"], parts["pos"], parts["x"], s.k, parts["win"])
        w_in_DS = st.read(store, "weights/W_in", (row, slice(None), sl))
        emb = neuron_embeddings(top.x, w_in_DS, s.embedding_dtype)
        region = (row, sl)
        st.write_many(store, region, {"topk/act": top.act, "topk/seq": top.seq, "topk/pos": top.pos,
                                      "topk/window": top.win, "embeddings": emb})
        hand_over(out, shard["id"], embeddings=emb, act=top.act, seq=top.seq, pos=top.pos)
        return {"neurons": shard["stop"] - shard["start"], "examples": int((top.seq >= 0).sum())}

    return run_unit(out, "embed", shard["id"], work, fault_unit)


embed_shard_task = task(name="embed-shard", task_run_name="embed-{shard[id]}", cache_policy=NO_CACHE)(embed_shard)
