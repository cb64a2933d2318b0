"""The logit effects' selection on the CPU, compiled (numba): each row's k largest and k smallest
values in one pass over a chunk of scores, merged into the running best (core.logits; other devices
keep `torch.topk`). Imported on first use (importing numba takes ~0.5 s)."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _insert(vals_K, ids_K, v, token, sign):
    """Insert v (and its token) into vals_K, kept in order of sign * value, largest first; the
    last entry drops out. Equal values keep the earlier one first."""
    i = vals_K.shape[0] - 1
    while i > 0 and sign * vals_K[i - 1] < sign * v:
        vals_K[i] = vals_K[i - 1]
        ids_K[i] = ids_K[i - 1]
        i -= 1
    vals_K[i] = v
    ids_K[i] = token


@njit(cache=True, nogil=True)
def merge_extremes(scores_MC, ids_C, top_v_MK, top_i_MK, bot_v_MK, bot_i_MK):
    """Insert each row's values of one chunk (float32 [M, C], their token ids int64 [C]) into its
    k largest (top_*, descending) and k smallest (bot_*, ascending), in place; start from -inf / +inf
    values and -1 ids. An equal value does not displace an earlier one; NaN never enters."""
    M, C = scores_MC.shape
    K = top_v_MK.shape[1]
    for m in range(M):
        row = scores_MC[m]
        tv, ti, bv, bi = top_v_MK[m], top_i_MK[m], bot_v_MK[m], bot_i_MK[m]
        for c in range(C):
            v = row[c]
            if v > tv[K - 1]:
                _insert(tv, ti, v, ids_C[c], np.float32(1.0))
            if v < bv[K - 1]:
                _insert(bv, bi, v, ids_C[c], np.float32(-1.0))
