"""Hierarchical clustering of each neuron's top-k example embeddings.

For every neuron of a shard (S neurons, k example slots each) the examples
with a finite activation > 0 are clustered by agglomerative hierarchical
clustering (SciPy ``linkage``) on the cosine distance ``1 - cos`` between
their embeddings, and the tree is cut at a distance threshold with
``fcluster(Z, t=threshold, criterion="distance")`` semantics.  Cluster labels
are renumbered by size (0 = largest, ties broken by the smallest example
index in the cluster); unclustered slots get -1.

Per neuron we also report polysemanticity metrics over the clustered
examples: number of examples and clusters, the largest and mean pairwise
distance, and the mean distance of pairs within a cluster / across clusters.

The distances of a whole shard come from batched float64 Gram matmuls
(``cosine_distances``). The per-neuron work is SciPy linkage + fcluster +
vectorised numpy over the condensed distances (``cluster_one``); by default
every neuron of the shard goes through one compiled call instead
(core.cluster_kernels), which gives the same results bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from scipy.cluster import hierarchy

try:  # the routine behind fcluster(criterion="distance"), without validation
    from scipy.cluster._hierarchy import cluster_dist as _cluster_dist
except ImportError:  # pragma: no cover - other SciPy versions
    _cluster_dist = None

LINKAGES: tuple[str, ...] = ("average", "single", "complete", "weighted")


@dataclass
class ClusterResult:
    """Clustering of one shard of S neurons with k example slots each."""

    labels: np.ndarray  # int32 [S, k]; 0 = largest cluster, -1 = not clustered
    linkage: np.ndarray  # float32 [S, k-1, 4]; SciPy linkage, NaN rows beyond n-1
    n_examples: np.ndarray  # int32 [S]
    n_clusters: np.ndarray  # int32 [S]
    max_distance: np.ndarray  # float32 [S]
    mean_distance: np.ndarray  # float32 [S]
    mean_intra: np.ndarray  # float32 [S]
    mean_inter: np.ndarray  # float32 [S]


class OneCluster(NamedTuple):
    """Clustering of the n clustered examples of one neuron."""

    labels_N: np.ndarray  # int32 [n], 0 = largest cluster
    linkage_M4: np.ndarray  # float64 [max(n-1, 0), 4] SciPy linkage matrix
    n_clusters: int
    max_distance: float
    mean_distance: float
    mean_intra: float
    mean_inter: float


def check_linkage(linkage: str) -> None:
    """Raise ValueError unless `linkage` is one of LINKAGES."""
    if linkage not in LINKAGES:
        raise ValueError(
            f"unknown linkage {linkage!r}; valid linkages: {', '.join(LINKAGES)}"
        )


def cosine_distances(emb_NKD: np.ndarray, chunk: int = 16) -> np.ndarray:
    """Batched cosine distances ``1 - cos``: [N, k, D] -> float64 [N, k, k].

    Computed in float64 from the Gram matrices (batched matmul, `chunk`
    neurons at a time to stay in cache).  Zero-norm rows count as the zero
    vector (distance 1 to every other row, 0 to itself).  The result is
    clipped to [0, 2], symmetric, with an exact-zero diagonal.
    """
    emb_NKD = np.asarray(emb_NKD)
    N, k, _ = emb_NKD.shape
    gram_NKK = np.empty((N, k, k), dtype=np.float64)
    for a in range(0, N, chunk):
        x_CKD = np.asarray(emb_NKD[a : a + chunk], dtype=np.float64)
        np.matmul(x_CKD, np.swapaxes(x_CKD, -1, -2), out=gram_NKK[a : a + chunk])
    diag_NK = np.arange(k)
    norm_NK = np.sqrt(gram_NKK[:, diag_NK, diag_NK])
    norm_NK[norm_NK == 0] = 1.0
    cos_NKK = gram_NKK / (norm_NK[:, :, None] * norm_NK[:, None, :])
    dist_NKK = 1.0 - 0.5 * (cos_NKK + np.swapaxes(cos_NKK, -1, -2))
    np.clip(dist_NKK, 0.0, 2.0, out=dist_NKK)
    dist_NKK[:, diag_NK, diag_NK] = 0.0
    return dist_NKK


@lru_cache(maxsize=None)
def _pair_index(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row/column indices [P] of the n*(n-1)/2 unordered pairs, condensed order."""
    i_P, j_P = np.triu_indices(n, 1)
    i_P.flags.writeable = False
    j_P.flags.writeable = False
    return i_P, j_P


def renumber_by_size(raw_N: np.ndarray) -> np.ndarray:
    """Relabel fcluster ids 1..c as 0..c-1: 0 = largest, ties by smallest member.

    raw_N: int [n], every id in 1..c used (fcluster's output); returns int32 [n].
    """
    n, c = len(raw_N), int(raw_N.max())
    count_C = np.bincount(raw_N, minlength=c + 1)[1:]
    first_C1 = np.empty(c + 1, dtype=np.intp)
    first_C1[raw_N[::-1]] = np.arange(n - 1, -1, -1)  # last write = smallest index
    order_C = np.lexsort((first_C1[1:], -count_C))
    rank_C = np.empty(c, dtype=np.int32)
    rank_C[order_C] = np.arange(c, dtype=np.int32)
    return rank_C[raw_N - 1]


def flat_clusters(Z_M4: np.ndarray, threshold: float) -> np.ndarray:
    """``fcluster(Z, t=threshold, criterion="distance")`` -> int32 [n] ids 1..c.

    Uses SciPy's own routine behind fcluster, skipping the linkage-matrix
    validation that costs more than the clustering itself; falls back to the
    public fcluster if that private routine is unavailable.
    """
    Z_M4 = np.ascontiguousarray(Z_M4, dtype=np.float64)
    n = len(Z_M4) + 1
    if _cluster_dist is None:
        return hierarchy.fcluster(Z_M4, t=threshold, criterion="distance")
    T_N = np.empty(n, dtype=np.int32)
    _cluster_dist(Z_M4, T_N, float(threshold), n)
    return T_N


def _mean_or_nan(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else float("nan")


def cluster_one(cond_P: np.ndarray, n: int, linkage: str, threshold: float) -> OneCluster:
    """Cluster n examples from their float64 condensed distances [n*(n-1)/2]."""
    check_linkage(linkage)
    nan = float("nan")
    if n < 2:
        labels_N = np.zeros(n, dtype=np.int32)
        return OneCluster(labels_N, np.empty((0, 4)), n, nan, nan, nan, nan)
    Z_M4 = hierarchy.linkage(cond_P, method=linkage)
    labels_N = renumber_by_size(flat_clusters(Z_M4, threshold))
    i_P, j_P = _pair_index(n)
    same_P = labels_N[i_P] == labels_N[j_P]
    return OneCluster(
        labels_N=labels_N,
        linkage_M4=Z_M4,
        n_clusters=int(labels_N.max()) + 1,
        max_distance=float(cond_P.max()),
        mean_distance=float(cond_P.mean()),
        mean_intra=_mean_or_nan(cond_P[same_P]),
        mean_inter=_mean_or_nan(cond_P[~same_P]),
    )


def condensed(dist_KK: np.ndarray, idx_N: np.ndarray) -> np.ndarray:
    """Condensed distances [n*(n-1)/2] among the rows `idx_N` of dist_KK [k, k]."""
    i_P, j_P = _pair_index(len(idx_N))
    return dist_KK.ravel()[idx_N[i_P] * dist_KK.shape[1] + idx_N[j_P]]


def _check_shapes(emb_SKD: np.ndarray, act_SK: np.ndarray) -> None:
    if emb_SKD.ndim != 3 or act_SK.ndim != 2 or emb_SKD.shape[:2] != act_SK.shape:
        raise ValueError(
            f"expected emb [S, k, D] and act [S, k]; got {emb_SKD.shape} and {act_SK.shape}"
        )


def _empty_result(S: int, k: int) -> ClusterResult:
    nan_S = np.full(S, np.nan, dtype=np.float32)
    return ClusterResult(
        labels=np.full((S, k), -1, dtype=np.int32),
        linkage=np.full((S, max(k - 1, 0), 4), np.nan, dtype=np.float32),
        n_examples=np.zeros(S, dtype=np.int32),
        n_clusters=np.zeros(S, dtype=np.int32),
        max_distance=nan_S.copy(),
        mean_distance=nan_S.copy(),
        mean_intra=nan_S.copy(),
        mean_inter=nan_S.copy(),
    )


def _store(res: ClusterResult, s: int, idx_N: np.ndarray, one: OneCluster) -> None:
    """Write neuron s's clustering of slots `idx_N` into `res`."""
    res.labels[s, idx_N] = one.labels_N
    res.linkage[s, : len(one.linkage_M4)] = one.linkage_M4
    res.n_examples[s] = len(idx_N)
    res.n_clusters[s] = one.n_clusters
    res.max_distance[s] = one.max_distance
    res.mean_distance[s] = one.mean_distance
    res.mean_intra[s] = one.mean_intra
    res.mean_inter[s] = one.mean_inter


def cluster_shard(
    emb_SKD: np.ndarray,
    act_SK: np.ndarray,
    linkage: str = "average",
    threshold: float = 0.5,
    dist_SKK: np.ndarray | None = None,
    compiled: bool = True,
) -> ClusterResult:
    """Cluster the examples of each of S neurons; see the module docstring.

    emb_SKD: float16/float32 [S, k, D] example embeddings (zero where no example).
    act_SK: float32 [S, k] activations, descending, NaN padding at the end.
    Examples with a finite activation > 0 are clustered, in slot order.
    dist_SKK: their cosine distances when already computed (`cosine_distances`).
    `compiled`: every neuron in one call of core.cluster_kernels (the same results, bit for bit),
    else neuron by neuron through SciPy (`cluster_one`).
    Raises ValueError for an unknown linkage, a non-finite threshold,
    mismatched shapes, or (from SciPy) non-finite clustered embeddings.
    """
    check_linkage(linkage)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    emb_SKD, act_SK = np.asarray(emb_SKD), np.asarray(act_SK)
    _check_shapes(emb_SKD, act_SK)
    S, k = act_SK.shape
    res = _empty_result(S, k)
    with np.errstate(invalid="ignore"):
        mask_SK = np.isfinite(act_SK) & (act_SK > 0)
    if dist_SKK is None:
        dist_SKK = cosine_distances(emb_SKD)
    if compiled:
        from neuron_embeddings.core.cluster_kernels import METHOD_CODES, cluster_neurons

        bad = cluster_neurons(np.ascontiguousarray(dist_SKK, dtype=np.float64), mask_SK, METHOD_CODES[linkage],
                              float(threshold), res.labels, res.linkage, res.n_examples, res.n_clusters,
                              res.max_distance, res.mean_distance, res.mean_intra, res.mean_inter)
        if bad >= 0:
            raise ValueError(f"neuron {bad}: the condensed distance matrix must contain only finite values")
        return res
    for s in range(S):
        idx_N = np.flatnonzero(mask_SK[s])
        cond_P = condensed(dist_SKK[s], idx_N)
        _store(res, s, idx_N, cluster_one(cond_P, len(idx_N), linkage, threshold))
    return res


@dataclass
class SpectrumResult:
    """One clustering of each neuron's examples from several sources (the top-k, then strata)."""

    labels: np.ndarray  # int32 [S, N]; 0 = largest cluster, -1 = not clustered
    counts: np.ndarray  # int32 [S, N, n_sources] examples of each cluster from each source
    n_clusters: np.ndarray  # int32 [S, n_sources] clusters with an example from the source
    mean_distance: np.ndarray  # float32 [S, n_sources] mean distance over pairs of the source's examples
    below_only: np.ndarray  # int32 [S] clusters without a top-k (source 0) example


def cluster_spectrum(emb_SND: np.ndarray, act_SN: np.ndarray, source_SN: np.ndarray, n_sources: int,
                     linkage: str = "average", threshold: float = 0.5) -> SpectrumResult:
    """Cluster every neuron's examples from all sources together (`cluster_shard`: same rule,
    linkage and threshold), then count each cluster's examples by source (`source_SN` in
    0..n_sources-1), and per source the clusters present and the mean pairwise distance."""
    emb_SND, act_SN, source_SN = np.asarray(emb_SND), np.asarray(act_SN), np.asarray(source_SN)
    S, N = act_SN.shape
    dist_SNN = cosine_distances(emb_SND)
    res = cluster_shard(emb_SND, act_SN, linkage, threshold, dist_SNN)
    counts = np.zeros((S, N, n_sources), dtype=np.int32)
    s_i, n_i = np.nonzero(res.labels >= 0)
    np.add.at(counts, (s_i, res.labels[s_i, n_i], source_SN[s_i, n_i]), 1)
    mean_distance = np.full((S, n_sources), np.nan, dtype=np.float32)
    for s in range(S):
        for src in range(n_sources):
            idx_N = np.flatnonzero((res.labels[s] >= 0) & (source_SN[s] == src))
            if len(idx_N) > 1:
                mean_distance[s, src] = condensed(dist_SNN[s], idx_N).mean()
    present = counts > 0
    below_only = (present.any(axis=2) & ~present[:, :, 0]).sum(axis=1).astype(np.int32)
    return SpectrumResult(res.labels, counts, present.sum(axis=1).astype(np.int32), mean_distance, below_only)
