"""The `maxima` stage (band selection only): each unit's maximum over one block of sequences."""
from __future__ import annotations

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from neuron_embeddings.core.models import load_model
from neuron_embeddings.core.plan import block_id
from neuron_embeddings.core.scan import scan_sequences
from neuron_embeddings.core.units import unit_source
from neuron_embeddings.storage import store as st
from neuron_embeddings.tasks.common import run_unit
from neuron_embeddings.tasks.progress import progress_writer


@task(name="maxima-block", task_run_name="maxima-B{block[index]}", cache_policy=NO_CACHE)
def maxima_block(out: str, block: dict, device: str = "auto", batch_size: int = 16) -> dict:
    """First pass of band selection: write each unit's maximum over the block to scan/max."""
    def work(store: st.Store) -> dict:
        s = store.settings()
        lm = load_model(s.model, device)
        tokens = st.read_tokens(store, block["start"], block["stop"])
        report = progress_writer(store, "maxima", block_id(block["index"]), len(tokens))
        gmax = scan_sequences(lm.bridge, tokens, block["start"], list(s.layers), s.k, torch.float32,
                              batch_size, lm.device, mode="max", progress=report,
                              units=unit_source(lm, s.model, s.sae))
        st.write_block_maxima(store, block["index"], gmax.numpy())
        return {"sequences": len(tokens)}

    return run_unit(out, "maxima", block_id(block["index"]), work)
