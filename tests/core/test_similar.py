"""Similar clusters: centroids, top tokens and nearest clusters against direct NumPy computations."""
from __future__ import annotations

import shutil
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import zarr

from neuron_embeddings.core import similar
from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.plan import neuron_shards
from neuron_embeddings.core.similar import (ClusterSet, HnswIndex, cluster_centroids, cluster_top_tokens, compact,
                                            nearest_clusters)
from neuron_embeddings.storage.store import Store
from neuron_embeddings.tasks.similar import similar_shard
from tests.helpers import copy_store, options, run_stages


def _random_shard(rng, S=6, K=8, D=5, max_c=4):
    emb = rng.standard_normal((S, K, D)).astype(np.float32)
    labels = np.full((S, K), -1, dtype=np.int32)
    for s in range(S):
        n = rng.integers(0, K + 1)
        labels[s, :n] = rng.integers(0, rng.integers(1, max_c + 1), n)
        labels[s, :n] = np.unique(labels[s, :n], return_inverse=True)[1]  # labels 0..c-1, all used
    return emb, labels


def _direct_centroids(emb, labels):
    S, K, D = emb.shape
    out = np.zeros((S, K, D))
    for s in range(S):
        for c in range(K):
            members = [emb[s, i] / np.linalg.norm(emb[s, i]) for i in range(K) if labels[s, i] == c]
            if members:
                out[s, c] = np.mean(members, axis=0)
    return out


def test_centroids_are_means_of_normalised_embeddings():
    emb, labels = _random_shard(np.random.default_rng(0))
    np.testing.assert_allclose(cluster_centroids(emb, labels), _direct_centroids(emb, labels), atol=1e-6)


def test_top_tokens_are_each_clusters_most_frequent_peak_token():
    rng = np.random.default_rng(1)
    _, labels = _random_shard(rng, S=30, K=12)
    peak = rng.integers(0, 4, labels.shape).astype(np.int32)  # few tokens: many ties
    top, cnt = cluster_top_tokens(labels, peak)
    for s in range(labels.shape[0]):
        for c in range(labels.shape[1]):
            slots = [i for i in range(labels.shape[1]) if labels[s, i] == c]
            if not slots:
                assert top[s, c] == -1 and cnt[s, c] == 0
                continue
            counts = Counter(int(peak[s, i]) for i in slots)
            most = max(counts.values())
            first = min(i for i in slots if counts[int(peak[s, i])] == most)  # ties: earliest example
            assert (top[s, c], cnt[s, c]) == (peak[s, first], most)


def _direct_neighbours(cent_ND, owner_N, n):
    u = cent_ND / np.linalg.norm(cent_ND, axis=1, keepdims=True)
    cos = u @ u.T
    out_id, out_cos = [], []
    for q in range(len(u)):
        cand = [(cos[q, r], r) for r in range(len(u)) if owner_N[r] != owner_N[q]]
        cand.sort(key=lambda t: -t[0])
        out_id.append([r for _, r in cand[:n]] + [-1] * (n - len(cand[:n])))
        out_cos.append([c for c, _ in cand[:n]] + [np.nan] * (n - len(cand[:n])))
    return np.array(out_id), np.array(out_cos)


def _set(cent, owner, ids):
    c = torch.from_numpy(cent)
    return ClusterSet(c, 1 / c.norm(dim=1), torch.from_numpy(owner), torch.from_numpy(ids))


SELECTION = [pytest.param(True, id="compiled"), pytest.param(False, id="torch")]  # the CPU's and other devices'


@pytest.mark.parametrize("compiled", SELECTION)
@pytest.mark.parametrize("block,dtype", [(3, torch.float32), (4096, torch.float32), (5, torch.bfloat16)])
def test_nearest_clusters_match_brute_force_for_any_block_size(block, dtype, compiled):
    rng = np.random.default_rng(2)
    N, D, n = 60, 6, 5
    cent = rng.standard_normal((N, D)).astype(np.float32)
    owner = np.sort(rng.integers(0, 9, N))
    query = _set(cent, owner, np.arange(N))
    refs = [_set(cent[a:b], owner[a:b], np.arange(a, b)) for a, b in ((0, 17), (17, 60))]
    got_id, got_cos = nearest_clusters(query, refs, n, block=block, q_block=7, search_dtype=dtype, compiled=compiled)
    want_id, want_cos = _direct_neighbours(cent, owner, n)
    assert np.array_equal(got_id.numpy(), want_id)
    np.testing.assert_allclose(got_cos.numpy(), want_cos, atol=1e-6)  # exact cosines, also after bf16 search


def _planted(rng, N=1200, D=24, groups=100):
    """Centroids around planted directions (clusters of different neurons alike, as in real stores)."""
    centre = rng.standard_normal((groups, D))
    cent = centre[rng.integers(0, groups, N)] + 0.6 * rng.standard_normal((N, D))
    return cent.astype(np.float32), np.sort(rng.integers(0, N // 4, N))


def test_hnsw_neighbours_recall_brute_force_and_are_deterministic():
    rng = np.random.default_rng(3)
    cent, owner = _planted(rng)
    s = _set(cent, owner, np.arange(len(cent)))
    want_id, want_cos = _direct_neighbours(cent, owner, 5)
    got_id, got_cos = HnswIndex(s, ef_construction=16).search(s, 5, ef_search=16)
    recall = np.mean([len(set(g) & set(w)) / 5 for g, w in zip(got_id.tolist(), want_id)])
    assert 0.95 <= recall < 1  # approximate (a small graph, small lists), and close
    hit = got_id.numpy() == want_id
    np.testing.assert_allclose(got_cos.numpy()[hit], want_cos[hit], atol=1e-6)  # exact cosines
    assert not (owner[got_id.numpy()] == owner[:, None]).any()  # never the query's own neuron
    again = HnswIndex(s, ef_construction=16).search(s, 5, ef_search=16)
    assert torch.equal(again[0], got_id) and torch.equal(again[1], got_cos)


def test_ties_go_to_the_lower_cluster_id_on_both_paths():
    base = np.random.default_rng(4).standard_normal((5, 8)).astype(np.float32)
    cent, owner = np.repeat(base, 3, axis=0), np.arange(15)  # 3 equal centroids, each its own neuron
    s = _set(cent, owner, np.arange(15) * 10)
    for block in (2, 4096):
        for compiled in (True, False):
            for dtype in (torch.float32, torch.bfloat16):
                ids, _ = nearest_clusters(s, [s], 2, block=block, search_dtype=dtype, compiled=compiled)
                assert ids[0].tolist() == [10, 20] and ids[2].tolist() == [0, 10]
    ids, cos = HnswIndex(s).search(s, 2)
    assert ids[0].tolist() == [10, 20] and ids[2].tolist() == [0, 10] and torch.allclose(cos, torch.ones(15, 2))


@pytest.mark.parametrize("compiled", SELECTION)
def test_fewer_candidates_than_n_are_padded(compiled):
    q = _set(np.eye(3, dtype=np.float32), np.array([0, 0, 1]), np.array([0, 1, 2]))
    ids, cos = nearest_clusters(q, [q], 5, compiled=compiled)
    assert ids[0].tolist() == [2, -1, -1, -1, -1] and ids[2].tolist()[:2] in ([0, 1], [1, 0])
    assert torch.isnan(cos[0, 1:]).all() and cos[0, 0] == 0


@pytest.mark.parametrize("dtype,int_dtype,magnitude", [(torch.bfloat16, torch.int16, 0x7FFF),
                                                      (torch.float32, torch.int32, 0x7FFFFFFF)])
def test_order_keys_sort_bit_patterns_as_their_values(dtype, int_dtype, magnitude):
    """The compiled selection compares bits through order_key: the same order as the values, for
    every non-NaN bfloat16 and 20,000 float32 patterns with the infinities and zeros (both zeros
    equal as values, -0 first as keys)."""
    from neuron_embeddings.core.similar_kernels import order_key

    if dtype == torch.bfloat16:
        bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(int_dtype)
    else:
        special = torch.tensor([0.0, -0.0, torch.inf, -torch.inf, 1e-45, -1e-45]).view(torch.int32)
        bits = torch.cat([special, torch.randint(-2 ** 31, 2 ** 31 - 1, (20_000,), generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.int32)]).unique()
    value = bits.view(dtype).double().numpy()
    keep = ~np.isnan(value)
    keys = np.array([order_key(b, magnitude) for b in bits.numpy()[keep]])
    value = value[keep]
    by_key = np.argsort(keys, kind="stable")
    assert np.all(np.diff(value[by_key]) >= 0)  # ascending keys: ascending values
    assert len(np.unique(keys)) == len(keys)  # one key per bit pattern


def test_compiled_selection_equals_torch_on_a_larger_store():
    """Many tiles with candidates replaced as the references come (planted centroids, bfloat16
    search): the compiled selection and torch.topk give the same neighbours and cosines."""
    cent, owner = _planted(np.random.default_rng(5), N=900, D=32)
    s = _set(cent, owner, np.arange(900) * 3)
    q = s.rows(slice(100, 400))
    a = nearest_clusters(q, [s], 5, block=64, q_block=50, search_dtype=torch.bfloat16, compiled=True)
    b = nearest_clusters(q, [s], 5, block=64, q_block=50, search_dtype=torch.bfloat16, compiled=False)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)
    want_id, _ = _direct_neighbours(cent, owner, 5)
    assert np.array_equal(a[0].numpy() // 3, want_id[100:400])


def test_compact_keeps_clusters_of_at_least_two_examples():
    cent = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2) + 1
    cs = compact(cent, np.array([[2, 1, 0], [5, 2, 2]]), row=1, start=10, d_mlp=100)
    assert cs.owner_N.tolist() == [110, 111, 111, 111]
    assert cs.id_N.tolist() == [330, 333, 334, 335]
    np.testing.assert_allclose(cs.unit().norm(dim=1).numpy(), 1, rtol=1e-6)


@pytest.fixture(scope="module")
def store(tiny_gpt2, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sim") / "s.zarr")
    return run_stages(out, **options(tiny_gpt2, n_sequences=16, ctx_len=16, k=5))


def test_store_neighbours_match_a_direct_computation_over_the_whole_store(store):
    L, M, K = store["clusters/labels"].shape
    emb, labels = store["embeddings"][:], store["clusters/labels"][:]
    nc = store["metrics/n_clusters"][:]
    who, cents, singles = [], [], []
    for r in range(L):
        cent = _direct_centroids(emb[r], labels[r])
        for j in range(M):
            for c in range(nc[r, j]):
                if (labels[r, j] == c).sum() >= 2:
                    who.append((r, j, c))
                    cents.append(cent[j, c])
                else:
                    singles.append((r, j, c))
    assert len(who) > 100 and len(singles) > 10
    owner = np.array([r * M + j for r, j, _ in who])
    want_id, want_cos = _direct_neighbours(np.array(cents), owner, 5)
    nb, cos = store["similar/neighbours"][:], store["similar/cosine"][:]
    checked = 0
    for q, (r, j, c) in enumerate(who):
        np.testing.assert_allclose(cos[r, j, c], want_cos[q], atol=1e-5)
        distinct = np.diff(want_cos[q]) < -1e-5  # where the order is not a tie, the clusters agree
        for i in range(5):
            if (i == 0 or distinct[i - 1]) and (i == 4 or distinct[i]):
                assert tuple(nb[r, j, c, i]) == who[want_id[q, i]]
                checked += 1
    assert checked > len(who) * 3
    for r, j, c in singles:  # a cluster of one example has no neighbours and is nobody's
        assert (nb[r, j, c] == -1).all()
    assert not {tuple(t) for t in nb.reshape(-1, 3)} & set(singles)
    # slots beyond a neuron's clusters stay empty
    empty = np.arange(K)[None, None, :] >= nc[:, :, None]
    assert (nb[empty] == -1).all() and np.isnan(cos[empty]).all()
    assert (store["similar/top_token"][:][empty] == -1).all()


def test_store_top_tokens_are_tokens_the_cluster_peaks_on(store):
    tokens, labels = store["tokens"][:], store["clusters/labels"][:]
    seq, pos, top = store["topk/seq"][:], store["topk/pos"][:], store["similar/top_token"][:]
    r, j, c = np.argwhere(top >= 0)[7]
    peaks = Counter(int(tokens[seq[r, j, i], pos[r, j, i]]) for i in np.flatnonzero(labels[r, j] == c))
    assert peaks[int(top[r, j, c])] == max(peaks.values()) == store["similar/top_count"][r, j, c]


def _rerun_similar(path: str) -> list[dict]:
    """The similar stage again, every shard; their records."""
    st, out = Store(path), []
    for sh in neuron_shards(st.settings(), int(st.attrs["d_mlp"])):
        st.clear_marker("similar", sh.id)
        out.append(similar_shard.fn(path, {**sh.__dict__, "id": sh.id}, "cpu"))
    return out


def test_similar_shards_two_at_a_time_equal_the_stage_one_at_a_time(store, tmp_path):
    """The flow runs the similar stage in shard batches, two shards at a time on one torch thread
    each (the first to start reads every cluster, the other waits for it): the same store."""
    from neuron_embeddings.tasks.shards import run_shard_batch

    copy = tmp_path / "s.zarr"
    copy_store(store.store.root, copy)
    st = Store(str(copy))
    shards = [{**sh.__dict__, "id": sh.id} for sh in neuron_shards(st.settings(), int(st.attrs["d_mlp"]))]
    for sh in shards:
        st.clear_marker("similar", sh["id"])
    assert run_shard_batch(str(copy), shards, ["similar"], "cpu", 8, threads=2) == {"shards": len(shards)}
    got = zarr.open_group(str(copy), mode="r")
    for name in ("similar/neighbours", "similar/cosine", "similar/top_token", "similar/top_count"):
        np.testing.assert_array_equal(got[name][:], store[name][:], err_msg=name)


def test_similar_stage_through_the_hnsw_graph_matches_the_exact_one(store, tmp_path, monkeypatch):
    copy = tmp_path / "s.zarr"
    copy_store(store.store.root, copy)
    monkeypatch.setattr(similar, "EXACT_MAX", 0)  # every store is "large": the approximate path
    assert {r["search"] for r in _rerun_similar(str(copy))} == {"hnsw"}
    got = zarr.open_group(str(copy), mode="r")
    assert np.array_equal(got["similar/neighbours"][:], store["similar/neighbours"][:])  # a small store: all found
    np.testing.assert_allclose(got["similar/cosine"][:], store["similar/cosine"][:], atol=1e-6)


def test_similar_stage_streaming_the_shards_matches_the_cached_one(store, tmp_path, monkeypatch):
    from neuron_embeddings.tasks import similar as similar_task

    copy = tmp_path / "s.zarr"
    copy_store(store.store.root, copy)
    monkeypatch.setattr(similar_task, "CACHE_BYTES", 0)  # too big to keep: every shard read per query shard
    assert {r["search"] for r in _rerun_similar(str(copy))} == {"exact"}
    got = zarr.open_group(str(copy), mode="r")
    assert np.array_equal(got["similar/neighbours"][:], store["similar/neighbours"][:])
    np.testing.assert_array_equal(got["similar/cosine"][:], store["similar/cosine"][:])


def test_without_faiss_a_large_store_fails_with_the_fix_and_marks_nothing_complete(store, tmp_path, monkeypatch):
    copy = tmp_path / "s.zarr"
    copy_store(store.store.root, copy)
    monkeypatch.setattr(similar, "EXACT_MAX", 0)
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if not installed: `import faiss` raises ImportError
    st = Store(str(copy))
    sh = neuron_shards(st.settings(), int(st.attrs["d_mlp"]))[0]
    st.clear_marker("similar", sh.id)
    before = zarr.open_group(str(copy), mode="r")["similar/neighbours"][:]
    with pytest.raises(UserError, match="pip install faiss-cpu"):
        similar_shard.fn(str(copy), {**sh.__dict__, "id": sh.id}, "cpu")
    assert not st.is_complete("similar", sh.id)
    assert np.array_equal(zarr.open_group(str(copy), mode="r")["similar/neighbours"][:], before)


def test_a_failed_graph_build_fails_in_one_line_and_marks_nothing_complete(store, tmp_path, monkeypatch):
    import faiss

    copy = tmp_path / "s.zarr"
    copy_store(store.store.root, copy)
    monkeypatch.setattr(similar, "EXACT_MAX", 0)

    def fail(self, x):  # as FAISS reports a failed allocation
        raise RuntimeError("Error in void* faiss::allocate: failed to allocate 1234 bytes\nmore detail")

    monkeypatch.setattr(faiss.IndexHNSWFlat, "add", fail)
    st = Store(str(copy))
    sh = neuron_shards(st.settings(), int(st.attrs["d_mlp"]))[0]
    st.clear_marker("similar", sh.id)
    before = zarr.open_group(str(copy), mode="r")["similar/neighbours"][:]
    with pytest.raises(UserError, match="building the HNSW graph .* failed .*--no-similar") as e:
        similar_shard.fn(str(copy), {**sh.__dict__, "id": sh.id}, "cpu")
    assert "\n" not in str(e.value)
    assert not st.is_complete("similar", sh.id)
    assert np.array_equal(zarr.open_group(str(copy), mode="r")["similar/neighbours"][:], before)
