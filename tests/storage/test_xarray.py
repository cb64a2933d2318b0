"""The store from the scientific Python ecosystem: every array names its dimensions (one
vocabulary, storage.schema.DIMS), so xarray opens it, with the model's layer index as the `layer`
coordinate; consolidated metadata opens it in one read and leaves the store writable."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import zarr

from neuron_embeddings.storage import schema
from neuron_embeddings.storage import store as st
from tests.helpers import options, run_stages

xr = pytest.importorskip("xarray")


@pytest.fixture(scope="module")
def store_path(tiny_gpt2, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("xr") / "layer1.zarr")
    run_stages(out, **options(tiny_gpt2, layers="1"))  # one row: the model's layer 1
    return out


def test_every_array_names_its_dimensions_from_the_vocabulary(store_path):
    g = zarr.open_group(store_path, mode="r")
    for spec in schema.ARRAYS:
        if spec.requires:
            continue
        a = g[spec.path]
        assert a.metadata.dimension_names == spec.dims, spec.path
        assert set(spec.dims) <= set(schema.DIMS), spec.path
    assert g[schema.LAYER.path][...].tolist() == [1]
    before, after = st.WINDOW
    assert g[schema.OFFSET.path][...].tolist() == list(range(-before, after + 1))


def test_xarray_opens_the_store_and_its_groups(store_path):
    g = zarr.open_group(store_path, mode="r")
    ds = xr.open_zarr(store_path, consolidated=False)
    assert ds["tokens"].dims == ("sequence", "position") and ds["layer"].values.tolist() == [1]
    np.testing.assert_array_equal(ds["tokens"].values, g["tokens"][...])
    tree = xr.open_datatree(store_path, engine="zarr", consolidated=False)
    per_layer = tree["metrics"]["n_clusters"].mean("neuron")  # the README's one line
    assert per_layer.sel(layer=1).item() == pytest.approx(g["metrics/n_clusters"][...].mean(axis=1)[0])
    window = tree["topk"]["window"]
    assert window.dims == ("layer", "neuron", "example", "offset")
    np.testing.assert_array_equal(window.sel(offset=0).values, g["topk/act"][...])  # offset 0: the max token
    assert tree["similar"]["centroids"].dims == ("layer", "neuron", "cluster", "d_embed")


def test_consolidated_metadata_is_read_at_once_and_the_store_stays_writable(store_path, tmp_path):
    import shutil

    out = str(tmp_path / "copy.zarr")
    shutil.copytree(store_path, out)
    store = st.Store(out)
    st.consolidate(store)
    meta = zarr.open_group(out, mode="r", use_consolidated=True).metadata.consolidated_metadata
    assert {a.path for a in schema.ARRAYS if not a.requires} <= set(meta.flattened_metadata)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # xarray warns when it falls back to a walk
        tree = xr.open_datatree(out, engine="zarr")
    assert tree["metrics"]["n_clusters"].shape == (1, 256)
    # a resumed run writes into a consolidated store: array metadata never changes after creation
    region = (0, slice(0, 64))
    st.write(store, schema.METRIC_ARRAYS["n_clusters"], region, np.full(64, 7, dtype=np.int32))
    assert (st.read(st.Store(out), schema.METRIC_ARRAYS["n_clusters"], region) == 7).all()
    st.consolidate(store)  # and consolidating again is harmless
    assert zarr.open_group(out, mode="r").metadata.consolidated_metadata is not None
