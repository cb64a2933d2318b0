"""Every neuron of a shard clustered in one compiled call (numba), with the same results as the
per-neuron SciPy path in core.cluster, bit for bit (tested against it): SciPy's `linkage` (the
nearest-neighbour chain for average, complete and weighted linkage; the minimum spanning tree for
single linkage; then the merges sorted stably by height and relabelled by union-find), the cut at
a distance (`fcluster(criterion="distance")`: the maximal subtrees whose highest merge is at most the
threshold), the relabelling by size and the metrics (means as NumPy's pairwise summation adds).

A neuron's clustering is a few hundred microseconds of SciPy and NumPy calls on 50 points; here the
whole shard is one call. Imported on first use (importing numba takes ~0.5 s).
"""
from __future__ import annotations

import numpy as np
from numba import njit

METHOD_CODES = {"single": 0, "complete": 1, "average": 2, "weighted": 3}


@njit(cache=True, nogil=True)
def _cond(n, i, j):
    """Index of the pair (i, j), i != j, in a condensed distance matrix of n points."""
    if i > j:
        i, j = j, i
    return n * i - (i * (i + 1)) // 2 + (j - i - 1)


@njit(cache=True, nogil=True)
def _merged_distance(method, d_xi, d_yi, nx, ny):
    """Distance from cluster i to the union of clusters x and y (sizes nx, ny)."""
    if method == 1:
        return max(d_xi, d_yi)
    if method == 2:
        return (nx * d_xi + ny * d_yi) / (nx + ny)
    return 0.5 * (d_xi + d_yi)


@njit(cache=True, nogil=True)
def _nn_chain(D_P, n, method, Z_M4, size_N, chain_N):
    """Merges of the nearest-neighbour chain (unsorted, leaf-indexed); D_P is overwritten."""
    size_N[:n] = 1
    length = 0
    y = -1
    for k in range(n - 1):
        if length == 0:
            for i in range(n):
                if size_N[i] > 0:
                    chain_N[0] = i
                    break
            length = 1
        while True:
            x = chain_N[length - 1]
            if length > 1:  # the chain's previous element wins ties: no cycles
                y = chain_N[length - 2]
                best = D_P[_cond(n, x, y)]
            else:
                best = np.inf
            for i in range(n):
                if size_N[i] == 0 or i == x:
                    continue
                d = D_P[_cond(n, x, i)]
                if d < best:
                    best = d
                    y = i
            if length > 1 and y == chain_N[length - 2]:
                break
            chain_N[length] = y
            length += 1
        length -= 2
        if x > y:
            x, y = y, x
        nx, ny = size_N[x], size_N[y]
        Z_M4[k, 0], Z_M4[k, 1], Z_M4[k, 2], Z_M4[k, 3] = x, y, best, nx + ny
        size_N[x] = 0
        size_N[y] = nx + ny
        for i in range(n):
            if size_N[i] == 0 or i == y:
                continue
            D_P[_cond(n, i, y)] = _merged_distance(method, D_P[_cond(n, i, x)], D_P[_cond(n, i, y)], nx, ny)


@njit(cache=True, nogil=True)
def _spanning_tree(D_P, n, Z_M4, merged_N, near_N):
    """Single linkage's merges (unsorted): Prim's tree grown from point 0, each edge's far end next."""
    merged_N[:n] = 0
    near_N[:n] = np.inf
    x = 0
    y = 0
    for k in range(n - 1):
        best = np.inf
        merged_N[x] = 1
        for i in range(n):
            if merged_N[i] == 1:
                continue
            d = D_P[_cond(n, x, i)]
            if near_N[i] > d:
                near_N[i] = d
            if near_N[i] < best:
                y = i
                best = near_N[i]
        Z_M4[k, 0], Z_M4[k, 1], Z_M4[k, 2] = x, y, best
        x = y


@njit(cache=True, nogil=True)
def _root(parent, x):
    """Union-find root of x, with path compression."""
    r = x
    while parent[r] != r:
        r = parent[r]
    while parent[x] != r:
        nxt = parent[x]
        parent[x] = r
        x = nxt
    return r


@njit(cache=True, nogil=True)
def _relabel(Z_M4, n, parent, count):
    """Merges (sorted by height) renamed to clusters' ids: node n + i is the i-th merge, children
    ordered (smaller id first), sizes in the last column."""
    for i in range(2 * n - 1):
        parent[i] = i
        count[i] = 1
    for i in range(n - 1):
        xr, yr = _root(parent, int(Z_M4[i, 0])), _root(parent, int(Z_M4[i, 1]))
        Z_M4[i, 0], Z_M4[i, 1] = min(xr, yr), max(xr, yr)
        parent[xr] = n + i
        parent[yr] = n + i
        count[n + i] = count[xr] + count[yr]
        Z_M4[i, 3] = count[n + i]


@njit(cache=True, nogil=True)
def _block_sum(a, lo, n):
    """sum(a[lo:lo + n]), n <= 128, as NumPy adds a block: eight running sums, then the rest."""
    if n < 8:
        s = 0.0
        for i in range(lo, lo + n):
            s += a[i]
        return s
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        s += a[lo + i]
        i += 1
    return s


@njit(cache=True, nogil=True)
def _pairwise_sum(a, lo, n):
    """sum(a[lo:lo + n]) added as NumPy's pairwise summation adds a contiguous float64 array:
    halves (the first a multiple of 8) summed separately down to blocks of <= 128. An explicit
    stack, not recursion (numba's cache cannot reload recursive functions)."""
    if n <= 128:
        return _block_sum(a, lo, n)
    lo_F = np.empty(64, np.int64)
    n_F = np.empty(64, np.int64)
    step_F = np.zeros(64, np.int64)
    sums = np.empty(64)
    lo_F[0], n_F[0] = lo, n
    top, n_sums = 1, 0
    while top > 0:
        f = top - 1
        m = n_F[f]
        if m <= 128:
            sums[n_sums] = _block_sum(a, lo_F[f], m)
            n_sums += 1
            top -= 1
            continue
        half = m // 2
        half -= half % 8
        if step_F[f] < 2:  # the first half, then the second
            lo_F[top] = lo_F[f] + (0 if step_F[f] == 0 else half)
            n_F[top] = half if step_F[f] == 0 else m - half
            step_F[top] = 0
            step_F[f] += 1
            top += 1
        else:  # both halves done
            sums[n_sums - 2] = sums[n_sums - 2] + sums[n_sums - 1]
            n_sums -= 1
            top -= 1
    return sums[0]


@njit(cache=True, nogil=True)
def _mean(a, n):
    return _pairwise_sum(a, 0, n) / n if n > 0 else np.nan


@njit(cache=True, nogil=True)
def cluster_neurons(dist_SKK, mask_SK, method, threshold, labels_SK, linkage_SM4, n_examples_S, n_clusters_S,
                    max_S, mean_S, intra_S, inter_S):
    """Cluster each neuron's examples where mask_SK (in slot order) from their distances dist_SKK
    (float64 [S, k, k]), writing into the result arrays (core.cluster.ClusterResult's fields, as
    `_empty_result` fills them). `method`: METHOD_CODES. Returns -1, or the first neuron whose
    distances among its clustered examples are not all finite (nothing written for it or after it)."""
    S, K = mask_SK.shape
    P = K * (K - 1) // 2
    cond_P = np.empty(P)
    work_P = np.empty(P)
    same_P = np.empty(P)
    apart_P = np.empty(P)
    Z_M4 = np.empty((max(K - 1, 1), 4))
    idx_N = np.empty(K, np.int64)
    a_N = np.empty(K, np.int64)
    b_N = np.empty(K)
    parent = np.empty(2 * K, np.int64)
    count = np.empty(2 * K, np.int64)
    raw_N = np.empty(K, np.int64)
    size_C = np.empty(K, np.int64)
    rank_C = np.empty(K, np.int64)
    height = np.empty(max(K - 1, 1))
    for s in range(S):
        n = 0
        for j in range(K):
            if mask_SK[s, j]:
                idx_N[n] = j
                n += 1
        n_examples_S[s] = n
        if n < 2:
            for i in range(n):
                labels_SK[s, idx_N[i]] = 0
            n_clusters_S[s] = n
            continue
        p = 0
        for i in range(n):
            for j in range(i + 1, n):
                d = dist_SKK[s, idx_N[i], idx_N[j]]
                if not np.isfinite(d):
                    return s
                cond_P[p] = d
                p += 1
        # the merges
        if method == 0:
            _spanning_tree(cond_P, n, Z_M4, a_N, b_N)
        else:
            work_P[:p] = cond_P[:p]
            _nn_chain(work_P, n, method, Z_M4, a_N, raw_N)
        order = np.argsort(Z_M4[:n - 1, 2].copy(), kind="mergesort")
        Zs = Z_M4[:n - 1][order]
        _relabel(Zs, n, parent, count)
        # the cut: a merge joins its children's clusters when its subtree's highest merge <= threshold
        for i in range(2 * n - 1):
            parent[i] = i
        for i in range(n - 1):
            h = Zs[i, 2]
            for c in range(2):
                child = int(Zs[i, c])
                if child >= n and height[child - n] > h:
                    h = height[child - n]
            height[i] = h
            if h <= threshold:
                for c in range(2):
                    parent[_root(parent, int(Zs[i, c]))] = _root(parent, n + i)
        # clusters numbered by size (0 = largest), ties by their smallest member
        n_c = 0
        for i in range(2 * n - 1):
            count[i] = -1  # root -> cluster, in order of first member
        for i in range(n):
            r = _root(parent, i)
            if count[r] < 0:
                count[r] = n_c
                size_C[n_c] = 0
                n_c += 1
            raw_N[i] = count[r]
            size_C[raw_N[i]] += 1
        by_size = np.argsort(-size_C[:n_c], kind="mergesort")
        for r in range(n_c):
            rank_C[by_size[r]] = r
        for i in range(n):
            raw_N[i] = rank_C[raw_N[i]]
            labels_SK[s, idx_N[i]] = raw_N[i]
        for i in range(n - 1):
            for c in range(4):
                linkage_SM4[s, i, c] = Zs[i, c]
        # metrics over the pairs (condensed order)
        n_same = 0
        n_apart = 0
        dmax = cond_P[0]
        p = 0
        for i in range(n):
            for j in range(i + 1, n):
                d = cond_P[p]
                if d > dmax:
                    dmax = d
                if raw_N[i] == raw_N[j]:
                    same_P[n_same] = d
                    n_same += 1
                else:
                    apart_P[n_apart] = d
                    n_apart += 1
                p += 1
        n_clusters_S[s] = n_c
        max_S[s] = dmax
        mean_S[s] = _mean(cond_P, p)
        intra_S[s] = _mean(same_P, n_same)
        inter_S[s] = _mean(apart_P, n_apart)
    return -1
