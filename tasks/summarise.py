"""Summarise a finished store (core.summary): a table per layer and the most / least polysemantic
neurons with the tokens their clusters peak on, published to the Prefect UI as artifacts."""
from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from neuron_embeddings.core.summary import below_top_rows, cluster_tokens, layer_table, rank_neurons, report_markdown
from neuron_embeddings.storage import schema
from neuron_embeddings.storage import store as st


def summarise_store(out: str, n_show: int = 5) -> dict:
    store = st.Store(out)
    s = store.settings()
    m = st.read_metrics(store, ("n_examples", "n_clusters", "mean_distance"))
    table = layer_table(list(s.layers), m["n_examples"], m["n_clusters"], m["mean_distance"])
    if s.strata:  # behaviours found only below the top-k
        for row, below in zip(table, below_top_rows(st.read(store, schema.BELOW_ONLY), m["n_examples"])):
            row.update(below)
    most, least = rank_neurons(m["n_examples"], m["n_clusters"], m["mean_distance"], min_examples=max(2, s.k // 2))
    tokens, vocab = st.read_tokens(store), st.read_vocab(store)

    def describe(row: int, j: int) -> dict:
        region = (row, j)
        return {
            "layer": int(s.layers[row]), "neuron": int(j),
            "n_examples": int(m["n_examples"][row, j]), "n_clusters": int(m["n_clusters"][row, j]),
            "mean_distance": round(float(m["mean_distance"][row, j]), 4),
            "clusters": cluster_tokens(st.read(store, schema.LABELS, region), st.read(store, schema.TOPK_SEQ, region),
                                       st.read(store, schema.TOPK_POS, region), tokens, vocab),
        }

    return {"layers": table, "most_polysemantic": [describe(*p) for p in most[:n_show]],
            "least_polysemantic": [describe(*p) for p in least[:n_show]]}


@task(name="summarise", cache_policy=NO_CACHE)
def summarise_task(out: str, n_show: int = 10) -> dict:
    """Summarise the complete store and publish it to the Prefect UI (a table per layer and a
    markdown report); consolidate its metadata for readers."""
    summary = summarise_store(out, n_show=n_show)
    st.consolidate(st.Store(out))
    create_table_artifact(summary["layers"], key="layer-summary", description=f"per-layer summary of {out}")
    create_markdown_artifact(report_markdown(summary, out), key="polysemanticity-report",
                             description=f"the most and least polysemantic neurons of {out}")
    return summary
