"""The exact similar search's selection on the CPU, compiled (numba): each query's best candidates
taken from a tile of similarities in one pass (core.similar; other devices keep `torch.topk`, which
on a CPU cost more than the matrix products). Imported on first use (importing numba takes ~0.5 s).

The tiles arrive as the integer bits of their floats (bfloat16 as int16, float32 as int32), compared
through `order_key`, which orders them as their values (for non-negative values the bits
themselves), so no tile is converted."""
from __future__ import annotations

import numpy as np
from numba import njit

CHUNK = 64  # values of a row tested together against its threshold before any is inserted


@njit(cache=True, nogil=True, inline="always")
def order_key(bits, magnitude):
    """int64 key of a float's bits (sign-extended), in the order of the values: negative values get
    their magnitude bits (`magnitude`: 0x7FFF for bfloat16, 0x7FFFFFFF for float32) flipped."""
    b = np.int64(bits)
    return b ^ ((b >> 63) & magnitude)


@njit(cache=True, nogil=True)
def merge_tile(sim_QR, q0, r0, key_QM, at_QM, magnitude, ceiling, i0, i1):
    """Insert rows i0..i1-1 of one tile (similarities of queries q0.. to references r0.., as bits
    [q, r]) into each query's best candidates (key_QM int64 descending, at_QM their reference
    index, -1 where none), in place. A value enters when its key beats the worst candidate's and
    is at most `ceiling` (+inf's key: NaN never enters); an equal key goes after the ones already
    there, so the earlier reference stays ahead whatever the tiles. Rows are independent: disjoint
    ranges may run on several threads at once (core.scan's `over_units`)."""
    R = sim_QR.shape[1]
    M = key_QM.shape[1]
    worst_1 = np.empty(1, sim_QR.dtype)  # the threshold in the tile's own integer type: compared without widening
    for i in range(i0, i1):
        row = sim_QR[i]
        keys, ats = key_QM[q0 + i], at_QM[q0 + i]
        worst_1[0] = max(keys[M - 1], 0)
        t = worst_1[0]
        for c in range(0, R, CHUNK):
            if keys[M - 1] >= 0:  # non-negative keys are the bits themselves: a plain comparison first
                hits = 0
                if c + CHUNK <= R:
                    for j in range(CHUNK):  # a fixed count: vectorised
                        hits += np.int32(row[c + j] > t)
                else:
                    for j in range(c, R):
                        hits += np.int32(row[j] > t)
                if hits == 0:
                    continue
            for j in range(c, min(c + CHUNK, R)):
                k = order_key(row[j], magnitude)
                if k > keys[M - 1] and k <= ceiling:
                    p = M - 1
                    while p > 0 and keys[p - 1] < k:
                        keys[p] = keys[p - 1]
                        ats[p] = ats[p - 1]
                        p -= 1
                    keys[p] = k
                    ats[p] = r0 + j
            worst_1[0] = max(keys[M - 1], 0)
            t = worst_1[0]
