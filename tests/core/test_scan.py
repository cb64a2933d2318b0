"""The scan's streaming top-k against brute force over all activations, for both selections."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from neuron_embeddings.core.models import load_model
from neuron_embeddings.core.scan import (SlotTable, band_priority, merge_blocks, neuron_embeddings, rank_order, scan_sequences,
                        update_slots)


def _oracle_order(key: np.ndarray, seq: np.ndarray) -> np.ndarray:
    return np.lexsort((seq, -key))


@pytest.mark.parametrize("pool_rows", [None, 7 * 5 + 2, 3])  # default; pool compacted often; pool grown
def test_update_slots_matches_sorting_the_union(pool_rows):
    rng = np.random.default_rng(0)
    M, k, D, T = 7, 5, 3, 4
    table = SlotTable.empty(M, k, D, torch.float32, pool_rows=pool_rows)
    all_key, all_seq, all_x, all_pos = [], [], [], []
    seq0 = 0
    for B in (2, 6, 1, 9, 3):
        post = rng.integers(0, 6, size=(B, T, M)).astype(np.float32)  # many ties
        key = post.max(axis=1)
        pos = post.argmax(axis=1)  # first max position
        x = rng.normal(size=(B, T, D)).astype(np.float32)
        seq = np.arange(seq0, seq0 + B)
        seq0 += B
        update_slots(table, torch.from_numpy(key), torch.from_numpy(key), torch.from_numpy(post),
                     torch.from_numpy(seq), torch.from_numpy(x))
        all_pos.append(pos)
        all_key.append(key)
        all_x.append(x)
        all_seq.append(np.broadcast_to(seq[:, None], (B, M)))
        for m in range(M):
            kk = np.concatenate([a[:, m] for a in all_key])
            ss = np.concatenate([a[:, m] for a in all_seq])
            want = sorted(ss[_oracle_order(kk, ss)][:k].tolist())
            got = sorted(v for v in table.seq[m].tolist() if v != np.iinfo(np.int64).max)
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
        if pool_rows is not None and pool_rows > 3:  # compacted: no row beyond those referred to
            assert table.used <= M * k + 1 + B * T


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


def test_top_selection_equals_brute_force(scanned):
    lm, tokens, xs, posts = scanned
    k = 6
    tops = _scan_and_merge(lm, tokens, [0, 1], k, blocks=1, batch=16)
    for row, layer in enumerate([0, 1]):
        mx, arg = posts[layer].max(axis=1), posts[layer].argmax(axis=1)  # [S, M]
        for j in range(lm.d_mlp):
            order = np.lexsort((np.arange(len(mx)), -mx[:, j]))[:k]
            np.testing.assert_array_equal(tops[row].seq[j], order)
            np.testing.assert_array_equal(tops[row].pos[j], arg[order, j])
            np.testing.assert_allclose(tops[row].act[j], mx[order, j], rtol=1e-6)
            np.testing.assert_allclose(tops[row].x[j], xs[layer][order, arg[order, j]], rtol=1e-6)


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_band_selection_equals_brute_force(scanned, fraction):
    lm, tokens, xs, posts = scanned
    k, seed = 5, 7
    gmax = torch.from_numpy(np.stack([posts[l].max(axis=(0, 1)) for l in (0, 1)]))
    # the first pass, as the pipeline does it, must find the same maxima
    g2 = scan_sequences(lm.bridge, tokens, 0, [0, 1], k, torch.float32, 8, "cpu", mode="max")
    np.testing.assert_allclose(g2.numpy(), gmax.numpy(), rtol=1e-6)
    tops = _scan_and_merge(lm, tokens, [0, 1], k, blocks=3, batch=5, mode="band", gmax_LM=gmax,
                           fraction=fraction, seed=seed)
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


@pytest.mark.parametrize("blocks,batch", [(2, 3), (4, 7), (37, 1)])
def test_same_selection_for_any_block_and_batch_size(scanned, blocks, batch):
    lm, tokens, _, _ = scanned
    ref = _scan_and_merge(lm, tokens, [1], 8, blocks=1, batch=16)[0]
    got = _scan_and_merge(lm, tokens, [1], 8, blocks=blocks, batch=batch)[0]
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


def test_embedding_is_elementwise_product():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 5)).astype(np.float32)
    w = rng.normal(size=(5, 3)).astype(np.float32)
    e = neuron_embeddings(x, w, "float32")
    for s in range(3):
        np.testing.assert_allclose(e[s], x[s] * w[:, s][None, :], rtol=1e-6)


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
def test_slot_table_nbytes_is_what_empty_allocates(dtype):
    t = SlotTable.empty(300, 7, 24, dtype, window=(3, 2))
    allocated = sum(getattr(t, f).nbytes for f in ("key", "act", "seq", "pos", "slot", "xref", "pool", "win"))
    assert SlotTable.nbytes(300, 7, 24, dtype.itemsize, (3, 2)) == allocated
