"""The ground-truth benchmark's markdown report and PNG plots, from its results (``results.json``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

METRIC_COLUMNS = ("n_clusters", "max_distance", "mean_distance", "mean_intra", "mean_inter", "n_clusters_raw_x")


def _f(x, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _label(d: dict) -> str:
    return f"{d['generator']} {d['variant']}"


# --------------------------------------------------------------------------- tables


def headline_table(datasets: list[dict], selection: str) -> list[str]:
    rows = []
    for d in datasets:
        if d["selection"] != selection:
            continue
        s = d["default"]
        rows.append([d["generator"], d["variant"], f"{s['n_one']} / {s['n_multi']}",
                     _f(s["ari_embedding_multi"]), _f(s["ari_raw_x_multi"]), _f(s["ari_input_identity_multi"]),
                     _f(s["ari_random_multi"]), _f(s["one_cluster_one"]), _f(s["exact_raw_x_one"]),
                     _f(s["exact_embedding_all"]), _f(s["exact_raw_x_all"]), _f(s["ari_embedding_all"]),
                     _f(s["ari_raw_x_all"]), _f(s["feature_recall"])])
    header = ["model", "variant", "neurons 1-feat / multi", "ARI multi: **embeddings**", "raw x", "input identity",
              "random", "1-feat. kept whole: **emb.**", "raw x", "exact # clusters: **emb.**", "raw x",
              "ARI all: **emb.**", "raw x", "feature recall"]
    return _table(header, rows)


def _best(sweep: list[dict], key: str) -> dict:
    vals = [r for r in sweep if r.get(key) is not None]
    return max(vals, key=lambda r: r[key]) if vals else {}


def good_thresholds(sweep: list[dict], key: str, linkage: str = "average", within: float = 0.05) -> list[float]:
    """Thresholds at which ``key`` (with ``linkage``) is within ``within`` of its best over the whole sweep."""
    best = _best(sweep, key).get(key)
    if best is None:
        return []
    return [r["threshold"] for r in sweep if r["linkage"] == linkage and r.get(key) is not None
            and r[key] >= best - within]


def _ts(ts: list[float]) -> str:
    return ", ".join(f"{t:g}" for t in ts) or "none"


def best_table(datasets: list[dict]) -> list[str]:
    rows = []
    for d in datasets:
        be, bx = _best(d["sweep"], "ari_embedding_all"), _best(d["sweep"], "ari_raw_x_all")
        rows.append([d["generator"], d["variant"], d["selection"], _f(d["default"]["ari_embedding_all"]),
                     _f(d["default"]["ari_raw_x_all"]),
                     f"{_f(be.get('ari_embedding_all'))} ({be.get('linkage')}, {be.get('threshold')})",
                     f"{_f(bx.get('ari_raw_x_all'))} ({bx.get('linkage')}, {bx.get('threshold')})",
                     _ts(good_thresholds(d["sweep"], "ari_embedding_all")),
                     _ts(good_thresholds(d["sweep"], "ari_raw_x_all"))])
    header = ["model", "variant", "selection", "ARI all at default: **embeddings**", "raw x",
              "best over the sweep: **embeddings** (linkage, t)", "raw x (linkage, t)",
              "average-linkage thresholds within 0.05 of the best: **emb.**", "raw x"]
    return _table(header, rows)


def sweep_matrix(datasets: list[dict], generator: str, key: str, linkages, thresholds) -> np.ndarray:
    """[linkage, threshold] mean of ``key`` over the generator's datasets."""
    acc = np.full((len(linkages), len(thresholds)), np.nan)
    for i, linkage in enumerate(linkages):
        for j, t in enumerate(thresholds):
            vals = [r[key] for d in datasets if d["generator"] == generator for r in d["sweep"]
                    if r["linkage"] == linkage and r["threshold"] == t and r.get(key) is not None]
            if vals:
                acc[i, j] = float(np.mean(vals))
    return acc


def sweep_tables(datasets: list[dict], linkages, thresholds) -> list[str]:
    lines = []
    for generator in sorted({d["generator"] for d in datasets}):
        for key, name in (("ari_embedding_all", "neuron embeddings"), ("ari_raw_x_all", "raw x")):
            m = sweep_matrix(datasets, generator, key, linkages, thresholds)
            lines += [f"\n*{generator}, {name}: mean ARI (all neurons) over its variants and selections*\n"]
            lines += _table(["linkage"] + [f"t = {t}" for t in thresholds],
                            [[lk] + [_f(v) for v in row] for lk, row in zip(linkages, m)])
    return lines


def spearman_tables(datasets: list[dict]) -> list[str]:
    lines = []
    for truth, title in (("n_drivers", "true number of features from the weights"),
                         ("n_present", "number of true features present in the neuron's examples")):
        rows = []
        for d in datasets:
            sp = d["spearman"]
            n = sp[f"n_clusters~{truth}"]["n"]
            rows.append([_label(d), d["selection"], str(n)] + [_f(sp[f"{m}~{truth}"]["rho"]) for m in METRIC_COLUMNS])
        lines += [f"\n*Spearman's rho against the {title}*\n"]
        lines += _table(["model", "selection", "neurons"] + [f"`{m}`" for m in METRIC_COLUMNS[:-1]]
                        + ["raw-x `n_clusters`"], rows)
    return lines


def gated_tables(datasets: list[dict]) -> list[str]:
    """Gated planted models: ARI of the concatenated embedding and of each half, per path and threshold."""
    lines = []
    for d in datasets:
        if "by_path" not in d:
            continue
        rows = [[t, path, str(r["n_multi"]), _f(r["ari_embedding"]), _f(r["ari_gate_half"]), _f(r["ari_linear_half"])]
                for t, paths in d["by_path"].items() for path, r in paths.items()]
        lines += [f"\n*{_label(d)}, selection `{d['selection']}`: mean ARI over multi-feature neurons (average "
                  "linkage), by the path their features go through*\n"]
        lines += _table(["threshold", "path", "neurons", "**[x⊙w_gate ; x⊙w_in]** (the tool)", "x⊙w_gate alone",
                         "x⊙w_in alone"], rows)
    return lines


def sae_section(sae: dict | None) -> list[str]:
    if not sae:
        return ["Not run in this configuration."]
    if "skipped" in sae:
        return [f"Not run: {sae['skipped']}."]
    rows = []
    for r in sae["rows"]:
        rows.append([f"`{r['name']}`", str(r["n_runs"]), _f(r["mmcs"], 3), _f(r["mmcs_std"], 3), _f(r["recovered"], 2),
                     _f(r["mmcs_all_features"], 3), _f(r["explained_variance"], 3), _f(r["mse"], 5), _f(r["l0"], 2),
                     _f(r["dead_fraction"], 2), _f(r["l_n"], 3)])
    return [sae.get("description", ""), ""] + _table(
        ["SAE", "runs", "MMCS (represented features)", "± std over runs", "recovered (cos > 0.9)",
         "MMCS (all features)", "explained variance", "MSE", "L0", "dead fraction", "held-out L_N (mean per pair)"],
        rows)


def findings(datasets: list[dict]) -> list[str]:
    """One generated line per dataset: who wins at the default and at each method's best setting."""
    out = []
    for d in datasets:
        s = d["default"]
        be, bx = _best(d["sweep"], "ari_embedding_all"), _best(d["sweep"], "ari_raw_x_all")
        de, dx = s["ari_embedding_all"], s["ari_raw_x_all"]
        if de is None or dx is None:
            continue
        verdict = "tie" if abs(de - dx) < 0.02 else ("embeddings win" if de > dx else "raw x wins")
        best_e, best_x = be.get("ari_embedding_all"), bx.get("ari_raw_x_all")
        best_verdict = ("tie" if abs(best_e - best_x) < 0.02 else
                        ("embeddings win" if best_e > best_x else "raw x wins"))
        out.append(f"- {_label(d)}, `{d['selection']}`: at the default {verdict} ({_f(de)} vs {_f(dx)}); "
                   f"each at its best setting: {best_verdict} ({_f(best_e)} vs {_f(best_x)}).")
    return out


# --------------------------------------------------------------------------- plots


def _plot_sweeps(datasets: list[dict], generator: str, path: Path, linkages, thresholds) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = [d for d in datasets if d["generator"] == generator]
    variants = list(dict.fromkeys(d["variant"] for d in ds))
    selections = list(dict.fromkeys(d["selection"] for d in ds))
    fig, axes = plt.subplots(len(selections), len(variants), figsize=(3.2 * len(variants), 2.8 * len(selections)),
                             squeeze=False, sharey=True)
    colors = dict(zip(linkages, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for i, sel in enumerate(selections):
        for j, var in enumerate(variants):
            ax = axes[i, j]
            d = next(d for d in ds if d["variant"] == var and d["selection"] == sel)
            for lk in linkages:
                rows = [r for r in d["sweep"] if r["linkage"] == lk]
                t = [r["threshold"] for r in rows]
                ax.plot(t, [np.nan if r["ari_embedding_all"] is None else r["ari_embedding_all"] for r in rows],
                        "-o", ms=3, color=colors[lk], label=f"emb. {lk}")
                ax.plot(t, [np.nan if r["ari_raw_x_all"] is None else r["ari_raw_x_all"] for r in rows],
                        "--", color=colors[lk], alpha=0.6, label=f"raw x {lk}")
            ax.set_title(f"{var} | {sel}", fontsize=9)
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
            if i == len(selections) - 1:
                ax.set_xlabel("threshold (cosine distance)")
            if j == 0:
                ax.set_ylabel("mean ARI, all neurons")
    axes[0, 0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"{generator}: embeddings (solid), raw x (dashed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_spearman(datasets: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{_label(d)} | {d['selection']}" for d in datasets]
    m = np.array([[np.nan if d["spearman"][f"{k}~n_drivers"]["rho"] is None else d["spearman"][f"{k}~n_drivers"]["rho"]
                   for k in METRIC_COLUMNS] for d in datasets])
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(labels) + 1.5))
    im = ax.imshow(m, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(METRIC_COLUMNS)), [c.replace("_raw_x", " (raw x)") for c in METRIC_COLUMNS],
                  rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label="Spearman rho vs true number of features")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_counts(datasets: list[dict], path: Path) -> None:
    """Mean number of clusters (embeddings, raw x) per number of true features present, per dataset."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = [d for d in datasets if d["selection"] == "top"] or datasets
    fig, axes = plt.subplots(1, len(ds), figsize=(2.4 * len(ds), 2.6), squeeze=False, sharey=True)
    for ax, d in zip(axes[0], ds):
        pn = d["per_neuron"]
        present = np.array([np.nan if v is None else v for v in pn["n_present"]], float)
        for key, style, name in (("n_clusters", "-o", "embeddings"), ("n_clusters_raw_x", "--s", "raw x")):
            vals = np.array([np.nan if v is None else v for v in pn[key]], float)
            xs = sorted({int(v) for v in present[np.isfinite(present)] if v >= 1})
            ax.plot(xs, [np.nanmean(vals[present == x]) for x in xs], style, ms=3, label=name)
        lim = max(3, int(np.nanmax(present))) if np.isfinite(present).any() else 3
        ax.plot([1, lim], [1, lim], ":", color="gray", lw=1, label="= truth")
        ax.set_title(_label(d), fontsize=8)
        ax.set_xlabel("true features present", fontsize=8)
        ax.set_xlim(0.5, lim + 0.5)
        ax.set_yscale("log")
    axes[0, 0].set_ylabel("mean # clusters (t = 0.5)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_sae(sae: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sae["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(7, 2.8))
    names = [r["name"] for r in rows]
    colors = [f"C{i}" for i in range(len(rows))]
    axes[0].bar(names, [r["mmcs"] for r in rows], yerr=[r["mmcs_std"] or 0 for r in rows], color=colors)
    axes[0].set_ylabel("MMCS to true features")
    axes[0].set_ylim(0, 1)
    axes[1].bar(names, [r["explained_variance"] for r in rows], color=colors)
    axes[1].set_ylabel("explained variance")
    axes[1].set_ylim(0, 1)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- report


def write_report(results: dict, out: Path) -> Path:
    """Write ``out``/report.md and its PNGs from the benchmark's results; returns the report's path."""
    out = Path(out)
    cfg, datasets = results["config"], results["datasets"]
    linkages, thresholds = cfg["linkages"], cfg["thresholds"]
    generators = sorted({d["generator"] for d in datasets})
    for g in generators:
        _plot_sweeps(datasets, g, out / f"sweep_{g}.png", linkages, thresholds)
    _plot_spearman(datasets, out / "spearman.png")
    _plot_counts(datasets, out / "clusters_vs_truth.png")
    sae = results.get("sae")
    if sae and "rows" in sae:
        _plot_sae(sae, out / "sae.png")
    planted_match = [d.get("pipeline_clusters_match") for d in datasets if d["generator"] == "planted"]

    lines = [
        "# Ground truth: how well neuron embeddings recover known features", "",
        f"Command: `{results['command']}` ({cfg['name']} configuration), commit `{results['commit']}`, "
        f"{results['seconds']:.0f} s on {results['machine']}. Raw numbers: `results.json`.", "",
        "## What is measured", "",
        f"- **planted**: GPT-2-architecture models whose layer-0 neurons read 1, 2 or 3 known features "
        f"(`neuron_embeddings.core.synthetic.build_planted_model`, d_mlp = {cfg['planted_variants'][0]['build'].get('d_mlp')}, "
        f"seeds {cfg['planted_seeds']}), run through the real pipeline (prepare, scan, embed, cluster) on a "
        "corpus of random feature and filler words; an example's true feature is the feature of the token it "
        "peaks on. Variants: `clean`; `shared-s` (every pair of feature directions has cosine s); `unequal` "
        "(feature strengths scaled by 0.35-1); `noise-2` (token embeddings get a noise vector of norm 2 "
        "orthogonal to every feature direction) and `noise-4` (norm 4); `gated`: a Llama-architecture model "
        "(gated, bias-free MLP, RMSNorm) whose neurons read their features through the gate, the linear path or "
        "both, the other path reading the direction every token shares (an open gate, or a plain scale).",
        f"- **toy**: a toy model of superposition (Elhage et al. 2022), trained: 80 sparse features -> x (20 "
        f"dims) -> 40 ReLU neurons -> 80 outputs, importance-weighted MSE (seeds {cfg['toy_seeds']}; "
        f"{cfg['toy_eval']} evaluation inputs). An example's true feature for neuron j is the active feature "
        "with the largest contribution f_i (W_i . w_j) to j's pre-activation; the true number of features of "
        "a neuron (from the weights) counts features that alone, at full magnitude, activate it to at least "
        "half of its strongest single feature. Variants: `base`, `crowded` (x has 10 dims), `unequal` (feature "
        "magnitudes 0.25-1), `noise` (Gaussian noise, std 0.1, on x), `dense` (features active 3 % of the time "
        "instead of 1 %).",
        f"- Per neuron, the k = {cfg['k']} examples chosen by `top` or `band:F` are clustered by the "
        "pipeline's own code (`core.cluster.cluster_shard`) and scored with the adjusted Rand index (ARI) "
        "against their true features. A feature is *present* in a neuron's examples when it is the true "
        "feature of at least max(2, 10 %) of them; *1-feature* / *multi* neurons have one / several present. "
        "*Feature recall* = features present / true features from the weights. *ARI all* is the mean over "
        "every evaluated neuron (a 1-feature neuron scores 1 when its examples stay in one cluster, else 0); "
        "*ARI multi* only over multi-feature neurons; *exact # clusters*: the share of neurons whose number of "
        "clusters equals the number of features present.",
        "- Methods on the same examples: **neuron embeddings** `x ⊙ w_j` (the tool); **raw x** (the MLP inputs, "
        "same clustering); **input identity** (one cluster per token id; in the toy model per set of active "
        "features); **random** (the embedding clusters' sizes, assigned at random).",
    ]
    if planted_match:
        lines.append(f"- Check: the pipeline's stored clusters equal this benchmark's re-clustering at the default "
                     f"settings on {sum(bool(m) for m in planted_match)} of {len(planted_match)} planted datasets.")
    for sel in cfg["selections"]:
        lines += ["", f"## At the tool's defaults (average linkage, threshold 0.5), selection `{sel}`", ""]
        lines += headline_table(datasets, sel)
    lines += ["", "## Thresholds and linkages", "",
              f"Each method at the default and at its best setting over linkages {', '.join(linkages)} and "
              f"thresholds {', '.join(str(t) for t in thresholds)} (mean ARI over all evaluated neurons):", ""]
    lines += best_table(datasets)
    lines += sweep_tables(datasets, linkages, thresholds)
    lines += [""] + [f"![{g} sweep](sweep_{g}.png)" for g in generators]
    gated = gated_tables(datasets)
    if gated:
        lines += ["", "## Gated neurons: the concatenated embedding against its halves", "",
                  "A gated neuron's embedding is `[x⊙w_gate ; x⊙w_in]`. Each half alone sees only one path; the "
                  "concatenation sees both, but the path that reads no feature adds a component every example "
                  "shares, which pulls different features closer together (lower thresholds separate them).", ""]
        lines += gated
    lines += ["", "## Number of clusters vs true number of features", "", "![clusters vs truth](clusters_vs_truth.png)",
              "", "## Do the polysemanticity metrics rank neurons by their true number of features?", "",
              "Spearman's rho over the evaluated neurons, at the defaults (`mean_intra` and `mean_inter` are "
              "undefined for neurons with one cluster and omitted there).", ""]
    lines += spearman_tables(datasets)
    lines += ["", "![spearman](spearman.png)", "", "## SAEs on the toy model: standard vs L_N", ""]
    lines += sae_section(sae)
    if sae and "rows" in sae:
        lines += ["", "![sae](sae.png)"]
    lines += ["", "## Where neuron embeddings win and where they do not (generated from the numbers above)", ""]
    lines += findings(datasets)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
