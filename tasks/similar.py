"""Similar clusters: for every cluster, the nearest clusters of *other* neurons.

A cluster's centroid is the mean of the L2-normalised embeddings of its examples; two clusters are
as similar as the cosine between their centroids. Two stages over the neuron shards:

- `centroids` (per shard): each cluster's centroid and its top token (the token its examples most
  often peak on; the explorer labels links and searches tokens with it);
- `similar` (per shard, after every centroid shard): the `N_SIMILAR` clusters of other neurons with
  the largest centroid cosine to each cluster of the shard, by a blockwise matrix product against
  every shard's centroids in turn (memory bounded by the block sizes, whatever the store's size).

Clusters are identified by (row, neuron, cluster): store row, neuron index, cluster label.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

# --- pure functions ---------------------------------------------------------------------------


def cluster_centroids(emb_SKD: np.ndarray, labels_SK: np.ndarray) -> np.ndarray:
    """Centroids float32 [S, K, D]: slot c of neuron s = mean of the L2-normalised embeddings of
    the examples labelled c (zero-norm embeddings count as zero vectors); zero where no cluster c."""
    S, K, D = emb_SKD.shape
    e_SKD = torch.from_numpy(np.asarray(emb_SKD, dtype=np.float32))
    e_SKD = e_SKD / e_SKD.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    lab_SK = torch.from_numpy(np.asarray(labels_SK, dtype=np.int64))
    onehot_SCK = (lab_SK[:, None, :] == torch.arange(K)[None, :, None]).float()  # [S, C=K, K]
    count_SC = onehot_SCK.sum(-1, keepdim=True).clamp_min(1.0)
    return (torch.bmm(onehot_SCK, e_SKD) / count_SC).numpy()


def cluster_top_tokens(labels_SK: np.ndarray, peak_SK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each cluster slot (s, c): the token its examples most often peak on and how many do
    (ties: the token of the earliest, i.e. most activating, example). Returns int32 [S, K] token
    (-1 where no cluster c) and int32 [S, K] count."""
    S, K = labels_SK.shape
    top_SC = np.full((S, K), -1, dtype=np.int32)
    cnt_SC = np.zeros((S, K), dtype=np.int32)
    s_N, slot_N = np.nonzero(labels_SK >= 0)
    if s_N.size == 0:
        return top_SC, cnt_SC
    g_N = s_N * K + labels_SK[s_N, slot_N]  # the cluster, as one key
    t_N = peak_SK[s_N, slot_N].astype(np.int64)
    order = np.lexsort((slot_N, t_N, g_N))
    g_N, t_N, slot_N = g_N[order], t_N[order], slot_N[order]
    start = np.flatnonzero(np.r_[True, (g_N[1:] != g_N[:-1]) | (t_N[1:] != t_N[:-1])])  # runs of (g, t)
    count_R = np.diff(np.r_[start, g_N.size])
    g_R, t_R, first_R = g_N[start], t_N[start], slot_N[start]
    best = np.lexsort((first_R, -count_R, g_R))  # per g: largest count, then earliest example
    head = best[np.r_[True, g_R[best][1:] != g_R[best][:-1]]]
    top_SC.flat[g_R[head]] = t_R[head]
    cnt_SC.flat[g_R[head]] = count_R[head]
    return top_SC, cnt_SC


@dataclass
class ClusterSet:
    """Unit-norm centroids of a set of clusters, with who they are."""

    c_ND: torch.Tensor  # float32 [N, D], unit norm
    owner_N: torch.Tensor  # int64 [N]: the neuron, as row * d_mlp + neuron
    id_N: torch.Tensor  # int64 [N]: the cluster, as (row * d_mlp + neuron) * K + label


def compact(cent_SKD: np.ndarray, n_clusters_S: np.ndarray, row: int, start: int, d_mlp: int,
            device: str = "cpu") -> ClusterSet:
    """The clusters c < n_clusters[s] of a shard (neurons start.. of `row`), normalised."""
    S, K, D = cent_SKD.shape
    s_N, c_N = np.nonzero(np.arange(K)[None, :] < np.asarray(n_clusters_S)[:, None])
    c_ND = torch.from_numpy(np.asarray(cent_SKD[s_N, c_N], dtype=np.float32)).to(device)
    c_ND = c_ND / c_ND.norm(dim=1, keepdim=True).clamp_min(1e-30)
    owner_N = torch.from_numpy(row * d_mlp + start + s_N.astype(np.int64)).to(device)
    return ClusterSet(c_ND, owner_N, owner_N * K + torch.from_numpy(c_N.astype(np.int64)).to(device))


def nearest_clusters(query: ClusterSet, refs: Iterable[ClusterSet], n: int,
                     block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query cluster, the `n` reference clusters of other neurons with the largest
    centroid cosine: (id int64 [Q, n], -1 where fewer; cosine float32 [Q, n], NaN there), best
    first. The references come block by block; a [block, block] similarity tile is the largest
    temporary, so memory does not grow with the store."""
    Q, dev = query.c_ND.shape[0], query.c_ND.device
    best_cos = torch.full((Q, n), -torch.inf, device=dev)
    best_id = torch.full((Q, n), -1, dtype=torch.int64, device=dev)
    for ref in refs:
        for r0 in range(0, ref.c_ND.shape[0], block):
            r_RD, r_own, r_id = (t[r0:r0 + block] for t in (ref.c_ND, ref.owner_N, ref.id_N))
            for q0 in range(0, Q, block):
                q = slice(q0, q0 + block)
                sim_QR = query.c_ND[q] @ r_RD.T
                sim_QR.masked_fill_(query.owner_N[q, None] == r_own[None, :], -torch.inf)
                cos = torch.cat([best_cos[q], sim_QR], dim=1)
                ids = torch.cat([best_id[q], r_id.expand(sim_QR.shape[0], -1)], dim=1)
                top_cos, top_at = torch.topk(cos, n, dim=1)  # sorted, best first
                best_cos[q], best_id[q] = top_cos, torch.gather(ids, 1, top_at)
    missing = torch.isinf(best_cos)
    best_id[missing] = -1
    best_cos[missing] = torch.nan
    return best_id, best_cos


def scatter_neighbours(query: ClusterSet, id_QN: torch.Tensor, cos_QN: torch.Tensor, S: int, K: int,
                       d_mlp: int, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-slot arrays for a shard of S neurons: int32 [S, K, n, 3] (row, neuron, cluster) of each
    neighbour (-1 where none) and float32 [S, K, n] cosine (NaN where none)."""
    n = id_QN.shape[1]
    nb_SKN3 = np.full((S, K, n, 3), -1, dtype=np.int32)
    cos_SKN = np.full((S, K, n), np.nan, dtype=np.float32)
    own = query.owner_N.cpu().numpy()
    s_Q, c_Q = own % d_mlp - start, query.id_N.cpu().numpy() % K
    ids = id_QN.cpu().numpy()
    ok = ids >= 0
    trip = np.stack([ids // K // d_mlp, ids // K % d_mlp, ids % K], axis=-1)
    nb_SKN3[s_Q, c_Q] = np.where(ok[..., None], trip, -1)
    cos_SKN[s_Q, c_Q] = cos_QN.cpu().numpy()
    return nb_SKN3, cos_SKN


# --- Prefect tasks ----------------------------------------------------------------------------


def centroid_shard(out: str, shard: dict, fault_unit: str | None = None) -> dict:
    """A shard's cluster centroids and top tokens (whole chunks of similar/centroids, similar/top_token)."""
    from storage import store as st
    from tasks.common import run_unit

    def work(store: st.Store) -> dict:
        if not store.is_complete("cluster", shard["id"]):
            raise RuntimeError(f"centroids shard {shard['id']}: its cluster shard is not complete")
        region = (shard["row"], slice(shard["start"], shard["stop"]))
        labels = st.read(store, "clusters/labels", region)
        cent = cluster_centroids(st.read(store, "embeddings", region), labels)
        top, cnt = cluster_top_tokens(labels, peak_tokens(store, region))
        st.write(store, "similar/centroids", region, cent.astype(store.array("similar/centroids").dtype))
        st.write(store, "similar/top_token", region, top)
        st.write(store, "similar/top_count", region, cnt)
        return {"neurons": shard["stop"] - shard["start"], "clusters": int((top >= 0).sum())}

    return run_unit(out, "centroids", shard["id"], work, fault_unit)


def peak_tokens(store, region: tuple) -> np.ndarray:
    """int32 [S, K] token id at each example's max token (-1 where no example)."""
    from storage import store as st

    seq, pos = st.read(store, "topk/seq", region), st.read(store, "topk/pos", region)
    ok = seq >= 0
    out = np.full(seq.shape, -1, dtype=np.int32)
    if ok.any():
        rows = np.unique(seq[ok])
        tok = store.array("tokens").get_orthogonal_selection((rows, slice(None)))
        out[ok] = tok[np.searchsorted(rows, seq[ok]), pos[ok]]
    return out


def _shard_clusters(store, sh, n_clusters_LM: np.ndarray, d_mlp: int, device: str) -> ClusterSet:
    from storage import store as st

    cent = st.read(store, "similar/centroids", (sh.row, slice(sh.start, sh.stop)))
    return compact(cent, n_clusters_LM[sh.row, sh.start:sh.stop], sh.row, sh.start, d_mlp, device)


def similar_shard(out: str, shard: dict, device: str = "cpu", fault_unit: str | None = None) -> dict:
    """The nearest clusters of other neurons for every cluster of a shard, against every shard's
    centroids (which must all be complete)."""
    from storage import store as st
    from tasks.common import run_unit

    def work(store: st.Store) -> dict:
        s, d_mlp = store.settings(), int(store.attrs["d_mlp"])
        shards = st.neuron_shards(s, d_mlp)
        missing = [sh.id for sh in shards if not store.is_complete("centroids", sh.id)]
        if missing:
            raise RuntimeError(f"similar shard {shard['id']}: centroid shards not complete: {missing[:3]}")
        dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        n_clusters = st.read(store, "metrics/n_clusters")
        me = next(sh for sh in shards if sh.id == shard["id"])
        query = _shard_clusters(store, me, n_clusters, d_mlp, dev)
        refs: Iterator[ClusterSet] = (_shard_clusters(store, sh, n_clusters, d_mlp, dev) for sh in shards)
        n = store.array("similar/cosine").shape[-1]
        with torch.inference_mode():
            ids, cos = nearest_clusters(query, refs, n)
        nb, cs = scatter_neighbours(query, ids, cos, me.stop - me.start, s.k, d_mlp, me.start)
        region = (me.row, slice(me.start, me.stop))
        st.write(store, "similar/neighbours", region, nb)
        st.write(store, "similar/cosine", region, cs)
        return {"clusters": int(query.id_N.numel())}

    return run_unit(out, "similar", shard["id"], work, fault_unit)


def _make_tasks():
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return (task(name="centroids-shard", task_run_name="centroids-{shard[id]}", cache_policy=NO_CACHE)(centroid_shard),
            task(name="similar-shard", task_run_name="similar-{shard[id]}", cache_policy=NO_CACHE)(similar_shard))


centroid_shard_task, similar_shard_task = _make_tasks()
