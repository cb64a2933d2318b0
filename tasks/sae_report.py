"""Compare units by their neuron-embedding metrics: a layer's MLP neurons vs SAE features.

Pure functions over the stores' `metrics/*` arrays (row 0: the stores compared here have one
layer), a markdown table and a PNG plot for the SAE flow's report.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from neuron_embeddings.storage import schema
from neuron_embeddings.storage import store as st

SAE_FIGURES = ("explained_variance", "mse", "l0", "dead_fraction", "dense_fraction", "l_n", "delta_lm_loss",
               "loss_recovered")


def unit_summary(m: dict[str, np.ndarray]) -> dict:
    """Figures over the units that have examples (n_examples >= 2) of one store row.

    `m` maps each of the store's METRICS to a [units] array."""
    have = m["n_examples"] >= 2
    n = int(have.sum())

    def mean(name):
        v = m[name][have].astype(np.float64)
        v = v[~np.isnan(v)]
        return float(v.mean()) if v.size else None

    clusters = m["n_clusters"][have].astype(np.float64)
    return {
        "units": int(m["n_examples"].shape[0]),
        "units_with_examples": n,
        "mean_distance": mean("mean_distance"),
        "max_distance": mean("max_distance"),
        "clusters_mean": float(clusters.mean()) if n else None,
        "clusters_median": float(np.median(clusters)) if n else None,
        "mean_intra": mean("mean_intra"),
        "mean_inter": mean("mean_inter"),
        "share_single_cluster": float((clusters == 1).mean()) if n else None,
    }


def peak_token_perplexity(seq_UK: np.ndarray, pos_UK: np.ndarray, tokens_ST: np.ndarray) -> np.ndarray:
    """[U] exp(entropy) of the tokens each unit's examples peak on (NaN under 2 examples): an
    independent, token-level view of monosemanticity (1 = always the same token)."""
    out = np.full(seq_UK.shape[0], np.nan)
    for u in range(seq_UK.shape[0]):
        ok = seq_UK[u] >= 0
        if ok.sum() < 2:
            continue
        _, counts = np.unique(tokens_ST[seq_UK[u][ok], pos_UK[u][ok]], return_counts=True)
        p = counts / counts.sum()
        out[u] = float(np.exp(-(p * np.log(p)).sum()))
    return out


def effective_dims(W_DU: np.ndarray) -> np.ndarray:
    """[U] participation ratio (Σ w²)² / Σ w⁴ of each unit's input weights: how many input
    dimensions its embeddings x ⊙ w effectively span (cosines between embeddings of few dimensions
    are high whatever the inputs, so L_N can lower the distances by shrinking this)."""
    w2 = W_DU.astype(np.float64) ** 2
    return w2.sum(0) ** 2 / np.maximum((w2 ** 2).sum(0), 1e-300)


def spectrum_summary(n_clusters_US: np.ndarray, mean_distance_US: np.ndarray, below_only_U: np.ndarray,
                     positive_U: np.ndarray, have_U: np.ndarray, sources: list[str]) -> dict:
    """Across the activation spectrum (--strata), over the units with examples: per source (the
    top-k, then each stratum) the mean clusters present and the mean distance among its examples;
    the mean behaviours found only below the top-k; the median share of tokens a unit is positive on."""
    def mean(v):
        v = v[have_U].astype(np.float64)
        v = v[~np.isnan(v)]
        return float(v.mean()) if v.size else None

    return {"sources": sources, "clusters": [mean(n_clusters_US[:, i]) for i in range(len(sources))],
            "mean_distance": [mean(mean_distance_US[:, i]) for i in range(len(sources))],
            "below_top_per_unit": mean(below_only_U),
            "positive_fraction_median": float(np.median(positive_U[have_U])) if have_U.any() else None}


def store_summary(url: str) -> dict:
    store = st.Store(url)
    m = {name: a[0] for name, a in st.read_metrics(store).items()}
    out = unit_summary(m)
    ppl = peak_token_perplexity(st.read(store, schema.TOPK_SEQ)[0], st.read(store, schema.TOPK_POS)[0], st.read_tokens(store))
    have = m["n_examples"] >= 2
    out["peak_token_perplexity"] = float(np.nanmedian(ppl[have])) if have.any() else None
    out["input_effective_dims"] = float(np.median(effective_dims(st.read(store, schema.W_IN)[0])))
    intervals = store.attrs.get("strata_intervals")
    if intervals:
        out["spectrum"] = spectrum_summary(
            st.read(store, schema.SPECTRUM_CLUSTERS)[0], st.read(store, schema.SPECTRUM_DISTANCE)[0],
            st.read(store, schema.BELOW_ONLY)[0], st.read(store, schema.POSITIVE)[0], have,
            ["top-k", *(f"{lo:g}-{hi:g} x max" for lo, hi in intervals)])
    return out


def comparison_rows(stores: dict[str, str], sae_metrics: dict[str, dict | None]) -> list[dict]:
    """One row per compared unit kind: the store's unit figures plus the SAE's own figures."""
    rows = []
    for name, url in stores.items():
        row = {"units_kind": name, **store_summary(url)}
        figs = sae_metrics.get(name) or {}
        row.update({k: figs.get(k) for k in SAE_FIGURES})
        rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"


TABLE_COLUMNS = [("units_kind", "units"), ("units", "n"), ("units_with_examples", "with examples"),
                 ("mean_distance", "mean dist."), ("max_distance", "max dist."), ("clusters_mean", "clusters mean"),
                 ("clusters_median", "clusters median"), ("mean_intra", "mean intra"), ("mean_inter", "mean inter"),
                 ("share_single_cluster", "single-cluster share"), ("peak_token_perplexity", "peak-token ppl."),
                 ("input_effective_dims", "weight eff. dims"), ("explained_variance", "expl. var."),
                 ("mse", "MSE"), ("l0", "L0"), ("dead_fraction", "dead"), ("dense_fraction", "dense"),
                 ("l_n", "L_N"), ("delta_lm_loss", "Δ LM loss")]


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(t for _, t in TABLE_COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    body = ["| " + " | ".join(r[k] if k == "units_kind" else _fmt(r.get(k)) for k, _ in TABLE_COLUMNS) + " |"
            for r in rows]
    return "\n".join([head, sep, *body])


def spectrum_table(rows: list[dict]) -> str:
    """Per unit kind, across the spectrum: clusters present and mean distance by source, behaviours
    only below the top-k, density ("" when no store has strata)."""
    rows = [r for r in rows if r.get("spectrum")]
    if not rows:
        return ""
    sources = rows[0]["spectrum"]["sources"]
    head = ("| units | " + " | ".join(f"clusters: {s}" for s in sources) + " | "
            + " | ".join(f"mean dist.: {s}" for s in sources) + " | only below the top-k | positive on (median) |")
    sep = "|" + "|".join("---" for _ in range(2 * len(sources) + 3)) + "|"
    body = []
    for r in rows:
        sp = r["spectrum"]
        body.append("| " + " | ".join([r["units_kind"], *(_fmt(v) for v in sp["clusters"]),
                                       *(_fmt(v) for v in sp["mean_distance"]), _fmt(sp["below_top_per_unit"]),
                                       _fmt(sp["positive_fraction_median"])]) + " |")
    return "\n".join([head, sep, *body])


def plot(rows: list[dict], path: str | Path, title: str) -> None:
    """Bars of the polysemanticity figures per unit kind (lower = more monosemantic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mean_distance", "mean distance"), ("clusters_mean", "clusters (mean)"),
              ("share_single_cluster", "single-cluster share"), ("mean_intra", "mean intra distance"),
              ("explained_variance", "explained variance (SAEs)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.2))
    names = [r["units_kind"] for r in rows]
    colors = ["#888888", "#4c72b0", "#dd8452", "#55a868", "#c44e52"][:len(rows)]
    for ax, (key, label) in zip(axes, panels, strict=True):
        vals = [np.nan if r.get(key) is None else r[key] for r in rows]
        ax.bar(range(len(rows)), vals, color=colors)
        ax.set_xticks(range(len(rows)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def write_report(out_dir: str, rows: list[dict], title: str, settings: dict) -> dict:
    """report.md, comparison.png and comparison.json in `out_dir`; returns their paths and the markdown."""
    d = Path(out_dir)
    table = markdown_table(rows)
    spectrum = spectrum_table(rows)
    if spectrum:
        spectrum = ("\n\n## Across the activation spectrum\n\n" + spectrum + "\n\nEach unit's top-k and its strata "
                    "(examples sampled from intervals of its maximum) clustered together: per source, the mean "
                    "number of clusters it has examples in and the mean distance among its examples; the mean "
                    "number of clusters with no top-k example; the median share of tokens a unit is positive on.")
    md = (f"# {title}\n\n{table}{spectrum}\n\n"
          "Unit figures over the units with at least 2 examples: mean and max pairwise cosine distance of "
          "their embeddings, clusters at the threshold (mean, median), mean distance within and between "
          "clusters, and the share of units with a single cluster (higher = more monosemantic). Independent "
          "checks (medians over units): the perplexity of the tokens a unit's examples peak on (1 = one "
          "token), and the effective number of input dimensions of its weights w (participation ratio of "
          "w²; embeddings x ⊙ w over few dimensions are near-parallel whatever the input). SAE figures "
          "on held-out activations (L_N: mean over active pairs of 1 - cos against the held-out mean input "
          "of each feature).\n\n"
          f"Settings: `{json.dumps(settings, sort_keys=True)}`\n\n![comparison](comparison.png)\n")
    (d / "report.md").write_text(md)
    (d / "comparison.json").write_text(json.dumps({"rows": rows, "settings": settings}, indent=2))
    plot(rows, d / "comparison.png", title)
    return {"report": str(d / "report.md"), "plot": str(d / "comparison.png"), "markdown": md, "table": table}


@task(name="sae-compare", cache_policy=NO_CACHE)
def compare_task(out: str, stores: dict, sae_dirs: dict, title: str, settings: dict) -> dict:
    """The SAE flow's comparison of unit kinds: a table, a plot and a report in `out`."""
    metrics = {name: json.loads((Path(d) / "metrics.json").read_text()) for name, d in sae_dirs.items()}
    rows = comparison_rows(stores, metrics)
    rep = write_report(out, rows, title, settings)
    return {"rows": rows, **rep}
