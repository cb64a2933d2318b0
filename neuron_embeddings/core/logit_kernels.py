"""The logit effects' selection on the CPU, compiled (numba): each row's k largest and k smallest
values in one pass over a chunk of scores, merged into the running best (core.logits; other devices
keep `torch.topk`). Imported on first use (importing numba takes ~0.5 s)."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, inline="always")
def _insert_ranked(vals_K, cols_K, v, col, sign):
    """Insert (v, col) into vals_K/cols_K (col: a column or token id), ordered by sign * value
    descending, then col ascending (a tie goes after the lower col whatever the order of arrival);
    the last entry drops out."""
    K = vals_K.shape[0]
    last = cols_K[K - 1]
    if last >= 0 and not (sign * v > sign * vals_K[K - 1] or (v == vals_K[K - 1] and col < last)):
        return
    i = K - 1
    while i > 0 and (cols_K[i - 1] < 0 or sign * vals_K[i - 1] < sign * v
                     or (vals_K[i - 1] == v and cols_K[i - 1] > col)):
        vals_K[i] = vals_K[i - 1]
        cols_K[i] = cols_K[i - 1]
        i -= 1
    vals_K[i] = v
    cols_K[i] = col


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
                _insert_ranked(tv, ti, v, ids_C[c], np.float32(1.0))
            if v < bv[K - 1]:
                _insert_ranked(bv, bi, v, ids_C[c], np.float32(-1.0))


@njit(cache=True, nogil=True, inline="always")
def _bound(s, a, c, p, n, rel):
    """The screen's bound on |w . u_t - s| for one bfloat16 score s (core.logits' `Screen`)."""
    return a * p + c * n + rel * abs(s)


@njit(cache=True, nogil=True)
def screen_chunk(bits_MC, c0, a_M, c_M, p_C, n_C, rel, top_lb_MK, bot_ub_MK, top_n_M, top_col_MX, top_ub_MX,
                 bot_n_M, bot_col_MX, bot_lb_MX, scratch_C, scratch_bits_C):
    """One chunk of bfloat16 scores (their bits, int16 [M, C]; columns c0..) through the screen
    (core.logits' `Screen`), row by row while the row is in cache:

    1. each row's K largest lower bounds (top_lb, descending) and K smallest upper bounds (bot_ub,
       ascending), running over chunks; NaN never enters;
    2. the candidates kept so far that the new thresholds (the K-th of each) rule out are dropped;
       the chunk's columns that could still rank (upper bound >= the top's threshold, lower bound
       <= the bottom's) are added. A row's count past the lists' capacity X marks it for a full
       rescore.

    `scratch_C` float32 [C] and `scratch_bits_C`, the same memory as uint32: where each row is
    widened to float32."""
    M, C = bits_MC.shape
    K, X = top_lb_MK.shape[1], top_col_MX.shape[1]
    for m in range(M):
        for j in range(C):
            scratch_bits_C[j] = np.uint32(np.uint16(bits_MC[m, j])) << np.uint32(16)
        tl, bu = top_lb_MK[m], bot_ub_MK[m]
        a, c = a_M[m], c_M[m]
        for j in range(C):
            s = np.float64(scratch_C[j])
            b = _bound(s, a, c, p_C[j], n_C[j], rel)
            if s - b > tl[K - 1]:
                i = K - 1
                while i > 0 and tl[i - 1] < s - b:
                    tl[i] = tl[i - 1]
                    i -= 1
                tl[i] = s - b
            if s + b < bu[K - 1]:
                i = K - 1
                while i > 0 and bu[i - 1] > s + b:
                    bu[i] = bu[i - 1]
                    i -= 1
                bu[i] = s + b
        tau_t, tau_b = tl[K - 1], bu[K - 1]
        if top_n_M[m] <= X:
            kept = 0
            for i in range(top_n_M[m]):
                if top_ub_MX[m, i] >= tau_t:
                    top_col_MX[m, kept] = top_col_MX[m, i]
                    top_ub_MX[m, kept] = top_ub_MX[m, i]
                    kept += 1
            top_n_M[m] = kept
        if bot_n_M[m] <= X:
            kept = 0
            for i in range(bot_n_M[m]):
                if bot_lb_MX[m, i] <= tau_b:
                    bot_col_MX[m, kept] = bot_col_MX[m, i]
                    bot_lb_MX[m, kept] = bot_lb_MX[m, i]
                    kept += 1
            bot_n_M[m] = kept
        for j in range(C):
            s = np.float64(scratch_C[j])
            b = _bound(s, a, c, p_C[j], n_C[j], rel)
            if s + b >= tau_t:
                n = top_n_M[m]
                if n < X:
                    top_col_MX[m, n] = c0 + j
                    top_ub_MX[m, n] = s + b
                top_n_M[m] = n + 1
            if s - b <= tau_b:
                n = bot_n_M[m]
                if n < X:
                    bot_col_MX[m, n] = c0 + j
                    bot_lb_MX[m, n] = s - b
                bot_n_M[m] = n + 1


@njit(cache=True, nogil=True, inline="always")
def _dot64(w_D, u_D):
    total = 0.0
    for i in range(w_D.shape[0]):
        total += np.float64(w_D[i]) * np.float64(u_D[i])
    return total


@njit(cache=True, nogil=True)
def rescore(rows_MD, W_VD, n_M, col_MX, sign, vals_MK, cols_MK):
    """Each row's K best columns (sign 1: largest, -1: smallest) by float64 dot products of its
    candidates (col_MX[m, :n_M[m]]), or of every column where its list overflowed (n_M > X).
    vals float64 [M, K], cols int64 [M, K] (-1 where fewer than K values are not NaN)."""
    M = rows_MD.shape[0]
    V, X = W_VD.shape[0], col_MX.shape[1]
    for m in range(M):
        vals, cols = vals_MK[m], cols_MK[m]
        cols[:] = -1
        full = n_M[m] > X
        for i in range(V if full else n_M[m]):
            col = i if full else col_MX[m, i]
            v = _dot64(rows_MD[m], W_VD[col])
            if v == v:
                _insert_ranked(vals, cols, v, col, sign)
