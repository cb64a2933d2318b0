"""--strata through the pipeline: the same store for any shard, block or batch size; the top-k's
clusters untouched; counts that add up; scratch released; a store that verifies."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from neuron_embeddings.storage import integrity, schema
from neuron_embeddings.storage.store import Store
from tests.helpers import contract_arrays, assert_same_arrays, options, run_stages

STRATA = dict(strata="0.75,0.5,0.25,0", strata_k=4)
SPECTRUM = [a.path for a in schema.STRATA_ARRAYS if not a.path.startswith("scan/")]


@pytest.fixture(scope="module")
def stores(tiny_gpt2, tmp_path_factory):
    d = tmp_path_factory.mktemp("strata")
    a = str(d / "a.zarr")
    b = str(d / "b.zarr")
    plain = str(d / "plain.zarr")
    run_stages(a, batch_size=8, **options(tiny_gpt2, **STRATA))
    run_stages(b, batch_size=5, **options(tiny_gpt2, shard_size=100, scan_blocks=3, **STRATA))
    run_stages(plain, batch_size=8, **options(tiny_gpt2))
    return a, b, plain


def test_strata_are_the_same_for_any_shard_block_or_batch_size(stores):
    a, b, _ = stores
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for path in SPECTRUM:
        if path in ("distribution/mean", "strata/embeddings"):
            np.testing.assert_allclose(ga[path][...].astype(np.float64), gb[path][...].astype(np.float64),
                                       rtol=1e-5, atol=1e-7, err_msg=path)
        else:
            np.testing.assert_array_equal(ga[path][...], gb[path][...], err_msg=path)
    assert (ga["strata/seq"][...] >= 0).mean() > 0.5  # mostly full strata: not a comparison of empty arrays


def test_the_top_k_and_its_clusters_are_those_of_a_run_without_strata(stores):
    a, _, plain = stores
    assert_same_arrays(contract_arrays(plain), contract_arrays(a))


def test_the_spectrum_clustering_counts_add_up(stores):
    g = zarr.open_group(stores[0], mode="r")
    labels, counts = g["strata/labels"][...], g["strata/counts"][...]  # [L, M, N], [L, M, C, 1 + n]
    k = g.attrs["k"]
    stratum = g["strata/stratum"][...]
    source = np.concatenate([np.zeros(labels.shape[:2] + (k,), dtype=int), 1 + stratum], axis=2)
    clustered = labels >= 0
    assert counts.sum() == clustered.sum()
    for src in range(counts.shape[-1]):
        want = np.zeros(counts.shape[:3], dtype=int)
        li, mi, ni = np.nonzero(clustered & (source == src))
        np.add.at(want, (li, mi, labels[li, mi, ni]), 1)
        np.testing.assert_array_equal(counts[..., src], want)
        np.testing.assert_array_equal(g["strata/n_clusters"][..., src], (want > 0).sum(axis=2))
    below = ((counts.sum(axis=3) > 0) & (counts[..., 0] == 0)).sum(axis=2)
    np.testing.assert_array_equal(g["strata/below_only"][...], below)
    assert below.sum() > 0
    # the joint clustering of a neuron with top-k examples only would be the top-k's own
    n = g["metrics/n_examples"][...]
    assert (g["strata/n_clusters"][..., 0] <= g["metrics/n_clusters"][...] + n).all()


def test_distribution_is_consistent_with_the_top_k(stores):
    g = zarr.open_group(stores[0], mode="r")
    hist, n = g["distribution/hist"][...], g["scan/count"][...].sum()
    np.testing.assert_allclose(g["distribution/positive_fraction"][...], hist.sum(axis=2) / n, rtol=1e-6)
    np.testing.assert_array_equal(g["distribution/max"][...], g["topk/act"][..., 0])  # the best example is the max
    top_bin = hist.shape[2] - 1
    assert (hist[..., top_bin] >= 1).all()  # the maximum itself lands in the last bin
    assert g.attrs["strata_intervals"] == [[0.75, 1.0], [0.5, 0.75], [0.25, 0.5], [0.0, 0.25]]


def test_scratch_is_released_and_the_store_verifies(stores):
    for out in stores:
        store = Store(out)
        assert integrity.damaged_units(store, checksums=True) == {}
        g = zarr.open_group(out, mode="r")
        for spec in (*schema.SCAN.values(), *schema.SCAN_STRATA.values(), schema.SCAN_HIST, schema.SCAN_SUM):
            if spec.path in g:
                assert g[spec.path].nchunks_initialized == 0, spec.path


def test_a_resumed_run_gives_the_same_strata(stores, tiny_gpt2, tmp_path):
    out = str(tmp_path / "resumed.zarr")
    run_stages(out, batch_size=8, stages=("maxima", "scan", "embed"), **options(tiny_gpt2, **STRATA))
    assert zarr.open_group(out, mode="r")["strata/labels"].nchunks_initialized == 0  # cluster has not run
    run_stages(out, batch_size=8, **options(tiny_gpt2, **STRATA))
    ga, gr = zarr.open_group(stores[0], mode="r"), zarr.open_group(out, mode="r")
    for path in SPECTRUM:
        np.testing.assert_array_equal(ga[path][...], gr[path][...], err_msg=path)
