"""Per-neuron accuracy of clusterings against known features, baselines, and rank correlations.

Everything here is pure NumPy/SciPy on a ``NeuronExamples`` (the examples of N neurons with their
true features); the clustering is the pipeline's own (``core.cluster.cluster_shard``), run on the
neuron embeddings ``e = x * w_j`` and, as a baseline, on the raw MLP inputs ``x``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import spearmanr

from neuron_embeddings.groundtruth.ari import adjusted_rand_index
from neuron_embeddings.core.cluster import cluster_shard

METRICS = ("n_clusters", "max_distance", "mean_distance", "mean_intra", "mean_inter")
METHODS = ("embedding", "raw_x", "input_identity", "random")
GATED_METHODS = ("gate_half", "linear_half")  # gated neurons: e = [x*w_gate ; x*w_in], each half alone
PRESENT_SHARE = 0.1  # a feature is "present" in a neuron's examples when it is the true feature of
PRESENT_MIN = 2  # at least max(PRESENT_MIN, PRESENT_SHARE * n) of them


@dataclass
class NeuronExamples:
    """The selected examples of N neurons (k slots each) with their ground truth.

    act_NK: activation, NaN where no example (the pipeline clusters slots with act > 0).
    emb_NKD: neuron embeddings x * w_j (gated neurons: [x * w_gate_j ; x * w_in_j], twice x's width).
    x_NKD: the raw MLP inputs. true_NK: the true feature of each
    example (any int; -1 = none). input_NK: the identity of the input (token id, or the set of active
    features in the toy model). n_drivers_N: the true number of features of each neuron, from the
    weights (planted: the features it reads; toy: ``ToyModel.n_drivers_M``).
    """

    name: str
    act_NK: np.ndarray
    emb_NKD: np.ndarray
    x_NKD: np.ndarray
    true_NK: np.ndarray
    input_NK: np.ndarray
    n_drivers_N: np.ndarray
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        N, K = self.act_NK.shape
        for name in ("true_NK", "input_NK"):
            if getattr(self, name).shape != (N, K):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected {(N, K)}")
        if self.x_NKD.shape[:2] != (N, K) or self.emb_NKD.shape[:2] != (N, K) or \
                self.emb_NKD.shape[2] not in (self.x_NKD.shape[2], 2 * self.x_NKD.shape[2]):
            raise ValueError(f"emb {self.emb_NKD.shape} and x {self.x_NKD.shape} must be [{N}, {K}, D] (or emb [{N}, {K}, 2D]: gated)")
        if self.n_drivers_N.shape != (N,):
            raise ValueError(f"n_drivers_N has shape {self.n_drivers_N.shape}, expected {(N,)}")

    @property
    def gated(self) -> bool:
        """True when the embeddings are gated ones, [gate half ; linear half]."""
        return self.emb_NKD.shape[2] == 2 * self.x_NKD.shape[2]

    def mask_NK(self) -> np.ndarray:
        """The slots the pipeline clusters: finite activation > 0."""
        with np.errstate(invalid="ignore"):
            return np.isfinite(self.act_NK) & (self.act_NK > 0)

    @staticmethod
    def concat(name: str, parts: list[NeuronExamples]) -> NeuronExamples:
        """The neurons of several parts (same k and D) as one set."""
        cat = lambda attr: np.concatenate([getattr(p, attr) for p in parts])
        return NeuronExamples(name, cat("act_NK"), cat("emb_NKD"), cat("x_NKD"), cat("true_NK"), cat("input_NK"),
                              cat("n_drivers_N"), dict(parts=[p.info for p in parts]))


def n_present(true_n: np.ndarray) -> int:
    """How many true features account for at least max(2, 10 %) of a neuron's examples."""
    t = true_n[true_n >= 0]
    if not len(t):
        return 0
    _, counts = np.unique(t, return_counts=True)
    return int((counts >= max(PRESENT_MIN, PRESENT_SHARE * len(true_n))).sum())


def random_labels(labels_n: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same cluster sizes as ``labels_n``, assigned to the examples at random."""
    return rng.permutation(labels_n)


def evaluate(ex: NeuronExamples, linkage: str = "average", threshold: float = 0.5, seed: int = 0) -> dict:
    """Per-neuron results [N] of one clustering configuration: ARI of every method against the true
    features, numbers of clusters, true numbers of features, and the embedding clustering's metrics
    (and its labels, ``labels_NK``, -1 where not clustered). Gated embeddings add the ARI of each
    half clustered alone (``ari_gate_half``, ``ari_linear_half``)."""
    mask_NK = ex.mask_NK()
    act_NK = np.where(mask_NK, ex.act_NK, np.nan).astype(np.float32)
    ne = cluster_shard(ex.emb_NKD, act_NK, linkage, threshold)
    rx = cluster_shard(ex.x_NKD, act_NK, linkage, threshold)
    rng = np.random.default_rng(seed)
    N = len(act_NK)
    halves = {}
    if ex.gated:
        D = ex.x_NKD.shape[2]
        halves = {"gate_half": cluster_shard(ex.emb_NKD[..., :D], act_NK, linkage, threshold),
                  "linear_half": cluster_shard(ex.emb_NKD[..., D:], act_NK, linkage, threshold)}
    out = {f"ari_{m}": np.full(N, np.nan) for m in METHODS + tuple(halves)}
    out.update(n_examples=mask_NK.sum(1), n_present=np.zeros(N, dtype=np.int64), n_drivers=ex.n_drivers_N.copy(),
               n_clusters_raw_x=rx.n_clusters.astype(np.int64), labels_NK=ne.labels)
    for name in METRICS:
        out[name] = getattr(ne, name).astype(np.float64)
    for j in range(N):
        idx = np.flatnonzero(mask_NK[j])
        if len(idx) < 2:
            continue
        true_n = ex.true_NK[j, idx]
        out["n_present"][j] = n_present(true_n)
        labels_n = ne.labels[j, idx]
        out["ari_embedding"][j] = adjusted_rand_index(true_n, labels_n)
        out["ari_raw_x"][j] = adjusted_rand_index(true_n, rx.labels[j, idx])
        out["ari_input_identity"][j] = adjusted_rand_index(true_n, ex.input_NK[j, idx])
        out["ari_random"][j] = adjusted_rand_index(true_n, random_labels(labels_n, rng))
        for name, half in halves.items():
            out[f"ari_{name}"][j] = adjusted_rand_index(true_n, half.labels[j, idx])
    return out


def _mean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def summarise(res: dict) -> dict:
    """Means over the evaluated neurons (>= 2 examples, >= 1 present feature): all, one-feature and
    multi-feature neurons (by features present in the examples)."""
    ok = np.isfinite(res["ari_embedding"]) & (res["n_present"] >= 1)
    one, multi = ok & (res["n_present"] == 1), ok & (res["n_present"] >= 2)
    out: dict = {"n_neurons": int(ok.sum()), "n_one": int(one.sum()), "n_multi": int(multi.sum())}
    methods = METHODS + tuple(m for m in GATED_METHODS if f"ari_{m}" in res)
    for group, m in (("all", ok), ("one", one), ("multi", multi)):
        for method in methods:
            out[f"ari_{method}_{group}"] = _mean(res[f"ari_{method}"][m])
        out[f"exact_embedding_{group}"] = _mean((res["n_clusters"] == res["n_present"])[m].astype(float))
        out[f"exact_raw_x_{group}"] = _mean((res["n_clusters_raw_x"] == res["n_present"])[m].astype(float))
        out[f"n_clusters_{group}"] = _mean(res["n_clusters"][m])
        out[f"n_clusters_raw_x_{group}"] = _mean(res["n_clusters_raw_x"][m].astype(float))
    out["one_cluster_one"] = _mean((res["n_clusters"] == 1)[one].astype(float))
    out["feature_recall"] = _mean((res["n_present"] / np.maximum(res["n_drivers"], 1))[ok & (res["n_drivers"] > 0)])
    d = res["ari_embedding"][multi] - res["ari_raw_x"][multi]
    out["multi_embedding_vs_raw_x"] = {"better": int((d > 1e-9).sum()), "same": int((np.abs(d) <= 1e-9).sum()),
                                       "worse": int((d < -1e-9).sum())}
    return out


def by_path(res: dict, paths_N: np.ndarray) -> dict:
    """Gated models: mean ARI of the whole embedding and of each half, over the evaluated neurons
    with >= 2 features present, per path their features go through (gate, linear, both)."""
    ok = np.isfinite(res["ari_embedding"]) & (res["n_present"] >= 2)
    out = {}
    for path in np.unique(paths_N[paths_N != ""]):
        m = ok & (paths_N == path)
        out[str(path)] = {"n_multi": int(m.sum()),
                          **{f"ari_{k}": _mean(res[f"ari_{k}"][m]) for k in ("embedding",) + GATED_METHODS}}
    return out


def spearman_table(res: dict) -> dict:
    """Spearman's rho (and p) between each metric and the true number of features, over the
    evaluated neurons; against the features read by the weights and against those present."""
    ok = np.isfinite(res["ari_embedding"]) & (res["n_present"] >= 1)
    out: dict = {}
    for truth in ("n_drivers", "n_present"):
        for metric in METRICS + ("n_clusters_raw_x",):
            x, y = res[metric][ok].astype(float), res[truth][ok].astype(float)
            fin = np.isfinite(x)
            if fin.sum() < 3 or np.ptp(y[fin]) == 0 or np.ptp(x[fin]) == 0:
                out[f"{metric}~{truth}"] = {"rho": float("nan"), "p": float("nan"), "n": int(fin.sum())}
                continue
            r = spearmanr(x[fin], y[fin])
            out[f"{metric}~{truth}"] = {"rho": float(r.statistic), "p": float(r.pvalue), "n": int(fin.sum())}
    return out
