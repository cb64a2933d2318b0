"""The `logits` stage: per neuron shard, the tokens each unit's output promotes and suppresses most
directly (core.logits), from the output rows and the folded unembedding the prepare stage stored.
In a store without an unembedding (`logit_effects` false: an encoder such as MiniLM, or an SAE on a
hook that is not the residual stream) each shard is marked complete with nothing written."""
from __future__ import annotations

import threading

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from neuron_embeddings.core.logits import Screen, bf16_screen, finite_columns, logit_effects
from neuron_embeddings.core.models import resolve_device
from neuron_embeddings.storage import schema
from neuron_embeddings.storage import store as st
from neuron_embeddings.tasks.common import run_unit

# (store, identity, device) -> W_U, ids, screen
_UNEMBED: dict[tuple, tuple[torch.Tensor, torch.Tensor, Screen | None]] = {}
_LOCK = threading.Lock()


def unembedding_on(store: st.Store, device: str) -> tuple[torch.Tensor, torch.Tensor, Screen | None]:
    """The store's weights/W_U on `device` without its non-finite columns, their token ids
    (`finite_columns`) and on the CPU its bfloat16 screen (`bf16_screen`), read once per process
    (and store) and shared by its shards."""
    key = (store.url, store.identity(), device)
    with _LOCK:
        if key not in _UNEMBED:
            _UNEMBED.clear()  # one at a time: ~150 MB for GPT-2
            w_u, ids = finite_columns(torch.from_numpy(st.read_unembedding(store)).to(device))
            _UNEMBED[key] = w_u, ids, bf16_screen(w_u)
        return _UNEMBED[key]


@task(name="logits-shard", task_run_name="logits-{shard[id]}", cache_policy=NO_CACHE)
def logits_shard(out: str, shard: dict, device: str = "auto", batch_size: int = 16) -> dict:
    """A shard's logit effects (whole chunks of logits/*), on `device` (`batch_size`: unused)."""
    def work(store: st.Store) -> dict:
        if not st.has_logits(store):
            return {"neurons": 0}
        region = (shard["row"], slice(shard["start"], shard["stop"]))
        w_u, ids, screen = unembedding_on(store, resolve_device(device))
        effects = logit_effects(torch.from_numpy(st.read_output_rows(store, region)), w_u, schema.N_LOGITS, ids_V=ids,
                                screen=screen)
        st.write_logits(store, region, effects)
        return {"neurons": shard["stop"] - shard["start"]}

    return run_unit(out, "logits", shard["id"], work)
