"""The pipeline's stores: the embedding identity, invariances, clustering oracle, planted features."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from neuron_embeddings.core.models import load_model
from neuron_embeddings.tasks.registry import run_status
from tests.helpers import assert_same_arrays, at_examples, contract_arrays, options, run_stages


def _hook_pre_at_examples(model_path: str, g, row: int, layer: int) -> np.ndarray:
    """hook_pre at every stored example, from an independent forward pass: [M, k] (NaN where none)."""
    lm = load_model(model_path, "cpu")
    tokens = torch.from_numpy(g["tokens"][...].astype(np.int64))
    name = f"blocks.{layer}.mlp.hook_pre"
    with torch.inference_mode():
        _, cache = lm.bridge.run_with_cache(tokens, names_filter=lambda n: n == name)
    return at_examples(cache[name].numpy(), g["topk/seq"][row], g["topk/pos"][row])


def _check_identity(model_path, g, rtol):
    for row, layer in enumerate(g.attrs["layers"]):
        pre = _hook_pre_at_examples(model_path, g, row, layer)
        e = g["embeddings"][row].astype(np.float64)  # [M, k, D]
        b_in = g["weights/b_in"][row]
        have = ~np.isnan(pre)
        assert have.sum() > 0
        got = e.sum(-1) + b_in[:, None]
        scale = np.abs(e).sum(-1)[have].max()
        np.testing.assert_allclose(got[have], pre[have], atol=rtol * scale)


def test_identity_random_gpt2_with_layernorm(tiny_gpt2, tmp_path):
    g = run_stages(str(tmp_path / "s.zarr"), **options(tiny_gpt2))
    assert g.attrs["weights"] == "folded-ln"
    _check_identity(tiny_gpt2, g, rtol=1e-5)


def test_identity_float16_embeddings(tiny_gpt2, tmp_path):
    g = run_stages(str(tmp_path / "s.zarr"), **options(tiny_gpt2, embedding_dtype="float16", layers="1"))
    assert g["embeddings"].dtype == np.float16
    _check_identity(tiny_gpt2, g, rtol=3e-3)


def test_identity_minilm(minilm_path, tmp_path):
    g = run_stages(str(tmp_path / "m.zarr"), **options(minilm_path, layers="0,5", n_sequences=12, ctx_len=24,
                                                        shard_size=512))
    assert g.attrs["weights"] == "raw"  # post-LayerNorm: nothing to fold
    assert g.attrs["logit_effects"] is False and "logits" not in g and "weights/W_U" not in g  # an encoder
    assert run_status(str(tmp_path / "m.zarr")).count("complete", "logits") == 6  # 2 rows x 3 shards, nothing written
    _check_identity(minilm_path, g, rtol=1e-5)


def test_window_activations_equal_an_independent_forward(tiny_gpt2, tmp_path):
    g = run_stages(str(tmp_path / "s.zarr"), **options(tiny_gpt2, layers="1", ctx_len=20))
    before, after = g.attrs["window_before"], g.attrs["window_after"]
    lm = load_model(tiny_gpt2, "cpu")
    tokens = torch.from_numpy(g["tokens"][...].astype(np.int64))
    with torch.inference_mode():
        _, cache = lm.bridge.run_with_cache(tokens, names_filter=lambda n: n == "blocks.1.mlp.hook_post")
    post = cache["blocks.1.mlp.hook_post"].numpy()  # [S, T, M]
    win, seq, pos = g["topk/window"][0], g["topk/seq"][0], g["topk/pos"][0]
    assert win.shape[-1] == before + 1 + after
    T = tokens.shape[1]
    for j in range(0, win.shape[0], 17):
        for i in range(win.shape[1]):
            if seq[j, i] < 0:
                assert np.isnan(win[j, i]).all()
                continue
            want = np.full(before + 1 + after, np.nan, dtype=np.float32)
            lo, hi = max(0, pos[j, i] - before), min(T, pos[j, i] + after + 1)
            want[lo - (pos[j, i] - before):hi - (pos[j, i] - before)] = post[seq[j, i], lo:hi, j]
            np.testing.assert_allclose(win[j, i], want, rtol=1e-5, atol=1e-6)
            assert win[j, i, before] == g["topk/act"][0, j, i]  # the max token sits at `before`


def test_same_store_for_any_shard_batch_and_block_count(tiny_gpt2, tmp_path):
    names = ["topk/window"]
    ref = contract_arrays(str(run_stages(str(tmp_path / "a.zarr"), batch_size=8, **options(tiny_gpt2)).store.root),
                          names)
    for i, (shard, blocks, batch) in enumerate([(100, 3, 5), (256, 2, 24), (7, 5, 1)]):
        out = str(tmp_path / f"b{i}.zarr")
        run_stages(out, batch_size=batch, **options(tiny_gpt2, shard_size=shard, scan_blocks=blocks))
        assert_same_arrays(ref, contract_arrays(out, names))


def test_band_store_same_for_any_block_count(tiny_gpt2, tmp_path):
    opts = options(tiny_gpt2, selection="band:0.6", seed=3)
    ref = contract_arrays(str(run_stages(str(tmp_path / "a.zarr"), **opts).store.root))
    run_stages(str(tmp_path / "b.zarr"), batch_size=3, **{**opts, "scan_blocks": 4, "shard_size": 50})
    assert_same_arrays(ref, contract_arrays(str(tmp_path / "b.zarr")))
    assert np.isnan(ref["topk/act"]).any() or (ref["topk/seq"] >= 0).all()


@pytest.mark.parametrize("method", ["average", "complete"])
def test_clusters_and_metrics_equal_scipy_on_stored_embeddings(tiny_gpt2, tmp_path, method):
    g = run_stages(str(tmp_path / "s.zarr"), **options(tiny_gpt2, k=10, linkage=method, threshold=0.6, layers="0"))
    act, emb = g["topk/act"][0], g["embeddings"][0].astype(np.float64)
    labels, Z = g["clusters/labels"][0], g["clusters/linkage"][0]
    checked_multi = 0
    for j in range(act.shape[0]):
        idx = np.nonzero(np.nan_to_num(act[j], nan=-1) > 0)[0]
        n = len(idx)
        assert g["metrics/n_examples"][0, j] == n
        if n < 2:
            continue
        d = pdist(emb[j, idx], "cosine")
        z = linkage(d, method=method)
        np.testing.assert_allclose(Z[j, : n - 1], z, rtol=1e-5, atol=1e-6)
        raw = fcluster(z, t=0.6, criterion="distance")
        # same partition, numbered by size
        sizes = {c: (raw == c).sum() for c in set(raw)}
        order = sorted(sizes, key=lambda c: (-sizes[c], np.nonzero(raw == c)[0][0]))
        want = np.array([order.index(c) for c in raw])
        np.testing.assert_array_equal(labels[j, idx], want)
        assert g["metrics/n_clusters"][0, j] == len(order)
        np.testing.assert_allclose(g["metrics/max_distance"][0, j], d.max(), rtol=1e-5)
        np.testing.assert_allclose(g["metrics/mean_distance"][0, j], d.mean(), rtol=1e-5)
        checked_multi += len(order) > 1
    assert checked_multi > 5


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when labelings a and b group the items identically (a bijection between labels)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_planted_polysemantic_neurons_split_into_their_features(planted, tmp_path):
    model, corpus, truth = planted
    g = run_stages(str(tmp_path / "p.zarr"), **options(model, dataset=corpus, n_sequences=300, ctx_len=16, k=30,
                                                        shard_size=16))
    tok_feature = truth.token_feature()
    tokens = g["tokens"][...]
    by_arity = {1: 0, 2: 0, 3: 0}
    for j, feats in enumerate(truth.neuron_features):
        if not feats:
            continue
        act, seq, pos = g["topk/act"][0, j], g["topk/seq"][0, j], g["topk/pos"][0, j]
        idx = np.nonzero(np.nan_to_num(act, nan=-1) > 0)[0]
        true = tok_feature[tokens[seq[idx], pos[idx]]]
        assert set(true.tolist()) <= set(feats), f"neuron {j} peaks on tokens of other features"
        if set(true.tolist()) != set(feats):
            continue  # a feature missing from this neuron's top examples: nothing to recover
        labels = g["clusters/labels"][0, j][idx]
        assert g["metrics/n_clusters"][0, j] == len(feats), f"neuron {j} reads {feats}"
        assert _same_partition(labels, true), f"neuron {j}: clusters do not match its features"
        by_arity[len(feats)] += 1
    assert all(v >= 2 for v in by_arity.values()), by_arity


def _scratch_chunks(store) -> list:
    """Chunk files of the scan's partial tables (scan/max, the band maxima, is not scratch)."""
    return [p for p in (store / "scan").rglob("*")
            if p.is_file() and p.name != "zarr.json" and p.relative_to(store / "scan").parts[0] != "max"]


def test_scratch_is_released_and_a_fault_during_the_release_resumes_to_the_same_store(tiny_gpt2, tmp_path,
                                                                                       monkeypatch):
    """Once a shard is embedded, the scan's partial tables of that shard are deleted (only their
    metadata stays); a fault halfway through a release (after the embed marker) resumes to the
    store of an uninterrupted run, with no scratch left and nothing reported damaged."""
    from neuron_embeddings.storage import integrity
    from neuron_embeddings.storage.store import Store
    from tests.helpers import assert_same_arrays, contract_arrays

    opts = options(tiny_gpt2, n_sequences=24, ctx_len=16, k=4, shard_size=32, scan_blocks=2)
    ref = str(tmp_path / "ref.zarr")
    run_stages(ref, **opts)
    assert _scratch_chunks(tmp_path / "ref.zarr") == []
    assert integrity.verify(Store(ref)).ok
    out = str(tmp_path / "cut.zarr")
    monkeypatch.setenv("NE_TEST_FAULT", "release/L01-N00032")
    with pytest.raises(Exception, match="fault injected"):
        run_stages(out, **opts)
    assert Store(out).is_complete("embed", "L01-N00032")  # the marker came first
    assert _scratch_chunks(tmp_path / "cut.zarr")  # part of the scratch is still there
    monkeypatch.delenv("NE_TEST_FAULT")
    run_stages(out, **opts)
    assert _scratch_chunks(tmp_path / "cut.zarr") == []
    assert integrity.verify(Store(out)).ok
    assert_same_arrays(contract_arrays(ref), contract_arrays(out))


def test_a_damaged_embedding_after_the_release_rescans(tiny_gpt2, tmp_path):
    """The scratch an embed shard needs is gone once it is complete: when that shard is damaged, the
    rerun recomputes the scan too, and ends with the identical store."""
    from tests.helpers import assert_same_arrays, contract_arrays

    opts = options(tiny_gpt2, n_sequences=24, ctx_len=16, k=4, shard_size=32)
    ref, out = str(tmp_path / "ref.zarr"), str(tmp_path / "out.zarr")
    run_stages(ref, **opts)
    run_stages(out, **opts)
    victim = next(p for p in sorted((tmp_path / "out.zarr" / "embeddings").rglob("*"))
                  if p.is_file() and p.name != "zarr.json")
    victim.unlink()
    run_stages(out, **opts)
    assert_same_arrays(contract_arrays(ref), contract_arrays(out))


SIMILAR_ARRAYS = ["similar/neighbours", "similar/cosine", "similar/top_token", "similar/top_count"]


def _centroid_chunks(store) -> list:
    return [p for p in (store / "similar" / "centroids").rglob("*") if p.is_file() and p.name != "zarr.json"]


def test_centroids_are_released_once_similar_is_complete_and_a_fault_during_the_release_resumes(tiny_gpt2, tmp_path,
                                                                                                monkeypatch):
    """The centroids are an intermediate of the similar stage: once every similar shard is complete
    they are deleted (a run without similar never writes them, and keeps the same top tokens); a
    fault halfway through the release resumes to the store of an uninterrupted run, with nothing
    reported damaged."""
    from neuron_embeddings.storage import integrity
    from neuron_embeddings.storage.store import Store

    opts = options(tiny_gpt2, n_sequences=24, ctx_len=16, k=4, shard_size=32)
    ref = str(tmp_path / "ref.zarr")
    run_stages(ref, **opts)
    assert _centroid_chunks(tmp_path / "ref.zarr") == []
    assert (zarr_group := run_stages(ref, **opts))["similar/neighbours"][...].max() >= 0  # resumable, neighbours kept
    assert integrity.verify(Store(ref)).ok
    out = str(tmp_path / "cut.zarr")
    monkeypatch.setenv("NE_TEST_FAULT", "release-centroids/all")
    with pytest.raises(Exception, match="fault injected"):
        run_stages(out, **opts)
    assert _centroid_chunks(tmp_path / "cut.zarr")  # part of them is still there
    assert integrity.verify(Store(out)).ok
    monkeypatch.delenv("NE_TEST_FAULT")
    run_stages(out, **opts)
    assert _centroid_chunks(tmp_path / "cut.zarr") == []
    assert integrity.verify(Store(out)).ok
    assert_same_arrays(contract_arrays(ref, SIMILAR_ARRAYS), contract_arrays(out, SIMILAR_ARRAYS))
    bare = str(tmp_path / "no-similar.zarr")
    g = run_stages(bare, **options(tiny_gpt2, n_sequences=24, ctx_len=16, k=4, shard_size=32, similar=False))
    assert _centroid_chunks(tmp_path / "no-similar.zarr") == []
    np.testing.assert_array_equal(g["similar/top_token"][...], zarr_group["similar/top_token"][...])
    assert integrity.verify(Store(bare)).ok


def test_a_damaged_similar_shard_after_the_release_recomputes_the_centroids(tiny_gpt2, tmp_path):
    """The centroids a similar shard needs are gone once the stage is complete: when one of its
    shards is damaged, the rerun recomputes them from the embeddings and ends with the identical
    store (zeros read in their place would give other neighbours)."""
    opts = options(tiny_gpt2, n_sequences=24, ctx_len=16, k=4, shard_size=32)
    ref, out = str(tmp_path / "ref.zarr"), str(tmp_path / "out.zarr")
    run_stages(ref, **opts)
    run_stages(out, **opts)
    victim = next(p for p in sorted((tmp_path / "out.zarr" / "similar" / "neighbours").rglob("*"))
                  if p.is_file() and p.name != "zarr.json")
    victim.unlink()
    run_stages(out, **opts)
    assert _centroid_chunks(tmp_path / "out.zarr") == []
    assert_same_arrays(contract_arrays(ref, SIMILAR_ARRAYS), contract_arrays(out, SIMILAR_ARRAYS))
