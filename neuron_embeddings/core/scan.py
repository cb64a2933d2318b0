"""Scan: one forward pass per batch, a running top-k per neuron that keeps the MLP input x.

Per batch and layer the activations [B, T, M] are reduced over positions first (per-sequence max
and argmax, [B, M]); the candidates are merged into a slot table of k entries per neuron, ranked
by (key descending, sequence index ascending). Only the candidates that enter the table have their
x vector gathered, so the state is O(M * k * D) whatever the number of tokens.

`top` ranks by the activation itself. `band:F` ranks by a seeded hash of (seed, layer, neuron,
sequence), among the sequences whose max is at least F times the neuron's dataset maximum (known
from a first pass): the k smallest hashes are a uniform sample that does not depend on how the
sequences are split into blocks, batches or shards.

The bookkeeping runs inside the forward, layer by layer. On the CPU it is compiled (core.scan_kernels:
one pass over the activations, tables merged by insertion); elsewhere it is the torch code here
(`batch_candidates`, `update_slots`, `add_distribution`). Both give the same tables (tested).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from neuron_embeddings.core.models import run_until
from neuron_embeddings.core.resources import release_openmp_threads
from neuron_embeddings.core.settings import HIST_BINS
from neuron_embeddings.core.units import MLPNeurons, UnitSource

log = logging.getLogger(__name__)

NO_SEQ = np.iinfo(np.int64).max
MASK32 = 0xFFFFFFFF


# --- pure functions ---------------------------------------------------------------------------

def _kernels():
    """core.scan_kernels, imported on first use (importing numba takes ~0.5 s, and most commands
    never scan)."""
    from neuron_embeddings.core import scan_kernels

    return scan_kernels


_SPLIT_POOL: list = [None, 0]  # the threads `over_units` hands its other ranges to (and how many), made on first use
_SPLIT_LOCK = threading.Lock()
MIN_SPLIT_UNITS = 256  # fewer units per range and handing them over costs more than it saves


def over_units(parts: int, kernel, M: int, *args) -> list:
    """`kernel(*args, m0, m1)` over the units 0..M-1 in `parts` contiguous ranges at once (the
    compiled kernels release the GIL; the first range runs on this thread): their results, in
    order. The forward waits during the bookkeeping, so on the CPU it takes as many threads as the
    forward has (the scan ends the forward's OpenMP workers first: they would spin on those cores)."""
    parts = max(1, min(parts, M // MIN_SPLIT_UNITS))
    if parts == 1:
        return [kernel(*args, 0, M)]
    bounds = [M * i // parts for i in range(parts + 1)]
    with _SPLIT_LOCK:
        if _SPLIT_POOL[1] < parts - 1:
            _SPLIT_POOL[:] = [ThreadPoolExecutor(parts - 1, thread_name_prefix="ne-bookkeeping"), parts - 1]
        pool = _SPLIT_POOL[0]
    futures = [pool.submit(kernel, *args, bounds[i], bounds[i + 1]) for i in range(1, parts)]
    first = kernel(*args, bounds[0], bounds[1])
    return [first] + [f.result() for f in futures]


class XPool:
    """MLP inputs [rows, D] (the embedding dtype; row 0 = zeros) that slot tables refer to by row.

    Many neurons pick the same token (while a table fills, nearly every token of a batch enters
    for some neuron), and a layer's top-k and strata tables pick the same tokens, so each token's x
    is stored once per layer, here. The pool starts at `initial_rows` (the scan: its tokens + 1, so
    it never grows; untouched rows cost no memory on the CPU) and doubles as tokens enter, up to
    `cap` rows; when it is full at its cap, rows no table refers to are dropped. Memory is bounded by the
    tables' `nbytes` whatever the number of tokens (the run checks it fits before it starts), and a
    short run never allocates it all."""

    INITIAL_ROWS = 4096

    def __init__(self, cap: int, d_model: int, dtype: torch.dtype, device="cpu", initial_rows: int | None = None):
        self.cap = cap
        self.data = torch.empty((max(1, min(cap, initial_rows or self.INITIAL_ROWS)), d_model), dtype=dtype,
                                device=device)
        self.data[0] = 0
        self.used = 1  # rows in use (row 0 always)
        self.compactions = 0
        self._peak_rows = 1  # the most rows in use before a compaction
        self.tables: list[SlotTable] = []  # whose xref point here

    @property
    def peak_rows(self) -> int:
        """The most rows it has held (on the CPU, what it has cost in memory)."""
        return max(self._peak_rows, self.used)

    def release(self) -> None:
        """Free the rows now: its tables' x is no longer needed (their fields were copied out). The
        pool and its tables refer to each other, so without this their memory waits for Python's
        cycle collector: a whole scan's pools (GPT-2 small: 3.5 GB) could outlive the scan."""
        self.data = self.data.new_empty((0, self.data.shape[1]))
        self.tables = []

    @staticmethod
    def share(tables: list["SlotTable"], initial_rows: int | None = None) -> "XPool":
        """One pool for fresh tables (nothing entered yet), its cap the sum of theirs."""
        assert all(t.pool.used == 1 for t in tables), "only fresh tables share a pool"
        first = tables[0].pool
        pool = XPool(sum(t.pool.cap for t in tables), first.data.shape[1], first.data.dtype, first.data.device,
                     initial_rows)
        for t in tables:
            t.pool = pool
        pool.tables = list(tables)
        return pool

    def add_rows(self, rows_ND: torch.Tensor) -> int:
        """Append rows; returns the index of the first."""
        self.reserve(rows_ND.shape[0])
        at = self.used
        self.data[at:at + rows_ND.shape[0]] = rows_ND
        self.used += rows_ND.shape[0]
        return at

    def take_rows(self, src_ND: torch.Tensor, idx_n: torch.Tensor) -> int:
        """Append rows idx_n of src_ND (in the pool's dtype); returns the index of the first."""
        n = idx_n.numel()
        self.reserve(n)
        at = self.used
        torch.index_select(src_ND, 0, idx_n, out=self.data[at:at + n])
        self.used += n
        return at

    def reserve(self, n: int, chunk: int = 8192) -> None:
        """Make room for n more rows: below the cap, grow (doubling); at it, keep only the rows some
        table refers to (and row 0), in order, and renumber the tables' xref."""
        if self.used + n <= self.data.shape[0]:
            return
        if self.data.shape[0] < self.cap:
            self._grow(min(self.cap, max(2 * self.data.shape[0], self.used + n)))
            if self.used + n <= self.data.shape[0]:
                return
        refs = [t.xref.reshape(-1) for t in self.tables]
        zero = torch.zeros(1, dtype=torch.int64, device=self.data.device)
        live, inv = torch.unique(torch.cat([zero, *refs]), sorted=True, return_inverse=True)
        for a in range(0, live.numel(), chunk):  # live[i] >= i: copying forward in chunks is safe
            src = live[a:a + chunk]
            self.data[a:a + src.numel()] = self.data.index_select(0, src)
        at = 1
        for t, r in zip(self.tables, refs):
            t.xref = inv[at:at + r.numel()].view(t.xref.shape)
            at += r.numel()
        self._peak_rows = max(self._peak_rows, self.used)
        self.used = live.numel()
        self.compactions += 1
        if self.used + n > self.data.shape[0]:  # only with a cap smaller than the tables' entries + n
            self._grow(self.used + n)

    def _grow(self, rows: int) -> None:
        grown = torch.empty((rows, self.data.shape[1]), dtype=self.data.dtype, device=self.data.device)
        grown[:self.used] = self.data[:self.used]
        self.data = grown


@dataclass
class SlotTable:
    """The k best entries of every neuron of one layer, kept in rank order (key desc, seq asc).

    Each entry has one of k fixed slots per neuron; `slot` says which slot holds each ranked entry's
    x and window, so a merge moves small fields only. Empty entries have key -inf. The MLP inputs
    are rows of a pool (`XPool`, shared by a layer's tables during a scan), and a slot holds its
    row's index (`xref`; row 0 is the zero vector).
    """

    key: torch.Tensor  # float64 [M, k] ranking key, larger is better, descending along k
    act: torch.Tensor  # float32 [M, k] the example's activation (per-sequence max)
    seq: torch.Tensor  # int64 [M, k] sequence index (NO_SEQ where empty)
    pos: torch.Tensor  # int64 [M, k] position of the sequence's max token
    slot: torch.Tensor  # int64 [M, k] slot holding each ranked entry's x and window
    xref: torch.Tensor  # int64 [M, k] by slot: the pool row holding that slot's MLP input
    pool: XPool  # the MLP inputs [rows, D]
    win: torch.Tensor  # float32 [M, k, W] activations at positions pos-before .. pos+after, by slot
    before: int = 0  # tokens of the window before the max token (W = before + 1 + after)

    @classmethod
    def empty(cls, d_mlp: int, k: int, d_model: int, dtype: torch.dtype, device="cpu",
              window: tuple[int, int] = (0, 0), pool_rows: int | None = None,
              initial_rows: int | None = None) -> "SlotTable":
        """An empty table with a pool of its own: its cap `pool_rows` (default `default_pool_rows`),
        its first allocation `initial_rows` (default: the cap where pool_rows is given, else at most
        XPool.INITIAL_ROWS)."""
        cap = pool_rows or cls.default_pool_rows(d_mlp, k)
        pool = XPool(cap, d_model, dtype, device, initial_rows or (cap if pool_rows else None))
        table = cls(
            key=torch.full((d_mlp, k), -torch.inf, dtype=torch.float64, device=device),
            act=torch.full((d_mlp, k), torch.nan, dtype=torch.float32, device=device),
            seq=torch.full((d_mlp, k), NO_SEQ, dtype=torch.int64, device=device),
            pos=torch.full((d_mlp, k), -1, dtype=torch.int64, device=device),
            slot=torch.arange(k, device=device).repeat(d_mlp, 1),
            xref=torch.zeros((d_mlp, k), dtype=torch.int64, device=device),
            pool=pool,
            win=torch.full((d_mlp, k, window[0] + 1 + window[1]), torch.nan, dtype=torch.float32, device=device),
            before=window[0],
        )
        pool.tables.append(table)
        return table

    @staticmethod
    def default_pool_rows(d_mlp: int, k: int) -> int:
        return d_mlp * k + 1 + max(d_mlp * k // 4, 4096)

    @classmethod
    def nbytes(cls, d_mlp: int, k: int, d_model: int, itemsize: int, window: tuple[int, int] = (0, 0)) -> int:
        """Bytes a table holds at most: its share of a pool at its cap, and the per-entry fields
        (key, act, seq, pos, slot, xref, win)."""
        per_entry = 8 + 4 + 8 + 8 + 8 + 8 + 4 * (window[0] + 1 + window[1])
        return cls.default_pool_rows(d_mlp, k) * d_model * itemsize + d_mlp * k * per_entry

    @property
    def x(self) -> torch.Tensor:
        """[M, k, D] the MLP input of each slot (a new tensor, in the embedding dtype)."""
        M, k = self.xref.shape
        return self.pool.data.index_select(0, self.xref.view(-1)).view(M, k, -1)

    def by_slot(self, name: str) -> torch.Tensor:
        """Field `name` rearranged into slot order, to go with `x` ([M, k])."""
        field = getattr(self, name)
        return torch.empty_like(field).scatter_(1, self.slot, field)


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & MASK32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & MASK32
    return h ^ (h >> 16)


def _layer_hash(seed: int, layer: int) -> torch.Tensor:
    """The hash of (seed, layer) that `band_priority` mixes each unit and sequence into (int64 scalar)."""
    h = _mix32(torch.tensor((seed & MASK32) ^ 0x9E3779B9, dtype=torch.int64))
    return _mix32(h ^ (layer & MASK32))


def band_priority(seed: int, layer: int, neurons_M: torch.Tensor, seq_B: torch.Tensor) -> torch.Tensor:
    """Uniform pseudo-random priorities in [0, 1) as float64 [B, M], a pure function of
    (seed, layer, neuron, sequence)."""
    h = _mix32(_layer_hash(seed, layer) ^ neurons_M.to(torch.int64))[None, :]  # [1, M]
    h = _mix32(h ^ (seq_B.to(torch.int64)[:, None] & MASK32))  # [B, M]
    return h.to(torch.float64) / 2.0**32


def update_slots(table: SlotTable, key_BM: torch.Tensor, act_BM: torch.Tensor, post_BTM: torch.Tensor,
                 seq_B: torch.Tensor, x_BTD: torch.Tensor, big_threads: int = 1,
                 excluded_BT: torch.Tensor | None = None) -> int:
    """Merge one batch of candidates (one per sequence and neuron) into the table, in place.

    Precondition (the scan's order): the batch's sequence indices are ascending and larger than
    any in the table. Then one stable sort of [table, candidates] by key gives the exact
    (key desc, seq asc) order. Only neurons with a candidate at or above their worst entry are
    merged, and only entering candidates have their max position (first argmax over positions of
    `post_BTM`), window and x gathered; those gathers run on `big_threads` threads when many
    enter (the caller runs the rest on one). Positions where `excluded_BT` is True are never an
    entrant's max position (their activations still show in its window). Returns how many entered.
    """
    k = table.key.shape[1]
    B = key_BM.shape[0]
    key_MB = key_BM.T.to(torch.float64)
    M = key_MB.shape[0]
    enters_MB = (key_MB >= table.key[:, -1:]) & (key_MB > -torch.inf)  # -inf: not a candidate (band, strata)
    rows_R = torch.nonzero(enters_MB.any(dim=1)).squeeze(1)
    R = rows_R.numel()
    if R == 0:
        return 0
    if 2 * R > M:  # most rows: plain slices beat fancy indexing
        rows_R, R = torch.arange(M, device=key_MB.device), M
        sel = slice(None)
    else:
        sel = rows_R
    key_RN = torch.cat([table.key[sel], key_MB[sel]], dim=1)  # [R, k+B]
    order_RN = torch.argsort(-key_RN, dim=1, stable=True)
    top_RK, drop_RB = order_RN[:, :k], order_RN[:, k:]
    r_new, c_new = torch.nonzero(top_RK >= k, as_tuple=True)  # entering candidates, row-major
    r_old, c_old = torch.nonzero(drop_RB < k, as_tuple=True)  # evicted entries, row-major: pairs up
    n = int(r_new.numel())
    if n == 0:
        return 0
    freed = torch.gather(table.slot[sel], 1, drop_RB.clamp(max=k - 1))[r_old, c_old]

    def merged(old_RK: torch.Tensor, new_RB: torch.Tensor) -> torch.Tensor:
        return torch.gather(torch.cat([old_RK, new_RB], dim=1), 1, top_RK)

    b_RB = torch.arange(B, device=key_BM.device).expand(R, B)
    src_b = torch.gather(b_RB, 1, (top_RK - k).clamp(min=0))[r_new, c_new]  # batch row of each entrant
    # the entrants again, in (batch row, neuron) order: their reads of post_BTM then walk memory
    # nearly in order (row-major entrants read it ~3x slower), each with the slot it goes to
    m_new = rows_R[r_new]
    tgt_BM = torch.full((B, M), -1, dtype=torch.int64, device=key_BM.device)
    tgt_BM[src_b, m_new] = m_new * k + freed
    b_n, m_n = torch.nonzero(tgt_BM >= 0, as_tuple=True)
    tgt_n = tgt_BM[b_n, m_n]
    with torch_threads(big_threads if n >= 4096 else 1):  # the big gathers want every thread
        post_nT = post_BTM[b_n, :, m_n]
        eligible_nT = post_nT if excluded_BT is None else post_nT.masked_fill(excluded_BT[b_n], -torch.inf)
        pos_n = torch.argmax(eligible_nT, dim=1)  # first max position of each entrant
        del eligible_nT
        win_nW = activation_windows(post_nT, pos_n, table.before, table.win.shape[2])
    del post_nT
    pos_BM = torch.zeros_like(key_BM, dtype=torch.int64)
    pos_BM[b_n, m_n] = pos_n
    table.key[sel] = torch.gather(key_RN, 1, top_RK)
    table.act[sel] = merged(table.act[sel], act_BM.T[sel])
    table.seq[sel] = merged(table.seq[sel], seq_B[None, :].expand(R, B))
    table.pos[sel] = merged(table.pos[sel], pos_BM.T[sel])
    slot_RK = merged(table.slot[sel], torch.zeros_like(b_RB))
    slot_RK[r_new, c_new] = freed
    table.slot[sel] = slot_RK
    T, D = x_BTD.shape[1], x_BTD.shape[2]
    tok_n = b_n * T + pos_n  # the entrant's token, as a row of the batch
    used_t = torch.zeros(B * T, dtype=torch.bool, device=tok_n.device)
    used_t[tok_n] = True
    tok_u = torch.nonzero(used_t).squeeze(1)  # each token that entered, once
    first = table.pool.add_rows(x_BTD.reshape(-1, D).index_select(0, tok_u).to(table.pool.data.dtype))
    row_t = torch.zeros(B * T, dtype=torch.int64, device=tok_n.device)
    row_t[tok_u] = torch.arange(first, first + tok_u.numel(), device=tok_n.device)
    table.xref.view(-1).index_copy_(0, tgt_n, row_t[tok_n])
    table.win.view(-1, win_nW.shape[1]).index_copy_(0, tgt_n, win_nW)
    return n


def update_slots_compiled(table: SlotTable, key_BM: np.ndarray, act_BM: np.ndarray, arg_BM: np.ndarray,
                          seq_B: np.ndarray, post_BTM: np.ndarray, x_ND: torch.Tensor,
                          row_of_tok: np.ndarray | None = None, parts: int = 1) -> int:
    """`update_slots` on the CPU through core.scan_kernels, with each candidate's max position
    (arg_BM, from `sequence_maxima`) known: the same table, entry for entry (slots may differ).
    key_BM float64, act_BM float32, seq_B int64, post_BTM float32 [B, T, M], x_ND the batch's MLP
    inputs as rows [B * T, D] in the pool's dtype. `row_of_tok` (int64 [B * T], -1 where not yet
    in the pool) lets the tables sharing a pool store each of the batch's tokens once; whoever
    passes it has reserved B * T rows first, so no compaction renumbers them midway. The merge and
    the fill run on `parts` threads (`over_units`). Returns how many slots took an entrant of this
    batch."""
    M, k = table.key.shape
    new_b_MK = np.full((M, k), -1, dtype=np.int64)
    new_pos_MK = np.full((M, k), -1, dtype=np.int64)
    kernels = _kernels()
    n = sum(over_units(parts, kernels.merge_candidates, M, key_BM, act_BM, arg_BM, seq_B, table.key.numpy(),
                       table.act.numpy(), table.seq.numpy(), table.pos.numpy(), table.slot.numpy(), new_b_MK,
                       new_pos_MK))
    if n == 0:
        return 0
    B, T = post_BTM.shape[:2]
    pool = table.pool
    if row_of_tok is None:
        pool.reserve(B * T)
        row_of_tok = np.full(B * T, -1, dtype=np.int64)
    tokens = np.empty(B * T, dtype=np.int64)
    n_tok = kernels.entrant_tokens(new_b_MK, new_pos_MK, T, row_of_tok, pool.used, tokens)
    if n_tok:
        compactions = pool.compactions
        pool.take_rows(x_ND, torch.from_numpy(tokens[:n_tok]))
        assert pool.compactions == compactions, "the pool was not reserved for the batch"
    over_units(parts, kernels.fill_entrants, M, new_b_MK, new_pos_MK, row_of_tok, post_BTM, table.before,
               table.xref.numpy(), table.win.numpy())
    return n


def activation_windows(post_nT: torch.Tensor, pos_n: torch.Tensor, before: int, width: int) -> torch.Tensor:
    """Activations at positions pos-before .. pos-before+width-1 of each row: float32 [n, width],
    NaN where the window runs past either end of the sequence."""
    T = post_nT.shape[1]
    idx_nW = pos_n[:, None] - before + torch.arange(width, device=pos_n.device)[None, :]
    inside = (idx_nW >= 0) & (idx_nW < T)
    vals = torch.gather(post_nT.float(), 1, idx_nW.clamp(0, T - 1))
    return torch.where(inside, vals, torch.full_like(vals, torch.nan))


def leading_excluded(excluded_BT: torch.Tensor) -> int:
    """How many leading positions are excluded in every row (a prepended BOS: 1)."""
    return int(excluded_BT.all(dim=0).int().cumprod(0).sum())


def batch_candidates(post_BTM: torch.Tensor, excluded_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence max over positions: [B, M] float32 (amax: ~10x faster than max with indices;
    positions are found later, for the few candidates that enter the table). Positions where
    `excluded_BT` is True never count (-inf where a sequence has no other position)."""
    if excluded_BT is None:
        return post_BTM.float().amax(dim=1)
    lead = leading_excluded(excluded_BT)  # leading columns excluded in every row (BOS)
    if lead == excluded_BT.shape[1]:
        return torch.full(post_BTM[:, 0].shape, -torch.inf, dtype=torch.float32, device=post_BTM.device)
    rest_BT = excluded_BT[:, lead:]
    val_BM = post_BTM[:, lead:].float().amax(dim=1)  # a view: no copy of the activations
    rows = torch.nonzero(rest_BT.any(dim=1)).flatten()  # rows with excluded tokens further on: mask those only
    if len(rows):
        val_BM[rows] = post_BTM[rows, lead:].float().masked_fill(rest_BT[rows, :, None], -torch.inf).amax(dim=1)
    return val_BM


def band_keys(act_BM: torch.Tensor, gmax_M: torch.Tensor, fraction: float, seed: int, layer: int,
              neurons_M: torch.Tensor, seq_B: torch.Tensor) -> torch.Tensor:
    """Keys for `band:F`: -priority where the sequence is eligible (act >= F * neuron max), else -inf."""
    eligible = act_BM.double() >= fraction * gmax_M.double()[None, :]
    key = -band_priority(seed, layer, neurons_M, seq_B).to(act_BM.device)
    return torch.where(eligible, key, torch.full_like(key, -torch.inf))


STRATA_SALT = 0x5EED5A17  # strata priorities: independent of band:F's for the same seed


def strata_keys(act_BM: torch.Tensor, gmax_M: torch.Tensor, intervals: list[tuple[float, float]], seed: int,
                layer: int, neurons_M: torch.Tensor, seq_B: torch.Tensor) -> list[torch.Tensor]:
    """Keys [B, M] for each stratum (low, high) (fractions of the unit's maximum): -priority where
    the sequence's max lies in [low x max, high x max) and is > 0 (the first stratum is closed at
    the top), else -inf. One seeded priority per (layer, unit, sequence) serves every stratum."""
    key_BM = -band_priority(seed ^ STRATA_SALT, layer, neurons_M, seq_B).to(act_BM.device)
    act, gmax = act_BM.double(), gmax_M.double()[None, :]
    none = torch.full_like(key_BM, -torch.inf)
    out = []
    for i, (lo, hi) in enumerate(intervals):
        inside = (act >= lo * gmax) & (act > 0)
        if i > 0:
            inside &= act < hi * gmax
        out.append(torch.where(inside, key_BM, none))
    return out


def strata_keys_compiled(act_BM: np.ndarray, gmax_M: np.ndarray, intervals: list[tuple[float, float]], seed: int,
                         layer: int, seq_B: np.ndarray) -> np.ndarray:
    """`strata_keys` on the CPU through core.scan_kernels, in one pass: float64 [n_strata, B, M]."""
    h_layer = int(_layer_hash(seed ^ STRATA_SALT, layer))
    lo_I = np.array([lo for lo, _ in intervals], dtype=np.float64)
    hi_I = np.array([hi for _, hi in intervals], dtype=np.float64)
    key_IBM = np.empty((len(intervals), *act_BM.shape), dtype=np.float64)
    _kernels().strata_keys(act_BM, gmax_M, lo_I, hi_I, h_layer, seq_B, key_IBM)
    return key_IBM


def histogram_scale(gmax_M: torch.Tensor, bins: int = HIST_BINS) -> torch.Tensor:
    """float32 [M]: bins / max where the unit's maximum is > 0, else 0 (nothing to count)."""
    gmax = gmax_M.double()
    return torch.where(gmax > 0, bins / gmax, torch.zeros_like(gmax)).float()


def add_distribution(hist_MH: torch.Tensor, sum_M: torch.Tensor, post_BTM: torch.Tensor, scale_M: torch.Tensor,
                     excluded_BT: torch.Tensor | None = None) -> int:
    """Add one batch's activations to each unit's histogram (int64 [M, H], in place) and sum
    (float64 [M], in place); returns the tokens counted. Bin i holds the activations a > 0 with
    i < a x scale <= i + 1 (float32; a = max lands in the last bin): (i/H x max, (i+1)/H x max].
    Positions where `excluded_BT` is True are left out, as they are from the examples."""
    M, H = hist_MH.shape
    lead = 0 if excluded_BT is None else leading_excluded(excluded_BT)
    a_BTM = post_BTM[:, lead:]
    n = a_BTM.shape[0] * a_BTM.shape[1]
    t_BTM = a_BTM.float() * scale_M  # a new tensor: worked on in place below
    sum_M += a_BTM.sum(dim=1, dtype=torch.float32).double().sum(dim=0)  # float32 over positions, then float64
    if excluded_BT is not None and lead < excluded_BT.shape[1]:
        b_n, t_n = torch.nonzero(excluded_BT[:, lead:], as_tuple=True)
        if len(b_n):
            sum_M -= a_BTM[b_n, t_n].double().sum(dim=0)
            t_BTM[b_n, t_n] = 0.0  # dropped
            n -= len(b_n)
    # bin index + 1 (0: a <= 0, dropped), then offset per unit; int32 and bincount: ~3x faster than int64
    idx_BTM = t_BTM.ceil_().clamp_(min=0.0, max=float(H)).to(torch.int32)
    del t_BTM
    idx_BTM += torch.arange(M, dtype=torch.int32, device=idx_BTM.device) * (H + 1)
    counts = torch.bincount(idx_BTM.view(-1), minlength=M * (H + 1))
    hist_MH += counts.view(M, H + 1)[:, 1:]
    return n


@dataclass
class Spectrum:
    """What `--strata` adds to a scan, for each row: one SlotTable per stratum (a seeded uniform
    sample of the sequences whose max lies in the stratum's interval of the unit's maximum) and
    the activation distribution (histogram relative to the maximum, sum, tokens counted)."""

    intervals: list[tuple[float, float]]
    tables: list[list[SlotTable]]  # [row][stratum]
    hist: torch.Tensor  # int64 [rows, M, HIST_BINS]
    sum: torch.Tensor  # float64 [rows, M]
    count: int = 0  # tokens counted in each row

    @classmethod
    def empty(cls, intervals: list[tuple[float, float]], n_rows: int, d_mlp: int, strata_k: int, d_model: int,
              dtype: torch.dtype, device="cpu", window: tuple[int, int] = (0, 0)) -> "Spectrum":
        tables = [[SlotTable.empty(d_mlp, strata_k, d_model, dtype, device, window) for _ in intervals]
                  for _ in range(n_rows)]
        return cls(list(intervals), tables, torch.zeros((n_rows, d_mlp, HIST_BINS), dtype=torch.int64, device=device),
                   torch.zeros((n_rows, d_mlp), dtype=torch.float64, device=device))

    @staticmethod
    def nbytes(n_strata: int, d_mlp: int, strata_k: int, d_model: int, itemsize: int,
               window: tuple[int, int] = (0, 0)) -> int:
        """Bytes `empty` allocates for one row."""
        return n_strata * SlotTable.nbytes(d_mlp, strata_k, d_model, itemsize, window) + d_mlp * (HIST_BINS + 1) * 8


@dataclass
class TopK:
    """Final per-neuron selection, ordered by activation descending (ties: sequence ascending)."""

    act: np.ndarray  # float32 [S, k], NaN where none
    seq: np.ndarray  # int32 [S, k], -1 where none
    pos: np.ndarray  # int32 [S, k], -1 where none
    x: np.ndarray  # [S, k, D], 0 where none
    win: np.ndarray | None = None  # float32 [S, k, W] activation windows, NaN where none


def rank_order(key_SN: np.ndarray, seq_SN: np.ndarray) -> np.ndarray:
    """Indices [S, N] that sort each row by key descending, then sequence index ascending."""
    return np.lexsort((seq_SN, -key_SN), axis=-1)


def merge_blocks(key_NSK: np.ndarray, act_NSK: np.ndarray, seq_NSK: np.ndarray, pos_NSK: np.ndarray,
                 x_NSKD: np.ndarray, k: int, win_NSKW: np.ndarray | None = None) -> TopK:
    """Exact merge of N blocks' slot tables for S neurons: the best k by (key desc, seq asc) of the
    union, then ordered by (activation desc, seq asc). Empty entries (key -inf) are dropped."""
    N, S, K = key_NSK.shape
    flat = lambda a: np.ascontiguousarray(np.moveaxis(a, 0, 1).reshape(S, N * K))  # noqa: E731
    key, act, seq = flat(key_NSK), flat(act_NSK), flat(seq_NSK).astype(np.int64)
    seq = np.where(seq < 0, NO_SEQ, seq)
    chosen = rank_order(key, seq)[:, :k]  # [S, k]
    valid = np.take_along_axis(key, chosen, axis=1) > -np.inf
    act_c = np.where(valid, np.take_along_axis(act, chosen, axis=1), -np.inf)
    seq_c = np.where(valid, np.take_along_axis(seq, chosen, axis=1), NO_SEQ)
    order = rank_order(act_c.astype(np.float64), seq_c)  # invalid (-inf) go last
    chosen, valid = np.take_along_axis(chosen, order, axis=1), np.take_along_axis(valid, order, axis=1)
    blk, slot = chosen // K, chosen % K
    rows = np.arange(S)[:, None]
    out_act = np.where(valid, act_NSK[blk, rows, slot], np.nan).astype(np.float32)
    out_seq = np.where(valid, seq_NSK[blk, rows, slot], -1).astype(np.int32)
    out_pos = np.where(valid, pos_NSK[blk, rows, slot], -1).astype(np.int32)
    out_x = x_NSKD[blk, rows, slot]
    out_x[~valid] = 0
    out_win = None
    if win_NSKW is not None:
        out_win = win_NSKW[blk, rows, slot].astype(np.float32)
        out_win[~valid] = np.nan
    return TopK(out_act, out_seq, out_pos, out_x, out_win)


def merge_strata(key_NSX: np.ndarray, act_NSX: np.ndarray, seq_NSX: np.ndarray, pos_NSX: np.ndarray,
                 x_NSXD: np.ndarray, win_NSXW: np.ndarray, n_strata: int, strata_k: int) -> tuple[TopK, np.ndarray]:
    """Exact merge of N blocks' strata tables (stratum after stratum along X = n_strata x strata_k):
    each stratum merged alone (merge_blocks), then laid out stratum after stratum. Returns the
    examples and int32 [S, X] their stratum (-1 where none)."""
    parts, strata = [], []
    for i in range(n_strata):
        sl = slice(i * strata_k, (i + 1) * strata_k)
        top = merge_blocks(key_NSX[:, :, sl], act_NSX[:, :, sl], seq_NSX[:, :, sl], pos_NSX[:, :, sl],
                           x_NSXD[:, :, sl], strata_k, win_NSXW[:, :, sl])
        parts.append(top)
        strata.append(np.where(top.seq >= 0, i, -1).astype(np.int32))
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts], axis=1)  # noqa: E731
    return TopK(cat("act"), cat("seq"), cat("pos"), cat("x"), cat("win")), np.concatenate(strata, axis=1)


@dataclass
class Distribution:
    """Each unit's activation distribution over the dataset's counted tokens."""

    hist: np.ndarray  # int64 [S, HIST_BINS] activations in (i/H x max, (i+1)/H x max]
    positive_fraction: np.ndarray  # float32 [S] share of tokens with activation > 0
    mean: np.ndarray  # float32 [S]
    max: np.ndarray  # float32 [S]


def merge_distribution(hist_NSH: np.ndarray, sum_NS: np.ndarray, count_N: np.ndarray, max_S: np.ndarray) -> Distribution:
    """Add up N blocks' histograms and sums (`add_distribution`) of S units."""
    hist = hist_NSH.sum(axis=0)
    n = int(count_N.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        positive = (hist.sum(axis=1) / n).astype(np.float32) if n else np.full(len(max_S), np.nan, np.float32)
        mean = (sum_NS.sum(axis=0) / n).astype(np.float32) if n else np.full(len(max_S), np.nan, np.float32)
    return Distribution(hist, positive, mean, np.where(np.isfinite(max_S), max_S, np.nan).astype(np.float32))


def neuron_embeddings(x_SKD: np.ndarray, w_ES: np.ndarray, dtype: str, chunk: int = 16) -> np.ndarray:
    """e[s, i] = [x[s, i] ; x[s, i] ; ...] ⊙ W[:, s]  ->  [S, k, E] in `dtype` (computed in float32).

    W holds the unit's input weight vectors stacked (E = n x D): W_in (E = D) for plain MLP neurons
    and SAE features, [W_gate ; W_in] (E = 2D) for gated MLP neurons, whose embedding is then
    [x ⊙ w_gate ; x ⊙ w_in]. `chunk` units at a time, each product into one float32 scratch that
    stays in cache and is cast into its part of the result (4x faster than whole-shard tensors)."""
    S, K, D = x_SKD.shape
    E = w_ES.shape[0]
    reps = E // D
    assert reps * D == E, f"weights of width {E} for x of width {D}"
    with torch_threads(1):  # torch casts to float16 ~1.7x faster than NumPy; small ops: one thread
        w_SE = torch.from_numpy(np.ascontiguousarray(w_ES.T, dtype=np.float32))
        x = torch.from_numpy(np.ascontiguousarray(x_SKD))
        out = torch.empty((S, K, E), dtype=getattr(torch, dtype))
        scratch = torch.empty((min(chunk, S), K, D), dtype=torch.float32)
        for a in range(0, S, chunk):
            b = min(a + chunk, S)
            x_cKD = x[a:b].float()
            for r in range(reps):
                part = scratch[: b - a]
                torch.mul(x_cKD, w_SE[a:b, None, r * D:(r + 1) * D], out=part)
                out[a:b, :, r * D:(r + 1) * D].copy_(part)
        return out.numpy()


# --- the forward pass -------------------------------------------------------------------------

@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with `n` torch threads. Many small memory-bound ops ran ~10x slower with 2
    threads than with 1 on our 2-core machines; big matrix products want them all."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def scan_sequences(bridge, tokens_SeqT: np.ndarray, seq_start: int, layers: list[int], k: int,
                   emb_dtype: torch.dtype, batch_size: int, device: str, mode: str = "top",
                   gmax_LM: torch.Tensor | None = None, fraction: float | None = None, seed: int = 0,
                   progress=None, window: tuple[int, int] = (0, 0), units: UnitSource | None = None,
                   excluded_ids: tuple[int, ...] = (), spectrum: Spectrum | None = None,
                   compiled: bool | None = None, timings: dict | None = None) -> list[SlotTable] | torch.Tensor:
    """Run the model over tokens (sequence indices seq_start + row) and return one SlotTable per
    layer, or for mode="max" the per-unit maximum [n_layers, M] (first pass of band selection).

    `units` (default: the model's MLP neurons) says which hooks feed each row and how the captured
    tensors become the activations and x (core.units); the forward stops after the last row's hooks.
    Tokens in `excluded_ids` (e.g. BOS, EOS) are never an example's max token. With `spectrum`
    (mode top or band; needs `gmax_LM`) the strata tables and distributions are filled too.
    `compiled` (default: on the CPU) runs the bookkeeping through core.scan_kernels, else torch.
    `timings`, where given, gets the seconds spent in the bookkeeping ("bookkeeping_seconds") and
    how full the x pools got: the most rows any pool held ("pool_rows_max", of "pool_cap") and how
    many pools reached their cap and dropped rows ("pools_full"). On the CPU a pool's memory is the
    rows it has held, so a run's memory grows with its tokens until its pools are full."""
    units = units or MLPNeurons.for_bridge(bridge)
    M, D = units.n_units, units.d_input
    need_x = mode != "max"
    # each pool sized at once for every token it can take (at most its cap): on the CPU untouched
    # rows cost nothing, and growing by doubling copied and faulted each layer's rows again (at 512
    # x 128 tokens on SmolLM2 the bookkeeping took 8.6-9.0 s this way against 9.3-9.8 s)
    rows = tokens_SeqT.size + 1 if need_x else None  # the maxima pass enters nothing
    tables = [SlotTable.empty(M, k, D, emb_dtype, device, window, initial_rows=rows) for _ in layers]
    gmax = torch.full((len(layers), M), -torch.inf, device=device)
    neurons = torch.arange(M, device=device)
    excluded = torch.tensor(sorted(excluded_ids), dtype=torch.int64, device=device) if excluded_ids else None
    if spectrum is not None:
        assert mode != "max" and gmax_LM is not None, "strata need each unit's maximum"
        for row in range(len(layers)):  # a token's x once per layer, whichever tables it enters
            XPool.share([tables[row], *spectrum.tables[row]], rows)
        scale_LM = torch.stack([histogram_scale(gmax_LM[row]) for row in range(len(layers))]).to(device)
    state: dict = {}
    spent = [0.0]  # seconds in the bookkeeping
    threads = torch.get_num_threads()  # the forward's

    def on_tap(row: int, layer: int, name: str, last: str):
        def fn(t: torch.Tensor) -> None:
            state["captured", row, name] = t
            if name == last:  # the row is complete: its activations (and x) now, with the forward's threads
                taps = units.taps(layer, need_x)
                captured = {n: state.pop(("captured", row, n)) for n in taps}
                post, x = units.read(captured, layer, need_x)
                del captured
                t0 = time.perf_counter()
                if compiled and threads > 1:
                    # the forward's OpenMP workers would spin for milliseconds on the cores the
                    # kernels' other threads need (`over_units`); the forward's next operation
                    # starts them again (bookkeeping -37 %, the forward's speed unchanged)
                    release_openmp_threads()
                bookkeeping(row, layer, post, x)  # now: this row's tensors are freed before the next runs
                spent[0] += time.perf_counter() - t0
        return fn

    def bookkeeping(row: int, layer: int, post: torch.Tensor, x: torch.Tensor | None) -> None:
        """One row's candidates into its table: many small memory-bound ops, run on one thread
        (with 2 threads they ran ~10x slower here); the forward keeps all its threads. Done inside
        the forward, layer by layer: holding every layer's activations until the end of the
        forward made the forward itself ~9 % slower (its buffers could not be reused)."""
        with torch_threads(1):
            if compiled:
                return bookkeeping_compiled(row, layer, post, x)
            val = batch_candidates(post, state["excluded"])
            if mode == "max":
                gmax[row] = torch.maximum(gmax[row], val.max(dim=0).values)
                return
            if mode == "top":
                key = val
            else:
                key = band_keys(val, gmax_LM[row].to(device), fraction, seed, layer, neurons, state["seq"])
            update_slots(tables[row], key, val, post, state["seq"], x, big_threads=threads,
                         excluded_BT=state["excluded"])
            if spectrum is not None:
                keys = strata_keys(val, gmax_LM[row].to(device), spectrum.intervals, seed, layer, neurons, state["seq"])
                for table, key in zip(spectrum.tables[row], keys):
                    update_slots(table, key, val, post, state["seq"], x, big_threads=threads,
                                 excluded_BT=state["excluded"])
                counted = add_distribution(spectrum.hist[row], spectrum.sum[row], post, scale_LM[row], state["excluded"])
                if row == 0:
                    spectrum.count += counted

    def bookkeeping_compiled(row: int, layer: int, post: torch.Tensor, x: torch.Tensor | None) -> None:
        """`bookkeeping` through core.scan_kernels (the CPU): one pass over the activations finds
        each sequence's max and its position (and fills the histogram), then each table merges;
        the passes over units run on as many threads as the forward's (`over_units`)."""
        post_BTM = post.float().contiguous().numpy()  # a copy only for a reduced-precision forward
        B, T, _ = post_BTM.shape
        excluded_BT = state["excluded"]
        max_BM = np.empty((B, M), dtype=np.float32)
        arg_BM = np.empty((B, M), dtype=np.int64)
        if spectrum is not None:
            hist_HM, sum_M, scale_M = np.zeros((HIST_BINS, M), np.int32), spectrum.sum[row].numpy(), scale_LM[row].numpy()
        else:
            hist_HM, sum_M, scale_M = np.zeros((1, 1), np.int32), np.zeros(1), np.zeros(1, np.float32)
        over_units(threads, _kernels().sequence_maxima, M, post_BTM,
                   np.zeros((B, T), bool) if excluded_BT is None else excluded_BT.numpy(),
                   scale_M, spectrum is not None, max_BM, arg_BM, hist_HM, sum_M)
        val = torch.from_numpy(max_BM)
        if mode == "max":
            gmax[row] = torch.maximum(gmax[row], val.max(dim=0).values)
            return
        seq_B = state["seq"].numpy()
        x_ND = x.reshape(B * T, -1).to(emb_dtype)  # once for every table of the row
        tables[row].pool.reserve(B * T)  # every token of the batch fits: the row's tables share its rows
        row_of_tok = np.full(B * T, -1, dtype=np.int64)
        if mode == "top":
            key_BM = max_BM.astype(np.float64)
        else:
            key_BM = band_keys(val, gmax_LM[row], fraction, seed, layer, neurons, state["seq"]).numpy()
        update_slots_compiled(tables[row], key_BM, max_BM, arg_BM, seq_B, post_BTM, x_ND, row_of_tok, threads)
        if spectrum is not None:
            keys = strata_keys_compiled(max_BM, gmax_LM[row].numpy(), spectrum.intervals, seed, layer, seq_B)
            for table, key in zip(spectrum.tables[row], keys):
                update_slots_compiled(table, key, max_BM, arg_BM, seq_B, post_BTM, x_ND, row_of_tok, threads)
            spectrum.hist[row] += torch.from_numpy(hist_HM.T)
            if row == 0:
                spectrum.count += B * T - (0 if excluded_BT is None else int(excluded_BT.sum()))

    compiled = torch.device(device).type == "cpu" if compiled is None else compiled
    hooks = []
    for row, layer in enumerate(layers):
        taps = units.taps(layer, need_x)
        hooks += [(name, on_tap(row, layer, name, taps[-1])) for name in taps]
    n = tokens_SeqT.shape[0]
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            ids = torch.from_numpy(tokens_SeqT[start:start + batch_size].astype(np.int64)).to(device)
            state["seq"] = torch.arange(seq_start + start, seq_start + start + ids.shape[0], device=device)
            mask_BT = torch.isin(ids, excluded) if excluded is not None else None
            state["excluded"] = mask_BT if mask_BT is not None and bool(mask_BT.any()) else None
            t0 = time.perf_counter()
            run_until(bridge, ids, hooks)
            if progress is not None:
                progress(ids.shape[0], time.perf_counter() - t0)
    if timings is not None:
        timings["bookkeeping_seconds"] = timings.get("bookkeeping_seconds", 0.0) + spent[0]
        if need_x:
            pools = [t.pool for t in tables]  # one per layer (its strata tables share it)
            timings.update(pool_rows_max=max(p.peak_rows for p in pools), pool_cap=max(p.cap for p in pools),
                           pools_full=sum(p.compactions > 0 for p in pools))
    return gmax.cpu() if mode == "max" else tables
