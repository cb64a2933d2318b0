"""The scan's bookkeeping on the CPU, compiled (numba): the same results as core.scan's torch code,
which stays the path for other devices.

Per batch and layer the torch path runs some twenty memory-bound tensor operations over the
activations [B, T, M] (per-sequence max, then for the few entrants their positions, windows and
x rows; with `--strata` a histogram as five more passes and a bincount). Here one pass over the
activations gives each sequence's max and first argmax (and, with `--strata`, the histogram and
sum), and the slot tables take their entrants by insertion, one neuron at a time.

Every kernel works on the units m0 <= m < m1 only and releases the GIL, so a caller can run
disjoint ranges of units on several threads at once (core.scan: `over_units`).
"""
from __future__ import annotations

import numpy as np
from numba import njit

ROWS_PER_COUNT = 32  # activation rows whose bin indices are counted together (see `_count_bins`; < 128: int8 counts)


@njit(cache=True, nogil=True)
def _count_bins(idx_RN, n_rows, hist_HM, count_N, m0):
    """Add the bins of `n_rows` rows of bin indices (int8 [rows, N], 0 = not counted) of units
    m0..m0+N-1 to hist_HM (bin j + 1 in row j): per bin, one comparison per row vectorised along the
    units on int8 lanes into count_N (int8 scratch [N]), then added to the histogram."""
    N = idx_RN.shape[1]
    for q in range(n_rows, ROWS_PER_COUNT):
        idx_RN[q, :] = 0
    for j in range(hist_HM.shape[0]):
        h = hist_HM[j][m0:m0 + N]
        jj = np.int8(j + 1)
        count_N[:] = 0
        for q in range(ROWS_PER_COUNT):
            r = idx_RN[q]
            for n in range(N):
                count_N[n] += np.int8(r[n] == jj)
        for n in range(N):
            h[n] += count_N[n]


@njit(cache=True, nogil=True)
def sequence_maxima(post_BTM, excluded_BT, scale_M, want_hist, max_BM, arg_BM, hist_HM, sum_M, m0, m1):
    """One pass over a batch's activations (float32 [B, T, M]; positions where excluded_BT != 0
    are skipped): each sequence's max and its first position (max_BM, arg_BM; -inf and 0 where
    every position is excluded). With `want_hist`, also each unit's histogram (hist_HM int32
    [H, M], row j: activations a with j < a * scale <= j + 1, float32; a * scale > H counts in the
    last bin) and sum (sum_M float64: float32 over a sequence's positions, then float64). Units
    m0..m1-1 only (rows sliced to them: loops over a slice's own indices vectorise, loops from m0
    to m1 did not)."""
    B, T, _ = post_BTM.shape
    N = m1 - m0
    Hf = np.float32(hist_HM.shape[0])
    zero = np.float32(0.0)
    idx_RN = np.zeros((ROWS_PER_COUNT, N), np.int8)
    count_N = np.zeros(N, np.int8)
    acc_N = np.zeros(N, np.float32)
    scale_N = scale_M[m0:m1] if want_hist else scale_M
    mx = np.empty(N, np.float32)  # a sequence's running max and its position, in scratch of the kernel's
    ar = np.empty(N, np.int32)  # own (the outputs may alias the activations: their loop did not vectorise)
    filled = 0
    for b in range(B):
        mx[:] = -np.inf
        ar[:] = 0
        if want_hist:
            acc_N[:] = zero
        for t in range(T):
            if excluded_BT[b, t]:
                continue
            row = post_BTM[b, t][m0:m1]
            tt = np.int32(t)
            for n in range(N):
                v = row[n]
                g = v > mx[n]
                mx[n] = v if g else mx[n]
                ar[n] = tt if g else ar[n]
            if want_hist:
                iq = idx_RN[filled]
                for n in range(N):
                    v = row[n]
                    acc_N[n] += v
                    s = min(max(v * scale_N[n], zero), Hf)
                    i = np.int32(s)
                    iq[n] = np.int8(i + np.int32(np.float32(i) < s))
                filled += 1
                if filled == ROWS_PER_COUNT:
                    _count_bins(idx_RN, filled, hist_HM, count_N, m0)
                    filled = 0
        out_max, out_arg = max_BM[b][m0:m1], arg_BM[b][m0:m1]
        for n in range(N):
            out_max[n] = mx[n]
            out_arg[n] = ar[n]
        if want_hist:
            sm = sum_M[m0:m1]
            for n in range(N):
                sm[n] += np.float64(acc_N[n])
    if want_hist and filled:
        _count_bins(idx_RN, filled, hist_HM, count_N, m0)


@njit(cache=True, nogil=True)
def merge_candidates(key_BM, act_BM, arg_BM, seq_B, key_MK, act_MK, seq_MK, pos_MK, slot_MK, new_b_MK, new_pos_MK,
                     m0, m1):
    """Insert one batch's candidates into a slot table (fields [M, K], rank order: key desc, seq
    asc), in place. The batch's sequences come after the table's, in order, so a candidate enters
    when its key beats the worst entry's (ties: the earlier sequence stays), and goes after every
    entry with a key >= its own. An entrant takes the slot of an entry it evicts; new_b_MK and
    new_pos_MK (by slot, -1 where the slot's entry is not from this batch) say where each slot's
    entrant came from. A unit with one candidate inserts it; with more (while the tables fill,
    most units), its candidates are ranked and merged with the table in one pass rather than
    inserted one by one (each shifting the entries below it). Units m0..m1-1 only; returns their
    number of slots holding an entrant of this batch."""
    B = key_BM.shape[0]
    K = key_MK.shape[1]
    cand_b = np.empty(B, np.int64)  # a unit's candidates (batch rows), then ranked
    tk = np.empty(K, np.float64)  # the merged row
    ta = np.empty(K, np.float32)
    ts = np.empty(K, np.int64)
    tp = np.empty(K, np.int64)
    tb = np.empty(K, np.int64)  # the candidate's batch row, -1 for a kept entry
    tslot = np.empty(K, np.int64)
    n = 0
    for m in range(m0, m1):
        kr = key_MK[m]
        worst = kr[K - 1]
        c = 0
        for b in range(B):
            if key_BM[b, m] > worst:  # not NaN, not -inf
                cand_b[c] = b
                c += 1
        if c == 0:
            continue
        if c == 1:
            b = cand_b[0]
            kv = key_BM[b, m]
            i = K - 1
            while i > 0 and kr[i - 1] < kv:
                i -= 1
            freed = slot_MK[m, K - 1]
            for j in range(K - 1, i, -1):
                kr[j] = kr[j - 1]
                act_MK[m, j] = act_MK[m, j - 1]
                seq_MK[m, j] = seq_MK[m, j - 1]
                pos_MK[m, j] = pos_MK[m, j - 1]
                slot_MK[m, j] = slot_MK[m, j - 1]
            kr[i] = kv
            act_MK[m, i] = act_BM[b, m]
            seq_MK[m, i] = seq_B[b]
            pos_MK[m, i] = arg_BM[b, m]
            slot_MK[m, i] = freed
            new_b_MK[m, freed] = b
            new_pos_MK[m, freed] = arg_BM[b, m]
            n += 1
            continue
        # rank the candidates: key desc, then batch row (= sequence) asc; insertion sort is stable
        for q in range(1, c):
            b = cand_b[q]
            kv = key_BM[b, m]
            r = q
            while r > 0 and key_BM[cand_b[r - 1], m] < kv:
                cand_b[r] = cand_b[r - 1]
                r -= 1
            cand_b[r] = b
        # merge: a kept entry goes first on equal keys (its sequence is earlier)
        i = 0
        j = 0
        for o in range(K):
            if j < c and (i >= K or kr[i] < key_BM[cand_b[j], m]):
                b = cand_b[j]
                tk[o] = key_BM[b, m]
                ta[o] = act_BM[b, m]
                ts[o] = seq_B[b]
                tp[o] = arg_BM[b, m]
                tb[o] = b
                j += 1
            else:
                tk[o] = kr[i]
                ta[o] = act_MK[m, i]
                ts[o] = seq_MK[m, i]
                tp[o] = pos_MK[m, i]
                tb[o] = -1
                tslot[o] = slot_MK[m, i]
                i += 1
        # the entries past the first i were evicted: their slots go to the j entrants
        f = i
        for o in range(K):
            kr[o] = tk[o]
            act_MK[m, o] = ta[o]
            seq_MK[m, o] = ts[o]
            pos_MK[m, o] = tp[o]
            b = tb[o]
            if b >= 0:
                slot = slot_MK[m, f]
                f += 1
                tslot[o] = slot
                new_b_MK[m, slot] = b
                new_pos_MK[m, slot] = tp[o]
        for o in range(K):
            slot_MK[m, o] = tslot[o]
        n += j
    return n


@njit(cache=True, nogil=True)
def entrant_tokens(new_b_MK, new_pos_MK, T, row_of_tok, first_row, tokens_out):
    """Give each entrant's token (b * T + pos) not yet in the pool (row_of_tok[tok] < 0) the next
    pool row, first_row on: row_of_tok[tok] = that row, the token into tokens_out. Returns how many
    tokens are new."""
    M, K = new_b_MK.shape
    n = 0
    for m in range(M):
        for s in range(K):
            b = new_b_MK[m, s]
            if b < 0:
                continue
            tok = b * T + new_pos_MK[m, s]
            if row_of_tok[tok] < 0:
                row_of_tok[tok] = first_row + n
                tokens_out[n] = tok
                n += 1
    return n


@njit(cache=True, nogil=True)
def fill_entrants(new_b_MK, new_pos_MK, row_of_tok, post_BTM, before, xref_MK, win_MKW, m0, m1):
    """Point each entrant's slot at its token's pool row and copy its activation window (positions
    pos - before .., NaN past either end of the sequence). Units m0..m1-1 only."""
    K = new_b_MK.shape[1]
    T = post_BTM.shape[1]
    W = win_MKW.shape[2]
    for m in range(m0, m1):
        for s in range(K):
            b = new_b_MK[m, s]
            if b < 0:
                continue
            pos = new_pos_MK[m, s]
            xref_MK[m, s] = row_of_tok[b * T + pos]
            for w in range(W):
                t = pos - before + w
                win_MKW[m, s, w] = post_BTM[b, t, m] if 0 <= t < T else np.nan


@njit(cache=True, nogil=True)
def _mix32(h):
    """core.scan._mix32 on one int64 holding a value in [0, 2**32) (the products wrap as torch's do;
    only their low 32 bits are kept)."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


@njit(cache=True, nogil=True)
def strata_keys(act_BM, gmax_M, lo_I, hi_I, h_layer, seq_B, key_IBM):
    """core.scan.strata_keys for every stratum at once: key_IBM[i, b, m] = -priority of (unit m,
    sequence b) (`h_layer`: the hash of seed and layer) where act_BM[b, m] lies in stratum i's
    [lo x max, hi x max) and is > 0 (the first stratum closed at the top), else -inf; float64."""
    B, M = act_BM.shape
    n_strata = lo_I.shape[0]
    h_M = np.empty(M, np.int64)
    lo_IM = np.empty((n_strata, M), np.float64)  # the edges, as torch computes them (float64)
    hi_IM = np.empty((n_strata, M), np.float64)
    for m in range(M):
        h_M[m] = _mix32(h_layer ^ m)
        g = np.float64(gmax_M[m])
        for i in range(n_strata):
            lo_IM[i, m] = lo_I[i] * g
            hi_IM[i, m] = hi_I[i] * g if i > 0 else np.inf
    key_M = np.empty(M, np.float64)
    a_M = np.empty(M, np.float64)
    for b in range(B):
        s = seq_B[b] & 0xFFFFFFFF
        for m in range(M):
            key_M[m] = -(np.float64(_mix32(h_M[m] ^ s)) * 2.0 ** -32)
            a_M[m] = np.float64(act_BM[b, m])
        for i in range(n_strata):
            lo, hi, out = lo_IM[i], hi_IM[i], key_IBM[i, b]
            for m in range(M):
                a = a_M[m]
                out[m] = key_M[m] if (a >= lo[m]) & (a > 0) & ((a < hi[m]) | (i == 0)) else -np.inf
