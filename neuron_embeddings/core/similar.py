"""Similar clusters: for every cluster, the nearest clusters of *other* neurons.

A cluster's centroid is the mean of the L2-normalised embeddings of its examples; two clusters are
as similar as the cosine between their centroids. Two stages over the neuron shards:

- `centroids` (per shard): each cluster's centroid and its top token (the token its examples most
  often peak on; the explorer labels links and searches tokens with it);
- `similar` (per shard, after every centroid shard): the `N_SIMILAR` clusters of other neurons with
  the largest centroid cosine to each cluster of the shard. Up to `EXACT_MAX` clusters in the store
  the search is exact (`nearest_clusters`: a blockwise matrix product against all clusters, memory
  bounded by the block sizes); beyond, approximate (`HnswIndex`: a FAISS HNSW graph, built once per
  process; the cosines it returns are exact). Both break ties by the lower cluster id. Up to
  EXACT_MAX the graph is not cheaper at recall@5 >= 0.95: centroids have little neighbour structure
  (the nearest is barely nearer than the rest), so a graph search must visit a large share of them.

Clusters of a single example (MIN_CLUSTER_SIZE) are left out on both sides: an outlier example is
not a behaviour worth linking, and they are ~40 % of all clusters (the demo store), so leaving them
out cuts the quadratic cost about 3x.

Clusters are identified by (row, neuron, cluster): store row, neuron index, cluster label.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from neuron_embeddings.core.errors import UserError


def cluster_centroids(emb_SKD: np.ndarray, labels_SK: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Centroids [S, K, D] in `dtype`: slot c of neuron s = mean of the L2-normalised embeddings of
    the examples labelled c (zero-norm embeddings count as zero vectors); zero where no cluster c.
    Sums in float32 by one scatter-add over the labelled examples (no [S, K, K] one-hot product)."""
    S, K, D = emb_SKD.shape
    lab_N = torch.from_numpy(np.asarray(labels_SK, dtype=np.int64)).reshape(-1)
    ok_N = torch.nonzero(lab_N >= 0).squeeze(1)
    e_ND = torch.from_numpy(np.ascontiguousarray(emb_SKD)).reshape(S * K, D).index_select(0, ok_N).float()
    e_ND /= e_ND.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    g_N = torch.div(ok_N, K, rounding_mode="floor") * K + lab_N[ok_N]  # the cluster's row in [S * K]
    sum_CD = torch.zeros((S * K, D)).index_add_(0, g_N, e_ND)
    count_C = torch.bincount(g_N, minlength=S * K).clamp_min(1).to(torch.float32)
    sum_CD /= count_C[:, None]
    return sum_CD.reshape(S, K, D).to(getattr(torch, np.dtype(dtype).name)).numpy()


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


MIN_CLUSTER_SIZE = 2  # clusters of one example get no similar clusters and are nobody's neighbour
RESCORE_EXTRA = 27  # candidates beyond n re-scored in float32 when the search runs in bfloat16


@dataclass
class ClusterSet:
    """Centroids of a set of clusters (as stored, not normalised), with who they are."""

    c_ND: torch.Tensor  # [N, D], the store's dtype
    inv_N: torch.Tensor  # float32 [N]: 1 / norm (0 for a zero centroid)
    owner_N: torch.Tensor  # int64 [N]: the neuron, as row * d_mlp + neuron
    id_N: torch.Tensor  # int64 [N]: the cluster, as (row * d_mlp + neuron) * K + label
    search_ND: torch.Tensor | None = None  # unit-norm copy in the search dtype (`searchable`)

    def __len__(self) -> int:
        return self.c_ND.shape[0]

    def unit(self, sl: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """float32 unit-norm centroids of rows `sl` (a slice or an index tensor of any shape)."""
        return self.c_ND[sl].float() * self.inv_N[sl].unsqueeze(-1)

    def search(self, sl: slice, dtype: torch.dtype) -> torch.Tensor:
        if self.search_ND is not None and self.search_ND.dtype == dtype:
            return self.search_ND[sl]
        return self.unit(sl).to(dtype)

    def searchable(self, dtype: torch.dtype, block: int = 65536) -> "ClusterSet":
        """With a unit-norm copy in `dtype`, made once for every search that follows."""
        out = torch.empty(self.c_ND.shape, dtype=dtype, device=self.c_ND.device)
        for a in range(0, len(self), block):
            out[a:a + block] = self.unit(slice(a, a + block)).to(dtype)
        return ClusterSet(self.c_ND, self.inv_N, self.owner_N, self.id_N, out)

    def rows(self, sl: slice) -> "ClusterSet":
        return ClusterSet(self.c_ND[sl], self.inv_N[sl], self.owner_N[sl], self.id_N[sl],
                          None if self.search_ND is None else self.search_ND[sl])

    @staticmethod
    def concat(sets: list["ClusterSet"]) -> "ClusterSet":
        return ClusterSet(*(torch.cat([getattr(s, f) for s in sets]) for f in ("c_ND", "inv_N", "owner_N", "id_N")))

    @property
    def nbytes(self) -> int:
        ts = (self.c_ND, self.inv_N, self.owner_N, self.id_N) + (() if self.search_ND is None else (self.search_ND,))
        return sum(t.element_size() * t.numel() for t in ts)


def cluster_sizes(labels_SK: np.ndarray) -> np.ndarray:
    """int64 [S, K]: examples in cluster c of neuron s."""
    S, K = labels_SK.shape
    s_N, slot_N = np.nonzero(labels_SK >= 0)
    return np.bincount(s_N * K + labels_SK[s_N, slot_N], minlength=S * K).reshape(S, K)


def compact(cent_SKD: np.ndarray, size_SK: np.ndarray, row: int, start: int, d_mlp: int,
            min_size: int = MIN_CLUSTER_SIZE, device: str = "cpu") -> ClusterSet:
    """The clusters of a shard (neurons start.. of `row`) with at least `min_size` examples."""
    S, K, D = cent_SKD.shape
    s_N, c_N = np.nonzero(np.asarray(size_SK) >= min_size)
    c_ND = torch.from_numpy(np.ascontiguousarray(cent_SKD[s_N, c_N])).to(device)
    norm_N = c_ND.float().norm(dim=1)
    inv_N = torch.where(norm_N > 0, 1.0 / norm_N.clamp_min(1e-30), torch.zeros_like(norm_N))
    owner_N = torch.from_numpy(row * d_mlp + start + s_N.astype(np.int64)).to(device)
    return ClusterSet(c_ND, inv_N, owner_N, owner_N * K + torch.from_numpy(c_N.astype(np.int64)).to(device))


def _mask_same_owner(sim_QR: torch.Tensor, q_own: torch.Tensor, r_own: torch.Tensor) -> None:
    """Set -inf where query and reference belong to the same neuron. Owners ascend in both, so
    only the references whose owners fall in the queries' range are compared."""
    lo = int(torch.searchsorted(r_own, q_own[0]))
    hi = int(torch.searchsorted(r_own, q_own[-1], right=True))
    if hi > lo:
        sub = sim_QR[:, lo:hi]
        sub.masked_fill_(q_own[:, None] == r_own[None, lo:hi], -torch.inf)


_BITS = {torch.bfloat16: (torch.int16, 0x7FFF), torch.float32: (torch.int32, 0x7FFFFFFF)}  # the compiled selection's views


def _key_range(dtype: torch.dtype) -> tuple[int, int]:
    """The order keys (core.similar_kernels.order_key) of -inf and +inf in `dtype`."""
    int_dtype, magnitude = _BITS[dtype]
    lo, hi = torch.tensor([-torch.inf, torch.inf], dtype=dtype).view(int_dtype).tolist()
    return lo ^ ((lo >> 63) & magnitude), hi ^ ((hi >> 63) & magnitude)


def nearest_clusters(query: ClusterSet, refs: Iterable[ClusterSet], n: int, block: int = 8192,
                     q_block: int = 1024, search_dtype: torch.dtype = torch.float32,
                     extra: int = RESCORE_EXTRA, compiled: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query cluster, the `n` reference clusters of other neurons with the largest
    centroid cosine: (id int64 [Q, n], -1 where fewer; cosine float32 [Q, n], NaN there), best
    first. Owners (neurons) must ascend within the query and within each reference set.

    The references come block by block; a [q_block, block] similarity tile is the largest
    temporary, so memory does not grow with the store. With `search_dtype` bfloat16 (fast on
    CPUs with AVX512-BF16 and on GPUs) each reference set's n + `extra` best candidates are found
    in bfloat16, then re-scored in float32: the result differs from the float32 one only if
    rounding pushes one of the true n best below `extra` others. Each tile's candidates are picked
    by core.similar_kernels (`compiled`, default on the CPU; ties: the earlier reference) or
    `torch.topk`."""
    Q, dev = len(query), query.c_ND.device
    low = search_dtype != torch.float32
    m = n + extra if low else n
    if compiled is None:
        compiled = dev.type == "cpu" and search_dtype in _BITS
    if compiled:
        from neuron_embeddings.core.scan import over_units
        from neuron_embeddings.core.similar_kernels import merge_tile

        threads = torch.get_num_threads()  # the products' threads idle while the tile's rows merge
        int_dtype, magnitude = _BITS[search_dtype]
        floor, ceiling = _key_range(search_dtype)
    q_unit = query.unit()
    q_search = q_unit.to(search_dtype)
    best_cos = torch.full((Q, n), -torch.inf, device=dev)
    best_id = torch.full((Q, n), -1, dtype=torch.int64, device=dev)
    for ref in refs:
        R = len(ref)
        if Q == 0 or R == 0:
            continue
        mm = min(m, R)
        cand_at = torch.full((Q, mm), -1, dtype=torch.int64, device=dev)
        if compiled:  # the candidates' order keys (core.similar_kernels), else their values
            key_QM = np.full((Q, mm), floor, dtype=np.int64)
        else:
            cand_s = torch.full((Q, mm), -torch.inf, dtype=search_dtype, device=dev)
        for r0 in range(0, R, block):
            rs = slice(r0, r0 + block)
            r_search, r_own = ref.search(rs, search_dtype), ref.owner_N[rs]
            at_R = torch.arange(r0, r0 + r_search.shape[0], device=dev)
            for q0 in range(0, Q, q_block):
                q = slice(q0, q0 + q_block)
                sim = q_search[q] @ r_search.T  # [q, r] in the search dtype
                _mask_same_owner(sim, query.owner_N[q], r_own)
                if compiled:
                    over_units(threads, merge_tile, sim.shape[0], sim.view(int_dtype).numpy(), q0, r0, key_QM,
                               cand_at.numpy(), magnitude, ceiling)
                    continue
                # only rows with a value above their current m-th best can change (few, after the
                # first tiles): top-k of those rows of the tile, merged with their candidates
                rows = q0 + torch.nonzero(sim.amax(dim=1) > cand_s[q, -1]).squeeze(1)
                if rows.numel() == 0:
                    continue
                top, at = torch.topk(sim[rows - q0], min(mm, sim.shape[1]), dim=1)
                top, pick = torch.topk(torch.cat([cand_s[rows], top], dim=1), mm, dim=1)
                cand_s[rows] = top
                cand_at[rows] = torch.gather(torch.cat([cand_at[rows], at_R[at]], dim=1), 1, pick)
        ok = (cand_at >= 0) if compiled else torch.isfinite(cand_s.float()) & (cand_at >= 0)
        if low or compiled:  # re-score the candidates in float32, a few queries at a time
            exact = torch.empty((Q, mm), device=dev)
            for q0 in range(0, Q, 256):
                q = slice(q0, q0 + 256)
                exact[q] = torch.einsum("qd,qmd->qm", q_unit[q], ref.unit(cand_at[q].clamp_min(0)))
        else:
            exact = cand_s.float()
        exact = torch.where(ok, exact, torch.full_like(exact, -torch.inf))
        ids = torch.where(ok, ref.id_N[cand_at.clamp_min(0)], torch.full_like(cand_at, -1))
        top_cos, top_at = torch.topk(torch.cat([best_cos, exact], dim=1), n, dim=1)
        best_cos, best_id = top_cos, torch.gather(torch.cat([best_id, ids], dim=1), 1, top_at)
    return _best_first(best_id, best_cos)


def _best_first(id_QM: torch.Tensor, cos_QM: torch.Tensor, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The `n` best of each row (all by default), largest cosine first, ties by the lower cluster id;
    -1 / NaN where fewer (ids < 0 or cosines -inf / NaN are none)."""
    none = (id_QM < 0) | ~torch.isfinite(cos_QM)
    cos = torch.where(none, torch.full_like(cos_QM, -torch.inf), cos_QM)
    ids = torch.where(none, torch.full_like(id_QM, torch.iinfo(torch.int64).max), id_QM)
    by_id = torch.sort(ids, dim=1, stable=True).indices
    cos, ids = torch.gather(cos, 1, by_id), torch.gather(ids, 1, by_id)
    by_cos = torch.sort(cos, dim=1, descending=True, stable=True).indices[:, :n]
    cos, ids = torch.gather(cos, 1, by_cos), torch.gather(ids, 1, by_cos)
    none = torch.isinf(cos)
    return ids.masked_fill(none, -1), cos.masked_fill(none, torch.nan)


EXACT_MAX = 500_000  # clusters in the store up to which the search is exact; beyond, HNSW (docs/performance.md)
HNSW_M = 48  # graph links per node (FAISS IndexHNSWFlat)
HNSW_EF_CONSTRUCTION = 128  # candidate list while building the graph
HNSW_EF_SEARCH = 512  # candidate list while searching, at HNSW_EF_AT clusters (recall@5 0.957 on real centroids)
HNSW_EF_AT = 160_000  # ... and in proportion beyond: the list a given recall needs grew ~linearly with the clusters


def hnsw_ef_search(n_clusters: int) -> int:
    """efSearch for a graph of `n_clusters`: HNSW_EF_SEARCH, grown in proportion beyond HNSW_EF_AT
    clusters (on real centroids the list for recall@5 0.95 grew from 256 at 40k to 1024 at 160k)."""
    return max(HNSW_EF_SEARCH, -(-HNSW_EF_SEARCH * n_clusters // HNSW_EF_AT))


def exact_search(n_clusters: int, device: str, exact_max: int | None = None) -> bool:
    """Whether a store of `n_clusters` (of >= MIN_CLUSTER_SIZE examples) is searched exactly: up to
    `exact_max` (default EXACT_MAX) on a CPU, always on a GPU (the matrix product is fast there;
    FAISS runs on the CPU)."""
    return n_clusters <= (EXACT_MAX if exact_max is None else exact_max) or not device.startswith("cpu")


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise UserError("similar clusters of a large store need FAISS for the approximate search: "
                        "pip install faiss-cpu (or run with --no-similar)") from e
    return faiss


_FAISS_THREADS = threading.Lock()


@contextlib.contextmanager
def _faiss_threads(faiss, n: int):
    """FAISS on `n` threads meanwhile (its setting is per process: one user at a time)."""
    _FAISS_THREADS.acquire()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
        _FAISS_THREADS.release()


class HnswIndex:
    """Approximate nearest clusters: a FAISS HNSW graph over the unit centroids of `refs` (inner
    product = cosine). Built on one thread, so the graph, and every search of it, is the same for
    the same clusters (FAISS draws node levels from its own generator, seeded 12345; a threaded
    build inserts in a timing-dependent order). `search` breaks ties as `nearest_clusters` does."""

    def __init__(self, refs: ClusterSet, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
                 block: int = 65536):
        faiss = _faiss()
        self.refs = refs.rows(slice(None))
        self.refs.search_ND = None  # the graph holds its own float32 copy
        self.index = faiss.IndexHNSWFlat(refs.c_ND.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        try:
            with _faiss_threads(faiss, 1):
                for a in range(0, len(refs), block):
                    self.index.add(np.ascontiguousarray(refs.unit(slice(a, a + block)).cpu().numpy()))
        except (RuntimeError, MemoryError) as e:  # FAISS reports its failures (allocation too) as RuntimeError
            raise UserError(f"similar clusters: building the HNSW graph of {len(refs):,} clusters failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}); free memory "
                            f"(about {len(refs) * (4 * refs.c_ND.shape[1] + 10 * m) / 1e9:.1f} GB needed) "
                            "or run with --no-similar") from e
        own = refs.owner_N.cpu()  # ascending: a neuron's clusters are one run
        self.max_own = int(torch.unique_consecutive(own, return_counts=True)[1].max()) if len(own) else 0

    def search(self, query: ClusterSet, n: int, ef_search: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As `nearest_clusters(query, [refs], n)`, approximately: the graph's n + (the most clusters
        of one neuron) best candidates, those of the query's own neuron dropped (`ef_search`: by
        default `hnsw_ef_search` of the graph's size). Their cosines are
        exact (float32 products of the unit centroids); only which candidates are found is approximate."""
        Q, R = len(query), len(self.refs)
        if Q == 0 or R == 0:
            return _best_first(torch.full((Q, n), -1), torch.full((Q, n), torch.nan))
        m = min(n + self.max_own, R)
        ef = hnsw_ef_search(R) if ef_search is None else ef_search
        params = _faiss().SearchParametersHNSW(efSearch=max(ef, m))  # per call: threads may share the graph
        x_QD = np.ascontiguousarray(query.unit().cpu().numpy())
        cos_QM, at_QM = (torch.from_numpy(a) for a in self.index.search(x_QD, m, params=params))
        own, ids = self.refs.owner_N.cpu(), self.refs.id_N.cpu()
        ok = (at_QM >= 0) & (own[at_QM.clamp_min(0)] != query.owner_N.cpu()[:, None])
        ids = torch.where(ok, ids[at_QM.clamp_min(0)], torch.full_like(at_QM, -1))
        id_QN, cos_QN = _best_first(ids, torch.where(ok, cos_QM, torch.full_like(cos_QM, -torch.inf)), n)
        return id_QN.to(query.c_ND.device), cos_QN.to(query.c_ND.device)

    @property
    def nbytes(self) -> int:
        """Approximate memory: the graph's float32 vectors and links, and the centroids."""
        n, d = self.index.ntotal, self.index.d
        return n * (4 * d + 4 * self.index.hnsw.nb_neighbors(0) * 5 // 4) + self.refs.nbytes


_DTYPE_CHOICE: dict[str, torch.dtype] = {}


def search_dtype(device: str) -> torch.dtype:
    """bfloat16 where a quick trial shows its matrix products at least 1.5x as fast as float32's
    (CPUs with AVX512-BF16 or AMX), else float32. Measured once per process and device."""
    if device not in _DTYPE_CHOICE:
        import time

        a, b = torch.randn(1024, 768, device=device), torch.randn(4096, 768, device=device)
        best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
        for _ in range(4):  # interleaved, best of 4: robust to other work on the machine
            for dt in best:
                x, y = a.to(dt), b.to(dt)
                t0 = time.perf_counter()
                (x @ y.T).amax().item()
                best[dt] = min(best[dt], time.perf_counter() - t0)
        _DTYPE_CHOICE[device] = torch.bfloat16 if best[torch.bfloat16] * 1.5 < best[torch.float32] else torch.float32
    return _DTYPE_CHOICE[device]


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


def peak_token_ids(seq_SK: np.ndarray, pos_SK: np.ndarray, rows_R: np.ndarray, tokens_RT: np.ndarray | None) -> np.ndarray:
    """int32 [S, K] token id at each example's max token (-1 where no example), given the token
    rows `tokens_RT` of the sorted, unique sequence indices `rows_R` the examples point into."""
    ok = seq_SK >= 0
    out = np.full(seq_SK.shape, -1, dtype=np.int32)
    if ok.any():
        out[ok] = tokens_RT[np.searchsorted(rows_R, seq_SK[ok]), pos_SK[ok]]
    return out
