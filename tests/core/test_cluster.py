"""Tests of tasks.cluster: oracle vs plain SciPy, hand-worked numbers, NaN cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform

from neuron_embeddings.core.cluster import (
    LINKAGES,
    ClusterResult,
    cluster_shard,
    cosine_distances,
    renumber_by_size,
)

METHODS = ["average", "single", "complete", "weighted"]
NAN = float("nan")


# --- independent oracle -------------------------------------------------------


def oracle(emb_KD: np.ndarray, act_K: np.ndarray, method: str, t: float) -> dict:
    """Straightforward per-neuron computation with pdist / linkage / fcluster."""
    k = len(act_K)
    idx = [i for i in range(k) if math.isfinite(act_K[i]) and act_K[i] > 0]
    n = len(idx)
    out = {
        "labels": [-1] * k,
        "linkage": np.full((k - 1, 4), np.nan),
        "n_examples": n,
        "n_clusters": min(n, 1),
        "max_distance": NAN,
        "mean_distance": NAN,
        "mean_intra": NAN,
        "mean_inter": NAN,
    }
    if n == 1:
        out["labels"][idx[0]] = 0
    if n < 2:
        return out
    y = pdist(emb_KD[idx].astype(np.float64), "cosine")
    Z = linkage(y, method=method)
    raw = fcluster(Z, t=t, criterion="distance")
    members: dict[int, list[int]] = {}
    for pos, r in enumerate(raw):
        members.setdefault(int(r), []).append(pos)
    ordered = sorted(members.values(), key=lambda m: (-len(m), m[0]))
    label_of_pos = {}
    for c, group in enumerate(ordered):
        for pos in group:
            label_of_pos[pos] = c
            out["labels"][idx[pos]] = c
    dist = squareform(y)
    intra, inter = [], []
    for a in range(n):
        for b in range(a + 1, n):
            (intra if label_of_pos[a] == label_of_pos[b] else inter).append(dist[a, b])
    out["linkage"][: n - 1] = Z
    out["n_clusters"] = len(ordered)
    out["max_distance"] = max(y)
    out["mean_distance"] = sum(y) / len(y)
    out["mean_intra"] = sum(intra) / len(intra) if intra else NAN
    out["mean_inter"] = sum(inter) / len(inter) if inter else NAN
    return out


def random_shard(seed: int = 0, S: int = 24, k: int = 12, D: int = 6):
    """Random shard with padding, non-positive activations, 0 and 1 examples."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((S, k, D)).astype(np.float32)
    act = np.full((S, k), np.nan, dtype=np.float32)
    for s in range(S):
        n_pos = [0, 1, k, 2][s] if s < 4 else int(rng.integers(2, k + 1))
        n_nonpos = int(rng.integers(0, k - n_pos + 1))
        pos = np.sort(rng.random(n_pos) + 0.1)[::-1]
        nonpos = np.sort(-rng.random(n_nonpos))[::-1]
        if s == 5:
            nonpos[:1] = 0.0  # exactly zero is not clustered
        vals = np.concatenate([pos, nonpos])
        act[s, : len(vals)] = vals
        emb[s, len(vals) :] = 0.0  # no example in padding slots
    if S > 7:
        act[6] = act[6, np.random.default_rng(1).permutation(k)]  # generic slot order
        emb[7, :] *= 100.0  # scale must not matter
    return emb, act


def assert_matches_oracle(res: ClusterResult, emb, act, method: str, t: float):
    for s in range(act.shape[0]):
        want = oracle(emb[s], act[s], method, t)
        np.testing.assert_array_equal(res.labels[s], want["labels"], err_msg=f"s={s}")
        assert res.n_examples[s] == want["n_examples"]
        assert res.n_clusters[s] == want["n_clusters"]
        Z, Zw = res.linkage[s], want["linkage"]
        np.testing.assert_array_equal(Z[:, [0, 1, 3]], Zw[:, [0, 1, 3]])
        np.testing.assert_allclose(Z[:, 2], Zw[:, 2], rtol=1e-6, atol=1e-6)
        for key in ["max_distance", "mean_distance", "mean_intra", "mean_inter"]:
            np.testing.assert_allclose(
                getattr(res, key)[s], want[key], rtol=1e-6, atol=1e-6, err_msg=key
            )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("t", [0.4, 0.8])
def test_matches_independent_oracle(method: str, t: float):
    emb, act = random_shard()
    res = cluster_shard(emb, act, linkage=method, threshold=t)
    assert_matches_oracle(res, emb, act, method, t)
    # the data must exercise non-trivial cuts, not only all-in-one / singletons
    n_ex, n_cl = res.n_examples, res.n_clusters
    assert np.any((n_cl > 1) & (n_cl < n_ex))


def test_oracle_float16_and_large_k():
    emb, act = random_shard(seed=3, S=6, k=50, D=16)
    emb16 = emb.astype(np.float16)
    res = cluster_shard(emb16, act, linkage="average", threshold=0.7)
    assert_matches_oracle(res, emb16, act, "average", 0.7)


def test_output_shapes_and_dtypes():
    emb, act = random_shard(S=5, k=7, D=3)
    res = cluster_shard(emb, act)
    assert res.labels.shape == (5, 7) and res.labels.dtype == np.int32
    assert res.linkage.shape == (5, 6, 4) and res.linkage.dtype == np.float32
    for key in ["n_examples", "n_clusters"]:
        assert getattr(res, key).shape == (5,) and getattr(res, key).dtype == np.int32
    for key in ["max_distance", "mean_distance", "mean_intra", "mean_inter"]:
        assert getattr(res, key).shape == (5,) and getattr(res, key).dtype == np.float32


# --- hand-worked case ---------------------------------------------------------
# a=(1,0), b=(.8,.6), c=(0,1), d=(-.6,.8): cosines ab=.8 ac=0 ad=-.6 bc=.6 bd=0 cd=.8
# distances          ab=.2 ac=1 ad=1.6 bc=.4 bd=1 cd=.2
# slot order a, c, b, d (a, c scaled), then a non-positive example and padding.
HAND_EMB = np.array(
    [[2, 0], [0, 5], [0.8, 0.6], [-0.6, 0.8], [1, 1], [0, 0]], dtype=np.float32
)[None]
HAND_ACT = np.array([[4, 3, 2, 1, -1, np.nan]], dtype=np.float32)
HAND_TOP = {"average": 1.0, "single": 0.4, "complete": 1.6, "weighted": 1.0}


@pytest.mark.parametrize("method", METHODS)
def test_hand_worked_two_groups(method: str):
    res = cluster_shard(HAND_EMB, HAND_ACT, linkage=method, threshold=0.3)
    assert res.n_examples[0] == 4
    assert res.n_clusters[0] == 2
    np.testing.assert_array_equal(res.labels[0], [0, 1, 0, 1, -1, -1])
    assert res.max_distance[0] == pytest.approx(1.6, abs=1e-6)
    assert res.mean_distance[0] == pytest.approx(4.4 / 6, abs=1e-6)
    assert res.mean_intra[0] == pytest.approx(0.2, abs=1e-6)
    assert res.mean_inter[0] == pytest.approx(1.0, abs=1e-6)
    Z = res.linkage[0]
    assert Z.shape == (5, 4)
    np.testing.assert_allclose(Z[:3, 2], [0.2, 0.2, HAND_TOP[method]], atol=1e-6)
    assert sorted(map(tuple, Z[:2, :2].astype(int))) == [(0, 2), (1, 3)]
    assert Z[2, 3] == 4 and np.isnan(Z[3:]).all()


def test_hand_worked_threshold_between_merges():
    # single linkage joins the groups at 0.4, average only at 1.0
    single = cluster_shard(HAND_EMB, HAND_ACT, linkage="single", threshold=0.5)
    average = cluster_shard(HAND_EMB, HAND_ACT, linkage="average", threshold=0.5)
    assert single.n_clusters[0] == 1 and average.n_clusters[0] == 2
    # fcluster semantics: a merge at exactly the threshold stays merged
    top = float(cosine_distances(HAND_EMB)[0, :4, :4].max())  # complete-linkage top
    assert top == pytest.approx(1.6, abs=1e-6)
    at = cluster_shard(HAND_EMB, HAND_ACT, linkage="complete", threshold=top)
    below = cluster_shard(
        HAND_EMB, HAND_ACT, linkage="complete", threshold=np.nextafter(top, 0.0)
    )
    assert at.n_clusters[0] == 1 and below.n_clusters[0] == 2


# --- NaN cases ----------------------------------------------------------------


def test_no_examples():
    emb = np.ones((2, 3, 4), dtype=np.float32)
    act = np.array([[np.nan] * 3, [0.0, -1.0, np.nan]], dtype=np.float32)
    res = cluster_shard(emb, act)
    assert (res.labels == -1).all() and np.isnan(res.linkage).all()
    assert (res.n_examples == 0).all() and (res.n_clusters == 0).all()
    for key in ["max_distance", "mean_distance", "mean_intra", "mean_inter"]:
        assert np.isnan(getattr(res, key)).all()


def test_one_example():
    emb = np.ones((1, 3, 4), dtype=np.float32)
    act = np.array([[2.0, -1.0, np.nan]], dtype=np.float32)
    res = cluster_shard(emb, act)
    np.testing.assert_array_equal(res.labels[0], [0, -1, -1])
    assert np.isnan(res.linkage).all()
    assert res.n_examples[0] == 1 and res.n_clusters[0] == 1
    for key in ["max_distance", "mean_distance", "mean_intra", "mean_inter"]:
        assert np.isnan(getattr(res, key)[0])


def test_all_in_one_cluster():
    res = cluster_shard(HAND_EMB, HAND_ACT, linkage="complete", threshold=1.7)
    assert res.n_clusters[0] == 1
    np.testing.assert_array_equal(res.labels[0], [0, 0, 0, 0, -1, -1])
    assert np.isnan(res.mean_inter[0])
    assert res.mean_intra[0] == pytest.approx(4.4 / 6, abs=1e-6)
    assert res.mean_intra[0] == res.mean_distance[0]


def test_every_example_its_own_cluster():
    res = cluster_shard(HAND_EMB, HAND_ACT, linkage="average", threshold=0.1)
    assert res.n_clusters[0] == 4
    np.testing.assert_array_equal(res.labels[0], [0, 1, 2, 3, -1, -1])
    assert np.isnan(res.mean_intra[0])
    assert res.mean_inter[0] == pytest.approx(4.4 / 6, abs=1e-6)


# --- renumbering by size ------------------------------------------------------


def grouped_embeddings(group_of_slot: list[int], D: int = 8, noise: float = 0.01):
    """One neuron whose slot i lies near basis vector e_{group_of_slot[i]}."""
    rng = np.random.default_rng(5)
    k = len(group_of_slot)
    emb = np.eye(D, dtype=np.float32)[group_of_slot] + noise * rng.standard_normal((k, D))
    act = np.linspace(2, 1, k, dtype=np.float32)
    return emb[None].astype(np.float32), act[None]


def test_labels_renumbered_by_size():
    # group 7 is a singleton in slot 0; group 3 has 3 members; group 5 has 2
    emb, act = grouped_embeddings([7, 3, 5, 3, 5, 3])
    res = cluster_shard(emb, act, threshold=0.5)
    np.testing.assert_array_equal(res.labels[0], [2, 0, 1, 0, 1, 0])
    assert res.n_clusters[0] == 3


def test_size_ties_broken_by_smallest_index():
    emb, act = grouped_embeddings([4, 6, 6, 4, 1])
    res = cluster_shard(emb, act, threshold=0.5)
    np.testing.assert_array_equal(res.labels[0], [0, 1, 1, 0, 2])


def test_renumber_by_size_direct():
    raw = np.array([3, 1, 2, 1, 2, 4, 4, 4], dtype=np.int32)
    np.testing.assert_array_equal(renumber_by_size(raw), [3, 1, 2, 1, 2, 0, 0, 0])


# --- float16, distances, validation ------------------------------------------


def test_float16_same_clusters_as_float32():
    groups = [0, 1, 0, 2, 1, 0, 2, 3, 0, 1]
    emb32, act = grouped_embeddings(groups, D=32, noise=0.05)
    res32 = cluster_shard(emb32, act, threshold=0.3)
    res16 = cluster_shard(emb32.astype(np.float16), act, threshold=0.3)
    np.testing.assert_array_equal(res16.labels, res32.labels)
    np.testing.assert_array_equal(res16.n_clusters, res32.n_clusters)
    assert res32.n_clusters[0] == 4
    for key in ["max_distance", "mean_distance", "mean_intra", "mean_inter"]:
        np.testing.assert_allclose(getattr(res16, key), getattr(res32, key), atol=2e-3)


def test_cosine_distances_properties():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 4)).astype(np.float32)
    x[1, 2] = 0.0  # zero-norm row
    x[2, 1] = -x[2, 0]  # exactly opposite
    d = cosine_distances(x)
    assert d.dtype == np.float64 and d.shape == (3, 5, 5)
    np.testing.assert_array_equal(d, np.swapaxes(d, 1, 2))
    np.testing.assert_array_equal(d[:, range(5), range(5)], 0.0)
    assert (d >= 0).all() and (d <= 2).all()
    np.testing.assert_array_equal(np.delete(d[1, 2], 2), 1.0)
    assert d[2, 0, 1] == pytest.approx(2.0, abs=1e-12)
    np.testing.assert_allclose(d[0], squareform(pdist(x[0].astype(np.float64), "cosine")), atol=1e-12)


@pytest.mark.parametrize("bad", ["ward", "centroid", "median", "Average", ""])
def test_unknown_linkage_raises(bad: str):
    emb, act = random_shard(S=2, k=4, D=3)
    with pytest.raises(ValueError) as info:
        cluster_shard(emb, act, linkage=bad)
    for name in LINKAGES:
        assert name in str(info.value)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        cluster_shard(np.zeros((2, 3, 4), np.float32), np.zeros((2, 4), np.float32))


def test_cosine_distances_clipped_for_parallel_vectors():
    # scaled / negated copies: 1 - cos rounds to slightly below 0 / above 2
    x = np.random.default_rng(4).standard_normal((40, 16)).astype(np.float32)
    x_NKD = np.stack([np.concatenate([x, 3 * x]), np.concatenate([x, -7 * x])])
    d = cosine_distances(x_NKD)
    assert d.min() >= 0.0 and d.max() <= 2.0
    np.testing.assert_allclose(d[0, :40, 40:].diagonal(), 0.0, atol=1e-12)
    np.testing.assert_allclose(d[1, :40, 40:].diagonal(), 2.0, atol=1e-12)


# --- the compiled path against the SciPy one -------------------------------------


def _tied_shard(seed: int, S: int = 40, k: int = 30, D: int = 5):
    """Random shards whose examples repeat a few vectors (exact zero distances, equal heights and
    equal cluster sizes: the ties where an implementation's order shows), with padding."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((S, 4, D))
    pick = rng.integers(0, 4, size=(S, k))
    emb = np.take_along_axis(base, pick[:, :, None], axis=1)
    emb[: S // 2] += rng.standard_normal((S // 2, k, D)) * 0.3  # half of them: near, not equal
    emb = emb.astype(np.float16)
    act = np.sort(rng.random((S, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    act[rng.random((S, k)) < 0.15] = np.nan
    return emb, act


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("t", [0.05, 0.5, 1.2])
@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_equals_scipy_path_bit_for_bit(method: str, t: float, seed: int):
    """Labels, linkage matrices and metrics of the compiled clustering (the default) equal the
    per-neuron SciPy path's exactly, on random and on tie-heavy shards, padding and 0/1 examples."""
    for emb, act in (random_shard(seed, S=30, k=20, D=6), _tied_shard(seed)):
        got = cluster_shard(emb, act, method, t, compiled=True)
        want = cluster_shard(emb, act, method, t, compiled=False)
        for field in ("labels", "linkage", "n_examples", "n_clusters", "max_distance", "mean_distance",
                      "mean_intra", "mean_inter"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
        if t == 0.5:  # cuts that are neither all-in-one nor all singletons
            assert np.any((got.n_clusters > 1) & (got.n_clusters < got.n_examples))


@pytest.mark.parametrize("compiled", [True, False])
def test_non_finite_embeddings_raise(compiled: bool):
    emb, act = random_shard(0, S=4, k=6, D=3)
    emb[3, 1, 0] = np.inf
    act[3, :2] = 1.0
    with pytest.raises(ValueError, match="finite"):
        cluster_shard(emb, act, compiled=compiled)
