"""Summarise a finished store: a table per layer and the most / least polysemantic neurons, with
the tokens their clusters peak on."""
from __future__ import annotations

from collections import Counter

import numpy as np


def layer_table(layers: list[int], n_examples_LM: np.ndarray, n_clusters_LM: np.ndarray,
                mean_distance_LM: np.ndarray) -> list[dict]:
    """One row per layer: neurons, mean examples, mean clusters, mean distance, share polysemantic."""
    rows = []
    for i, layer in enumerate(layers):
        have = n_examples_LM[i] >= 2
        md = mean_distance_LM[i][have]
        rows.append({
            "layer": int(layer),
            "neurons": int(n_examples_LM.shape[1]),
            "with_examples": int(have.sum()),
            "mean_examples": round(float(n_examples_LM[i].mean()), 2),
            "mean_clusters": round(float(n_clusters_LM[i][have].mean()), 3) if have.any() else None,
            "mean_distance": round(float(np.nanmean(md)), 4) if md.size else None,
            "share_multi_cluster": round(float((n_clusters_LM[i][have] > 1).mean()), 4) if have.any() else None,
        })
    return rows


def below_top_rows(below_only_LM: np.ndarray, n_examples_LM: np.ndarray) -> list[dict]:
    """Per layer (--strata): the behaviours (clusters of the top-k and strata together) that have
    no top-k example, in all and per neuron, and the share of neurons with at least one."""
    rows = []
    for i in range(below_only_LM.shape[0]):
        have = n_examples_LM[i] >= 1
        b = below_only_LM[i][have]
        rows.append({"below_top_behaviours": int(b.sum()),
                     "below_top_per_neuron": round(float(b.mean()), 3) if b.size else None,
                     "share_with_below_top": round(float((b > 0).mean()), 4) if b.size else None})
    return rows


def rank_neurons(n_examples_LM: np.ndarray, n_clusters_LM: np.ndarray, mean_distance_LM: np.ndarray,
                 min_examples: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(row, neuron) pairs, most polysemantic first (clusters desc, mean distance desc) and least
    polysemantic first (clusters asc, mean distance asc), over neurons with enough examples."""
    rows, cols = np.nonzero(n_examples_LM >= min_examples)
    nc = n_clusters_LM[rows, cols]
    md = np.nan_to_num(mean_distance_LM[rows, cols], nan=0.0)
    most = np.lexsort((-md, -nc))
    least = np.lexsort((md, nc))
    pairs = list(zip(rows.tolist(), cols.tolist()))
    return [pairs[i] for i in most], [pairs[i] for i in least]


def cluster_tokens(labels_K: np.ndarray, seq_K: np.ndarray, pos_K: np.ndarray, tokens_ST: np.ndarray,
                   vocab: np.ndarray, top: int = 3) -> list[dict]:
    """For each cluster (largest first): its size and the most frequent tokens its examples peak on."""
    out = []
    for c in range(int(labels_K.max()) + 1 if (labels_K >= 0).any() else 0):
        idx = np.nonzero(labels_K == c)[0]
        toks = Counter(str(vocab[tokens_ST[seq_K[i], pos_K[i]]]) for i in idx)
        out.append({"cluster": c, "size": int(idx.size), "tokens": [t for t, _ in toks.most_common(top)]})
    return out


def report_markdown(summary: dict, out: str) -> str:
    """The run's report: per-layer table, then the most and the least polysemantic neurons with
    their clusters."""
    lines = [f"# neuron-embeddings: `{out}`", "", "| layer | neurons | with examples | mean clusters | "
             "mean distance | > 1 cluster |", "|---|---|---|---|---|---|"]
    below = all("below_top_behaviours" in r for r in summary["layers"])
    if below:
        lines[2] += " behaviours only below the top-k (per neuron; neurons with one) |"
        lines[3] += "---|"
    for r in summary["layers"]:
        lines.append(f"| {r['layer']} | {r['neurons']} | {r['with_examples']} | {r['mean_clusters']} | "
                     f"{r['mean_distance']} | {100 * (r['share_multi_cluster'] or 0):.1f}% |"
                     + (f" {r['below_top_behaviours']} ({r['below_top_per_neuron']}; "
                        f"{100 * (r['share_with_below_top'] or 0):.1f}%) |" if below else ""))
    for title, key in (("Most polysemantic neurons", "most_polysemantic"),
                       ("Least polysemantic neurons", "least_polysemantic")):
        lines += ["", f"## {title}", "", "| neuron | clusters | mean distance | clusters: size, top tokens |",
                  "|---|---|---|---|"]
        for n in summary[key]:
            cl = "; ".join(f"#{c['cluster']} ({c['size']}): " + " ".join(f"`{t!r}`" for t in c["tokens"])
                           for c in n["clusters"][:6])
            lines.append(f"| L{n['layer']} N{n['neuron']} | {n['n_clusters']} | {n['mean_distance']} | {cl} |")
    return "\n".join(lines)
