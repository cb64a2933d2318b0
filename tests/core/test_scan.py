"""The scan's streaming top-k against brute force over all activations, for both selections."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from neuron_embeddings.core.models import load_model
from neuron_embeddings.core.scan import (MIN_SPLIT_UNITS, SlotTable, XPool, band_priority, histogram_scale, merge_blocks,
                                         neuron_embeddings, over_units, rank_order, scan_sequences, update_slots,
                                         torch_threads, update_slots_compiled)
from neuron_embeddings.core.scan_kernels import sequence_maxima
from tests.threads import in_thread, native_threads, needs_openmp_pool, parallel_op


def _oracle_order(key: np.ndarray, seq: np.ndarray) -> np.ndarray:
    return np.lexsort((seq, -key))


BOOKKEEPING = [pytest.param(True, id="compiled"), pytest.param(False, id="torch")]  # the CPU's and other devices'


def _update(table, key, post, seq, x, compiled):
    """One batch into the table, by either bookkeeping path (candidates: the per-sequence max)."""
    np.testing.assert_array_equal(post.max(axis=1), key)
    return _update_keyed(table, key, post, seq, x, compiled)


@pytest.mark.parametrize("compiled", BOOKKEEPING)
@pytest.mark.parametrize("pool_rows,initial_rows", [(None, None), (None, 2), (7 * 5 + 2, None), (3, None)])
def test_update_slots_matches_sorting_the_union(pool_rows, initial_rows, compiled):
    """Default pool; one that starts at 2 rows and doubles; one compacted often; one grown past its cap."""
    rng = np.random.default_rng(0)
    M, k, D, T = 7, 5, 3, 4
    table = SlotTable.empty(M, k, D, torch.float32, pool_rows=pool_rows, initial_rows=initial_rows)
    all_key, all_seq, all_x, all_pos = [], [], [], []
    seq0 = 0
    for B in (2, 6, 1, 9, 3):
        post = rng.integers(0, 6, size=(B, T, M)).astype(np.float32)  # many ties
        key = post.max(axis=1)
        pos = post.argmax(axis=1)  # first max position
        x = rng.normal(size=(B, T, D)).astype(np.float32)
        seq = np.arange(seq0, seq0 + B)
        seq0 += B
        _update(table, key, post, seq, x, compiled)
        all_pos.append(pos)
        all_key.append(key)
        all_x.append(x)
        all_seq.append(np.broadcast_to(seq[:, None], (B, M)))
        for m in range(M):
            kk = np.concatenate([a[:, m] for a in all_key])
            ss = np.concatenate([a[:, m] for a in all_seq])
            want = ss[_oracle_order(kk, ss)][:k].tolist()  # in rank order: key desc, sequence asc
            got = [v for v in table.seq[m].tolist() if v != np.iinfo(np.int64).max]
            assert got == want
        # the table stays in rank order, and x travels with its entry
        for m in range(M):
            kk = table.key[m].numpy()
            assert np.all(np.diff(kk[np.isfinite(kk)]) <= 0)
        xs = np.concatenate(all_x)  # [S, T, D]
        ps = np.concatenate(all_pos)  # [S, M]
        for m in range(M):
            for i in range(k):
                sq = int(table.seq[m, i])
                if sq != np.iinfo(np.int64).max:
                    assert int(table.pos[m, i]) == ps[sq, m]
                    np.testing.assert_array_equal(table.x[m, table.slot[m, i]].numpy(),
                                                  xs[sq, int(table.pos[m, i])])
                else:  # an empty slot's x is the zero vector
                    assert not table.x[m, table.slot[m, i]].any()
        # compacted: no more rows than those referred to and room for a batch (the compiled
        # path makes room for all of a batch's tokens before it adds any)
        most = M * k + 1 + max(b * T for b in (2, 6, 1, 9, 3)[:len(all_key)])
        if pool_rows is not None and pool_rows > 3:
            assert table.pool.used <= most
        assert table.pool.data.shape[0] <= max(table.pool.cap, most)
    if initial_rows is not None:
        assert 2 < table.pool.data.shape[0] <= table.pool.cap  # it grew, within its cap


def test_rank_order_breaks_ties_by_sequence():
    key = np.array([[1.0, 2.0, 2.0, 1.0]])
    seq = np.array([[5, 9, 3, 1]])
    assert rank_order(key, seq).tolist() == [[2, 1, 3, 0]]


def _all_activations(lm, tokens):
    names = []
    for l in range(lm.n_layers):
        names += [f"blocks.{l}.mlp.hook_in", f"blocks.{l}.mlp.hook_post"]
    with torch.inference_mode():
        _, cache = lm.bridge.run_with_cache(torch.from_numpy(tokens.astype(np.int64)),
                                            names_filter=lambda n: n in names)
    return ({l: cache[f"blocks.{l}.mlp.hook_in"].numpy() for l in range(lm.n_layers)},
            {l: cache[f"blocks.{l}.mlp.hook_post"].numpy() for l in range(lm.n_layers)})


def _scan_and_merge(lm, tokens, layers, k, blocks, batch, **kw):
    """Scan in `blocks` blocks with `batch`, merge: per layer a TopK."""
    edges = np.linspace(0, len(tokens), blocks + 1).round().astype(int)
    parts = [scan_sequences(lm.bridge, tokens[a:b], int(a), layers, k, torch.float32, batch, "cpu", **kw)
             for a, b in zip(edges[:-1], edges[1:])]
    out = []
    for row in range(len(layers)):
        def stack(name, row=row):
            arrs = [(p[row].x if name == "x" else p[row].by_slot(name)).numpy() for p in parts]
            return np.stack(arrs)
        seq = np.where(stack("seq") == np.iinfo(np.int64).max, -1, stack("seq"))
        out.append(merge_blocks(stack("key"), stack("act"), seq, stack("pos"), stack("x"), k))
    return out


@pytest.fixture(scope="module")
def scanned(tiny_gpt2):
    lm = load_model(tiny_gpt2, "cpu")
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, lm.bridge.cfg.d_vocab, size=(37, 24)).astype(np.int32)
    xs, posts = _all_activations(lm, tokens)
    return lm, tokens, xs, posts


@pytest.mark.parametrize("compiled", BOOKKEEPING)
def test_top_selection_equals_brute_force(scanned, compiled):
    lm, tokens, xs, posts = scanned
    k = 6
    tops = _scan_and_merge(lm, tokens, [0, 1], k, blocks=1, batch=16, compiled=compiled)
    for row, layer in enumerate([0, 1]):
        mx, arg = posts[layer].max(axis=1), posts[layer].argmax(axis=1)  # [S, M]
        for j in range(lm.d_mlp):
            order = np.lexsort((np.arange(len(mx)), -mx[:, j]))[:k]
            np.testing.assert_array_equal(tops[row].seq[j], order)
            np.testing.assert_array_equal(tops[row].pos[j], arg[order, j])
            np.testing.assert_allclose(tops[row].act[j], mx[order, j], rtol=1e-6)
            np.testing.assert_allclose(tops[row].x[j], xs[layer][order, arg[order, j]], rtol=1e-6)


@pytest.mark.parametrize("compiled", BOOKKEEPING)
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_band_selection_equals_brute_force(scanned, fraction, compiled):
    lm, tokens, xs, posts = scanned
    k, seed = 5, 7
    gmax = torch.from_numpy(np.stack([posts[l].max(axis=(0, 1)) for l in (0, 1)]))
    # the first pass, as the pipeline does it, must find the same maxima
    g2 = scan_sequences(lm.bridge, tokens, 0, [0, 1], k, torch.float32, 8, "cpu", mode="max", compiled=compiled)
    np.testing.assert_allclose(g2.numpy(), gmax.numpy(), rtol=1e-6)
    tops = _scan_and_merge(lm, tokens, [0, 1], k, blocks=3, batch=5, mode="band", gmax_LM=gmax,
                           fraction=fraction, seed=seed, compiled=compiled)
    S = len(tokens)
    for row, layer in enumerate([0, 1]):
        mx, arg = posts[layer].max(axis=1), posts[layer].argmax(axis=1)
        prio = band_priority(seed, layer, torch.arange(lm.d_mlp), torch.arange(S)).numpy()  # [S, M]
        for j in range(lm.d_mlp):
            eligible = np.nonzero(mx[:, j] >= fraction * float(gmax[row, j]))[0]
            sample = eligible[np.lexsort((eligible, prio[eligible, j]))][:k]
            want = sample[np.lexsort((sample, -mx[sample, j]))]
            n = len(want)
            np.testing.assert_array_equal(tops[row].seq[j][:n], want)
            assert np.all(tops[row].seq[j][n:] == -1) and np.all(np.isnan(tops[row].act[j][n:]))
            np.testing.assert_array_equal(tops[row].pos[j][:n], arg[want, j])


def test_band_priority_is_uniform_and_sharding_free():
    p = band_priority(3, 2, torch.arange(200), torch.arange(500)).numpy()
    assert 0 <= p.min() and p.max() < 1 and abs(p.mean() - 0.5) < 0.01
    part = band_priority(3, 2, torch.arange(200), torch.arange(100, 150)).numpy()
    np.testing.assert_array_equal(part, p[100:150])


@pytest.mark.parametrize("blocks,batch,compiled", [(2, 3, True), (4, 7, True), (37, 1, True), (4, 7, False)])
def test_same_selection_for_any_block_and_batch_size(scanned, blocks, batch, compiled):
    """Any block and batch size, either bookkeeping path: the same selection as one block of 16
    through the compiled path."""
    lm, tokens, _, _ = scanned
    ref = _scan_and_merge(lm, tokens, [1], 8, blocks=1, batch=16)[0]
    got = _scan_and_merge(lm, tokens, [1], 8, blocks=blocks, batch=batch, compiled=compiled)[0]
    for name in ("act", "seq", "pos", "x"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name))


def test_scan_stops_after_last_requested_layer(scanned):
    lm, tokens, _, _ = scanned
    seen = []
    h = lm.bridge.blocks[1].mlp.hook_post if hasattr(lm.bridge.blocks[1].mlp, "hook_post") else None
    if h is None:
        pytest.skip("bridge exposes no hook module to observe")
    h.add_hook(lambda t, hook: seen.append(1))
    try:
        scan_sequences(lm.bridge, tokens[:4], 0, [0], 3, torch.float32, 4, "cpu")
    finally:
        lm.bridge.reset_hooks()
    assert seen == []  # layer 1 never ran


@pytest.mark.parametrize("reps,dtype", [(1, "float32"), (2, "float32"), (2, "float16")])
def test_embedding_is_elementwise_product(reps, dtype):
    """Plain (W_in) and gated ([W_gate ; W_in]) units, over several chunks of units and a partial
    one: each unit's x times its weights, computed in float32, then cast."""
    rng = np.random.default_rng(0)
    S, K, D = 37, 4, 5
    x = rng.normal(size=(S, K, D)).astype(np.float16)
    w = rng.normal(size=(reps * D, S)).astype(np.float32)
    e = neuron_embeddings(x, w, dtype, chunk=16)
    assert e.shape == (S, K, reps * D) and e.dtype == np.dtype(dtype)
    for s in range(S):
        want = np.concatenate([x[s].astype(np.float32)] * reps, axis=1) * w[:, s][None, :]
        np.testing.assert_array_equal(e[s], want.astype(dtype))


@pytest.mark.parametrize("pattern", ["bos", "bos+others", "middle-column", "whole-row", "everything", "nothing"])
def test_batch_candidates_equal_the_masked_max(pattern) -> None:
    """The per-sequence max over non-excluded positions equals a plain masked max, whatever the
    excluded positions (the fast path skips a BOS column by a view and masks only other rows)."""
    from neuron_embeddings.core.scan import batch_candidates

    gen = torch.Generator().manual_seed(0)
    post_BTM = torch.randn(6, 9, 5, generator=gen)
    ex_BT = torch.zeros(6, 9, dtype=torch.bool)
    if pattern.startswith("bos"):
        ex_BT[:, 0] = True
    if pattern == "bos+others":
        ex_BT[2, 4] = ex_BT[5, 8] = True
    if pattern == "middle-column":
        ex_BT[:, 3] = True
    if pattern == "whole-row":
        ex_BT[1] = True
    if pattern == "everything":
        ex_BT[:] = True
    want_BM = post_BTM.masked_fill(ex_BT[:, :, None], -torch.inf).amax(dim=1)
    torch.testing.assert_close(batch_candidates(post_BTM, ex_BT), want_BM, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_slot_table_nbytes_is_what_a_full_table_holds(dtype):
    """nbytes (what the run checks fits before it starts) is a table's memory with its pool at its
    cap; an empty table holds less."""
    def held(t):
        return sum(getattr(t, f).nbytes for f in ("key", "act", "seq", "pos", "slot", "xref", "win")) + t.pool.data.nbytes

    full = SlotTable.empty(300, 7, 24, dtype, window=(3, 2), pool_rows=SlotTable.default_pool_rows(300, 7))
    assert SlotTable.nbytes(300, 7, 24, dtype.itemsize, (3, 2)) == held(full)
    t = SlotTable.empty(300, 7, 24, dtype, window=(3, 2))
    assert t.pool.cap == full.pool.cap and held(t) < SlotTable.nbytes(300, 7, 24, dtype.itemsize, (3, 2))
    t.pool.reserve(full.pool.cap - 1)  # room for the cap: the pool grows to it, and no further
    assert t.pool.data.shape == full.pool.data.shape


def test_bookkeeping_split_over_threads_equals_one_thread():
    """The kernels run on several threads over disjoint ranges of units (`over_units`, the scan's
    setting with the forward's threads): maxima, positions, histogram, sums and every table field
    equal one thread's, bit for bit, batch after batch."""
    rng = np.random.default_rng(3)
    B, T, M, D, k = 6, 9, 3 * MIN_SPLIT_UNITS + 5, 4, 3
    excluded = np.zeros((B, T), bool)
    excluded[:, 0] = True
    scale = histogram_scale(torch.full((M,), 3.0)).numpy()
    tables = {parts: SlotTable.empty(M, k, D, torch.float32, "cpu", (2, 2)) for parts in (1, 3)}
    for i in range(4):
        post = rng.standard_normal((B, T, M)).astype(np.float32)
        x = torch.from_numpy(rng.standard_normal((B * T, D)).astype(np.float32))
        seq = np.arange(i * B, (i + 1) * B, dtype=np.int64)
        got = {}
        for parts, table in tables.items():
            out = (np.empty((B, M), np.float32), np.empty((B, M), np.int64), np.zeros((20, M), np.int32), np.zeros(M))
            ranges = over_units(parts, sequence_maxima, M, post, excluded, scale, True, *out)
            assert len(ranges) == parts
            n = update_slots_compiled(table, out[0].astype(np.float64), out[0], out[1], seq, post, x, parts=parts)
            got[parts] = (*out, n)
        for a, b in zip(got[1], got[3]):
            np.testing.assert_array_equal(a, b)
        assert got[1][2].sum() == (post[:, 1:] > 0).sum()  # each positive activation in one bin
    one, split = tables[1], tables[3]
    for name in ("key", "act", "seq", "pos"):
        torch.testing.assert_close(getattr(one, name), getattr(split, name), rtol=0, atol=0)
    for name in ("x", "win"):
        field = lambda t: (t.x if name == "x" else t.win)  # noqa: E731
        ranked = lambda t: torch.gather(field(t), 1, t.slot[..., None].expand(*t.slot.shape, field(t).shape[-1]))  # noqa: E731
        torch.testing.assert_close(ranked(one), ranked(split), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("mode", ["top", "band"])
def test_compiled_and_torch_bookkeeping_give_the_same_tables(scanned, mode):
    """Entry for entry (rank order), with activation windows and excluded tokens: the compiled
    bookkeeping (the CPU's) equals the torch one (other devices')."""
    lm, tokens, _, posts = scanned
    tokens = tokens.copy()
    tokens[:, 0] = 3  # a BOS-like first token, and one further on
    tokens[5, 9] = 3
    gmax = torch.from_numpy(np.stack([posts[layer].max(axis=(0, 1)) for layer in (0, 1)]))
    kw = dict(mode=mode, gmax_LM=gmax, fraction=0.4, seed=5, window=(3, 2), excluded_ids=(3,))
    timings = {}
    got, want = (scan_sequences(lm.bridge, tokens, 0, [0, 1], 5, torch.float32, 6, "cpu", compiled=c, timings=t, **kw)
                 for c, t in ((True, timings), (False, None)))
    # the pools' rows as reported: below their cap, each holds a row per token that entered (at least
    # the distinct entries in its table, at most every token), none dropped
    assert timings["pools_full"] == 0 and timings["pool_rows_max"] == max(g.pool.used for g in got)
    entered = max(len(set(zip(g.seq[g.seq < np.iinfo(np.int64).max].tolist(), g.pos[g.pos >= 0].tolist())))
                  for g in got)
    assert 1 + entered <= timings["pool_rows_max"] <= 1 + tokens.size < timings["pool_cap"]
    for g, w in zip(got, want):
        for name in ("key", "act", "seq", "pos"):
            torch.testing.assert_close(getattr(g, name), getattr(w, name), rtol=0, atol=0, equal_nan=True)
        assert (g.seq < np.iinfo(np.int64).max).sum() > g.seq.numel() // 2  # mostly full tables
        for name in ("x", "win"):
            ranked = lambda t, f: torch.gather(f, 1, t.slot.view(*t.slot.shape, *[1] * (f.dim() - 2)).expand(  # noqa: E731
                *t.slot.shape, *f.shape[2:]))
            field = lambda t: t.x if name == "x" else t.win  # noqa: E731
            torch.testing.assert_close(ranked(g, field(g)), ranked(w, field(w)), rtol=0, atol=0, equal_nan=True)
        assert torch.isnan(g.win).any() and torch.isfinite(g.win).any()  # windows reach past the ends


@pytest.mark.parametrize("compiled", BOOKKEEPING)
def test_tables_sharing_a_pool_keep_their_own_x_through_compaction(compiled):
    """Three tables of different k on one pool whose cap forces compaction every few batches (as the
    scan shares one between a layer's top-k and strata tables, storing each token once per batch on
    the compiled path): each keeps the x of its own entries, as the same tables on pools of their own do."""
    rng = np.random.default_rng(3)
    M, D, T, ks = 6, 4, 5, (4, 2, 3)
    shared = [SlotTable.empty(M, k, D, torch.float32, pool_rows=M * k + 12) for k in ks]
    pool = XPool.share(shared)  # cap M * 9 + 36 rows, a batch up to 35 tokens: compacted every few batches
    alone = [SlotTable.empty(M, k, D, torch.float32) for k in ks]
    seq0, rows_added, most = 0, 0, 1
    for B in (3, 5, 2, 6, 4, 7) * 4:
        post = rng.normal(size=(B, T, M)).astype(np.float32)
        x = rng.normal(size=(B, T, D)).astype(np.float32)
        seq = np.arange(seq0, seq0 + B)
        seq0 += B
        row_of_tok = None
        if compiled:
            pool.reserve(B * T)
            row_of_tok = np.full(B * T, -1, dtype=np.int64)
        used = pool.used
        for i, (a, b) in enumerate(zip(shared, alone)):
            key = post.max(axis=1) if i == 0 else -rng.random((B, M))  # a top-k table and two samples
            _update_keyed(a, key, post, seq, x, compiled, row_of_tok)
            _update_keyed(b, key, post, seq, x, compiled)
            most = max(most, pool.used)
        rows_added += pool.used - used
        for a, b in zip(shared, alone):
            torch.testing.assert_close(a.seq, b.seq, rtol=0, atol=0)
            ranked = lambda t: t.x[torch.arange(M)[:, None], t.slot]  # noqa: E731
            torch.testing.assert_close(ranked(a), ranked(b), rtol=0, atol=0)
        if compiled:  # each token of the batch stored once, whichever tables it entered
            assert pool.used - used <= B * T
    assert pool.compactions >= 2 and pool.data.shape[0] <= pool.cap
    assert pool.peak_rows == most > pool.used and most <= pool.cap  # what the scan reports as its pools' memory
    assert all(t.pool is pool for t in shared)


def _update_keyed(table, key, post, seq, x, compiled, row_of_tok=None):
    """A batch into the table with the given keys (act: the per-sequence max)."""
    B, T, M = post.shape
    if not compiled:
        return update_slots(table, torch.from_numpy(key), torch.from_numpy(post.max(axis=1)), torch.from_numpy(post),
                            torch.from_numpy(seq), torch.from_numpy(x))
    max_BM, arg_BM = np.empty((B, M), np.float32), np.empty((B, M), np.int64)
    sequence_maxima(post, np.zeros((B, T), bool), np.zeros(1, np.float32), False, max_BM, arg_BM,
                    np.zeros((1, 1), np.int32), np.zeros(1), 0, M)
    return update_slots_compiled(table, key.astype(np.float64), max_BM, arg_BM, seq.astype(np.int64), post,
                                 torch.from_numpy(x).reshape(B * T, -1), row_of_tok)


@needs_openmp_pool
def test_the_forwards_openmp_workers_end_before_each_bookkeeping(scanned, monkeypatch):
    """On the CPU the forward's OpenMP workers would spin on the cores the kernels' other threads
    need: before every layer batch's bookkeeping they are ended (here started on purpose by a
    parallel operation first, so their end is seen), and none is alive while the kernels run."""
    import neuron_embeddings.core.scan as scan_mod
    import neuron_embeddings.core.scan_kernels as kernels

    lm, tokens, _, _ = scanned
    events, real_release, real_maxima = [], scan_mod.release_openmp_threads, kernels.sequence_maxima

    def release():
        parallel_op()  # this thread's workers, alive now whatever the tiny forward did
        alive = native_threads() - base[0]
        assert real_release() is True
        events.append(("release", len(alive), len(native_threads() - base[0])))
        return True

    def maxima(*args):
        events.append(("maxima", len(native_threads() - base[0])))
        return real_maxima(*args)

    monkeypatch.setattr(scan_mod, "release_openmp_threads", release)
    monkeypatch.setattr(kernels, "sequence_maxima", maxima)
    base = [set()]

    def scan():
        base[0] = native_threads()  # before this thread ran anything parallel
        with torch_threads(2):
            scan_sequences(lm.bridge, tokens, 0, [0, 1], 4, torch.float32, 16, "cpu", compiled=True)

    in_thread(scan)
    batches = -(-len(tokens) // 16)
    releases = [e for e in events if e[0] == "release"]
    assert len(releases) == 2 * batches  # one per layer batch
    assert all(alive >= 1 and left == 0 for _, alive, left in releases), releases
    assert [e[0] for e in events if e[0] != "maxima" or e[1] == 0] == [e[0] for e in events]  # no worker alive in the kernels
    assert sum(e[0] == "maxima" for e in events) >= 2 * batches
