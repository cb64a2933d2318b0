"""Strata and activation distributions (--strata) against brute force over all activations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

from neuron_embeddings.core.cluster import cluster_shard, cluster_spectrum
from neuron_embeddings.core.models import load_model
from neuron_embeddings.core.scan import (STRATA_SALT, Spectrum, band_priority, merge_distribution, merge_strata,
                                         scan_sequences, strata_keys, strata_keys_compiled)
from neuron_embeddings.core.settings import HIST_BINS, strata_intervals

FRACTIONS = (0.6, 0.3, 0.0)
LAYERS = [0, 1]


def _posts(lm, tokens):
    names = [f"blocks.{layer}.mlp.hook_post" for layer in LAYERS]
    with torch.inference_mode():
        _, cache = lm.bridge.run_with_cache(torch.from_numpy(tokens.astype(np.int64)), names_filter=lambda n: n in names)
    return {layer: cache[f"blocks.{layer}.mlp.hook_post"].numpy() for layer in LAYERS}


def _scan(lm, tokens, gmax, blocks, batch, k, seed, excluded_ids=(), compiled=None):
    """Scan in `blocks` blocks with strata; per row the merged strata, their stratum, and the distribution."""
    edges = np.linspace(0, len(tokens), blocks + 1).round().astype(int)
    specs = []
    for a, b in zip(edges[:-1], edges[1:]):
        spec = Spectrum.empty(strata_intervals(FRACTIONS), len(LAYERS), lm.d_mlp, k, lm.d_model, torch.float32)
        scan_sequences(lm.bridge, tokens[a:b], int(a), LAYERS, 4, torch.float32, batch, "cpu", gmax_LM=gmax,
                       seed=seed, spectrum=spec, excluded_ids=excluded_ids, compiled=compiled)
        specs.append(spec)
    out = []
    for row in range(len(LAYERS)):
        def stack(name, row=row):
            arrs = [np.concatenate([(t.x if name == "x" else t.by_slot(name)).numpy() for t in s.tables[row]], axis=1)
                    for s in specs]
            return np.stack(arrs)
        seq = np.where(stack("seq") == np.iinfo(np.int64).max, -1, stack("seq"))
        win = np.full(stack("act").shape + (1,), np.nan, dtype=np.float32)
        top, stratum = merge_strata(stack("key"), stack("act"), seq, stack("pos"), stack("x"), win, len(FRACTIONS), k)
        dist = merge_distribution(np.stack([s.hist[row].numpy() for s in specs]),
                                  np.stack([s.sum[row].numpy() for s in specs]),
                                  np.array([s.count for s in specs]), gmax[row].numpy())
        out.append((top, stratum, dist))
    return out


@pytest.fixture(scope="module")
def scanned(tiny_gpt2):
    lm = load_model(tiny_gpt2, "cpu")
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, lm.bridge.cfg.d_vocab, size=(41, 20)).astype(np.int32)
    posts = _posts(lm, tokens)
    gmax = torch.from_numpy(np.stack([posts[layer].max(axis=(0, 1)) for layer in LAYERS]))
    return lm, tokens, posts, gmax


BOOKKEEPING = [pytest.param(True, id="compiled"), pytest.param(False, id="torch")]  # the CPU's and other devices'


@pytest.mark.parametrize("compiled", BOOKKEEPING)
@pytest.mark.parametrize("blocks,batch", [(1, 16), (3, 5)])
def test_strata_equal_brute_force(scanned, blocks, batch, compiled):
    lm, tokens, posts, gmax = scanned
    k, seed = 3, 11
    got = _scan(lm, tokens, gmax, blocks, batch, k, seed, compiled=compiled)
    S = len(tokens)
    for row, layer in enumerate(LAYERS):
        top, stratum, _ = got[row]
        mx, arg = posts[layer].max(axis=1), posts[layer].argmax(axis=1)
        prio = band_priority(seed ^ STRATA_SALT, layer, torch.arange(lm.d_mlp), torch.arange(S)).numpy()
        n_full = 0
        for j in range(lm.d_mlp):
            g = float(gmax[row, j])
            for i, (lo, hi) in enumerate(strata_intervals(FRACTIONS)):
                m = mx[:, j].astype(np.float64)
                inside = (m >= lo * g) & (m > 0) & ((m < hi * g) if i else True)
                eligible = np.nonzero(inside)[0]
                sample = eligible[np.lexsort((eligible, prio[eligible, j]))][:k]
                want = sample[np.lexsort((sample, -mx[sample, j]))]
                sl = slice(i * k, (i + 1) * k)
                n = len(want)
                n_full += n == k
                np.testing.assert_array_equal(top.seq[j, sl][:n], want)
                np.testing.assert_array_equal(top.pos[j, sl][:n], arg[want, j])
                np.testing.assert_array_equal(top.act[j, sl][:n], mx[want, j])
                assert np.all(stratum[j, sl][:n] == i) and np.all(stratum[j, sl][n:] == -1)
                assert np.all(top.seq[j, sl][n:] == -1) and np.all(np.isnan(top.act[j, sl][n:]))
        assert n_full > lm.d_mlp  # most strata are full: the comparison is not between empty tables


@pytest.mark.parametrize("seed,layer,seq0", [(0, 0, 0), (11, 3, 7), (-5, 40, 2**33 + 5), (2**40 + 3, 1, 2**32 - 3)])
def test_compiled_strata_keys_equal_the_torch_keys(seed, layer, seq0):
    """The CPU's keys (one compiled pass) equal the torch path's, bit for bit: values on every
    interval's edge, zero, negative, NaN and -inf (a sequence with every token excluded)."""
    rng = np.random.default_rng(seed & 0xFFFF)
    B, M = 7, 50
    gmax = rng.uniform(0.5, 3.0, M).astype(np.float32)
    gmax[:3] = [0.0, -1.0, np.nan]
    intervals = strata_intervals((0.75, 0.5, 0.25, 0.0))
    act = (rng.uniform(-0.5, 1.0, (B, M)) * gmax).astype(np.float32)
    for b, (lo, _) in enumerate(intervals):  # exactly on each edge
        act[b, 3:] = (np.float64(lo) * gmax[3:].astype(np.float64)).astype(np.float32)
    act[4, :] = 0.0
    act[5, ::2], act[5, 1::2] = np.nan, -np.inf
    seq = np.arange(seq0, seq0 + B, dtype=np.int64)
    want = strata_keys(torch.from_numpy(act), torch.from_numpy(gmax), intervals, seed, layer, torch.arange(M),
                       torch.from_numpy(seq))
    got = strata_keys_compiled(act, gmax, intervals, seed, layer, seq)
    assert got.shape == (len(intervals), B, M)
    for i, w in enumerate(want):
        np.testing.assert_array_equal(got[i], w.numpy())
    assert np.isfinite(got).any(axis=0).sum() > B * M // 3  # many (sequence, unit) pairs lie in some stratum


@pytest.mark.parametrize("compiled", BOOKKEEPING)
@pytest.mark.parametrize("blocks,batch", [(1, 16), (3, 5)])
def test_distribution_equals_numpy_histogram(scanned, blocks, batch, compiled):
    lm, tokens, posts, gmax = scanned
    for row, layer in enumerate(LAYERS):
        _, _, dist = _scan(lm, tokens, gmax, blocks, batch, 2, 0, compiled=compiled)[row]
        a_NM = posts[layer].reshape(-1, lm.d_mlp)
        for j in range(lm.d_mlp):
            a = a_NM[:, j]
            g = float(gmax[row, j])
            # bins (i/H, (i+1)/H] x max: numpy's [e_i, e_i+1) bins over -a, reversed
            want = np.histogram(-a[a > 0], bins=HIST_BINS, range=(-g, 0.0))[0][::-1]
            np.testing.assert_array_equal(dist.hist[j], want)
        np.testing.assert_allclose(dist.positive_fraction, (a_NM > 0).mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(dist.mean, a_NM.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(dist.max, gmax[row].numpy())


@pytest.mark.parametrize("compiled", BOOKKEEPING)
def test_excluded_tokens_are_left_out_of_strata_and_distribution(scanned, compiled):
    lm, tokens, posts, gmax = scanned
    tokens = tokens.copy()
    tokens[:, 0] = 5  # a BOS-like leading token
    tokens[3, 7] = tokens[9, 2] = 5  # and further on in two rows
    posts = _posts(lm, tokens)
    keep = tokens != 5
    gmax = torch.from_numpy(np.stack([posts[layer][keep].max(axis=0) for layer in LAYERS]))  # over the kept tokens
    _, _, dist = _scan(lm, tokens, gmax, 2, 4, 2, 0, excluded_ids=(5,), compiled=compiled)[0]
    a_NM = posts[0][keep]  # [tokens kept, M]
    assert (posts[0][~keep] > 0).any()  # the excluded tokens would have counted
    for j in range(lm.d_mlp):
        a = a_NM[:, j]
        want = np.histogram(-a[a > 0], bins=HIST_BINS, range=(-float(gmax[0, j]), 0.0))[0]
        np.testing.assert_array_equal(dist.hist[j], want[::-1])
    np.testing.assert_allclose(dist.mean, a_NM.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dist.positive_fraction, (a_NM > 0).mean(axis=0), rtol=1e-6)


def test_cluster_spectrum_counts_add_up_and_match_the_joint_clustering():
    rng = np.random.default_rng(0)
    S, N, D, n_sources = 6, 14, 5, 3
    centres = rng.normal(size=(4, D))
    emb = (centres[rng.integers(0, 4, size=(S, N))] + 0.2 * rng.normal(size=(S, N, D))).astype(np.float32)
    act = rng.uniform(0.1, 1.0, size=(S, N)).astype(np.float32)
    act[0, 10:] = np.nan  # empty slots
    act[1, 3] = -0.5  # not clustered
    source = rng.integers(0, n_sources, size=(S, N))
    res = cluster_spectrum(emb, act, source, n_sources, "average", 0.5)
    joint = cluster_shard(emb, act, "average", 0.5)
    np.testing.assert_array_equal(res.labels, joint.labels)
    clustered = res.labels >= 0
    for s in range(S):
        for src in range(n_sources):
            mine = clustered[s] & (source[s] == src)
            assert res.counts[s, :, src].sum() == mine.sum()
            np.testing.assert_array_equal(res.counts[s, :, src], np.bincount(res.labels[s, mine], minlength=N))
            assert res.n_clusters[s, src] == len(np.unique(res.labels[s, mine]))
            if mine.sum() > 1:
                np.testing.assert_allclose(res.mean_distance[s, src], pdist(emb[s, mine].astype(np.float64), "cosine").mean(),
                                           rtol=1e-5)
            else:
                assert np.isnan(res.mean_distance[s, src])
        top = set(res.labels[s, clustered[s] & (source[s] == 0)])
        assert res.below_only[s] == len(set(res.labels[s, clustered[s]]) - top)
    assert res.below_only.sum() > 0
