"""The logit effects' selection on the CPU, compiled (numba): each row's k largest and k smallest
values in one pass over a chunk of scores, merged into the running best (core.logits; other devices
keep `torch.topk`). Imported on first use (importing numba takes ~0.5 s)."""
from __future__ import annotations

from numba import njit


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
        t_worst, b_worst = tv[K - 1], bv[K - 1]
        for c in range(C):
            v = row[c]
            if v > t_worst:
                i = K - 1
                while i > 0 and tv[i - 1] < v:
                    tv[i] = tv[i - 1]
                    ti[i] = ti[i - 1]
                    i -= 1
                tv[i] = v
                ti[i] = ids_C[c]
                t_worst = tv[K - 1]
            if v < b_worst:
                i = K - 1
                while i > 0 and bv[i - 1] > v:
                    bv[i] = bv[i - 1]
                    bi[i] = bi[i - 1]
                    i -= 1
                bv[i] = v
                bi[i] = ids_C[c]
                b_worst = bv[K - 1]
