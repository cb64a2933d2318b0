"""The `prepare` stage: tokenize the dataset, write the store's template, tokens, vocab and the
units' input weights. Runs once per store (marker `prepare/all`); everything later reads the store."""
from __future__ import annotations

import logging

from prefect import task
from prefect.cache_policies import NO_CACHE

from neuron_embeddings.core.datasets import iter_documents, pack_tokens, vocab_strings
from neuron_embeddings.core.logits import to_vocab, unembedding
from neuron_embeddings.core.models import LoadedModel
from neuron_embeddings.core.plan import neuron_shards, scan_blocks
from neuron_embeddings.core.settings import RunSettings
from neuron_embeddings.core.units import unit_source
from neuron_embeddings.storage import store as st
from neuron_embeddings.tasks.common import run_unit, task_logger
from neuron_embeddings.tasks.resolve import resolve_run


def plan_record(settings: RunSettings, n_units: int) -> dict:
    """The work units of every stage, as small plain data for the flow."""
    return {
        "blocks": [b.__dict__ for b in scan_blocks(settings)],
        "shards": [{**s.__dict__, "id": s.id} for s in neuron_shards(settings, n_units)],
    }


def prepare_store(out: str, settings: RunSettings, lm: LoadedModel) -> dict:
    """Tokenize, create the store and fill the prepare-stage arrays; idempotent through its marker.
    On an existing store, first clear the markers of damaged units and their dependents (the
    registry's `repair_store`), so the run recomputes them."""
    from neuron_embeddings.tasks.registry import plan_units, repair_store  # the registry imports this module

    units = unit_source(lm, settings.model, settings.sae)
    log = task_logger()  # outside a run (the CLI's own prepare) the findings go to the package's logger, shown
    repair_store(out, log if isinstance(log, logging.LoggerAdapter) else None)
    if st.Store(out).is_complete("prepare", "all"):
        st.Store(out).write_plan(plan_units(settings, units.n_units))
        return plan_record(settings, units.n_units)
    # a UserError from the dataset is raised here, before anything is written
    tokens = pack_tokens(iter_documents(settings.dataset), lm.tokenizer, settings.n_sequences,
                         settings.ctx_len, dataset_name=settings.dataset,
                         bos_id=lm.tokenizer.bos_token_id if settings.prepend_bos else None)
    vocab = vocab_strings(lm.tokenizer)

    def work(store: st.Store) -> dict:
        if int(tokens.max()) >= lm.bridge.cfg.d_vocab:
            raise AssertionError("tokenizer produced ids outside the model's vocabulary")
        weights = units.weights(list(settings.layers))
        logits = logit_weights(lm, units, list(settings.layers), len(vocab))  # the logits stage's input
        st.create_store(out, settings, {**units.info(), "logit_effects": bool(logits),
                                        **({"d_resid": lm.d_model} if logits else {})}, len(vocab))
        weights.update(logits)
        st.write_prepared(store, tokens, vocab, {name: w.numpy() for name, w in weights.items()})
        return {"tokens": int(tokens.size)}

    run_unit(out, "prepare", "all", work)
    st.Store(out).write_plan(plan_units(settings, units.n_units))
    return plan_record(settings, units.n_units)


def logit_weights(lm: LoadedModel, units, layers: list[int], n_vocab: int) -> dict:
    """{"W_out": [rows, units, d_model], "W_U": [d_model, n_vocab]} for the logits stage (core.logits), or
    {} when the model has no unembedding or the units write no residual-stream vector."""
    w_u, rows = unembedding(lm), units.output_rows(layers)
    if w_u is None or rows is None:
        return {}
    return {"W_out": rows, "W_U": to_vocab(w_u, n_vocab)}


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_task(out: str, options: dict) -> dict:
    """Resolve and validate the options, then prepare the store. Returns the plan."""
    settings, lm = resolve_run(out, **options)
    task_logger().info("store %s: %d layers x %d neurons, %d sequences x %d tokens", out,
                       len(settings.layers), lm.d_mlp, settings.n_sequences, settings.ctx_len)
    return prepare_store(out, settings, lm)
