"""The `maxima` stage (band selection only): each unit's maximum over one block of sequences."""
from __future__ import annotations

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from neuron_embeddings.core.plan import block_id
from neuron_embeddings.core.scan import scan_sequences
from neuron_embeddings.storage import store as st
from neuron_embeddings.tasks.blocks import block_inputs
from neuron_embeddings.tasks.common import run_unit


@task(name="maxima-block", task_run_name="maxima-B{block[index]}", cache_policy=NO_CACHE)
def maxima_block(out: str, block: dict, device: str = "auto", batch_size: int = 16) -> dict:
    """First pass of band selection: write each unit's maximum over the block to scan/max."""
    def work(store: st.Store) -> dict:
        b = block_inputs(store, block, "maxima", device)
        gmax = scan_sequences(b.lm.bridge, b.tokens_ST, block["start"], list(b.settings.layers), b.settings.k,
                              torch.float32, batch_size, b.lm.device, mode="max", progress=b.report, units=b.units,
                              excluded_ids=b.settings.excluded_token_ids)
        st.write_block_maxima(store, block["index"], gmax.numpy())
        return {"sequences": len(b.tokens_ST)}

    return run_unit(out, "maxima", block_id(block["index"]), work)
