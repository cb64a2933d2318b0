"""Whole chunks written and read without Zarr's I/O loop (storage.store._ChunkIO) are Zarr's own:
the same files byte for byte as Zarr writes for the same data, read back equal by Zarr, and
recorded for the markers as written."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from neuron_embeddings.core.errors import UserError
from neuron_embeddings.storage import store as st

COMPRESSORS = {"none": None, "zstd": "auto", "blosc": zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")}


def _twin_stores(tmp_path, dtype, compressor, shape=(3, 8, 5, 6), chunks=(1, 4, 5, 6), fill=0):
    """The same array in two new local stores: one for Zarr's writes, one for the direct path."""
    made = []
    for name in ("zarr", "direct"):
        g = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w", zarr_format=3)
        kw = {} if COMPRESSORS[compressor] == "auto" else {"compressors": COMPRESSORS[compressor]}
        g.create_array("group/a", shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, **kw)
        made.append(str(tmp_path / f"{name}.zarr"))
    return made


def _files(root: str) -> dict[str, bytes]:
    from pathlib import Path

    return {str(p.relative_to(root)): p.read_bytes() for p in Path(root, "group/a").rglob("*")
            if p.is_file() and p.name != "zarr.json"}


@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int32", "int64", "bool"])
def test_direct_chunks_are_zarrs_bytes(tmp_path, dtype, compressor):
    via_zarr, direct = _twin_stores(tmp_path, dtype, compressor)
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((2, 4, 5, 6)) * 100).astype(dtype)
    sel = (slice(1, 3), slice(4, 8))
    zarr.open_array(f"{via_zarr}/group/a", mode="r+")[sel] = data
    store = st.Store(direct)
    assert st._write_direct(store, "group/a", sel, data)
    assert _files(direct) == _files(via_zarr)
    assert sorted(store.written_chunks()) == sorted(f"group/a/{k}" for k in ("c/1/1/0/0", "c/2/1/0/0"))
    for key, (size, crc) in store.written_chunks().items():
        raw = open(f"{direct}/{key}", "rb").read()
        assert (size, crc) == (len(raw), st.crc32c(raw))
    back = zarr.open_array(f"{direct}/group/a", mode="r")[...]
    np.testing.assert_array_equal(back[sel], data)
    np.testing.assert_array_equal(st.read(st.Store(direct), "group/a"), back)  # direct reads, several chunks
    one = st.read(st.Store(direct), "group/a", (2, slice(4, 8)))  # one chunk, an integer index
    np.testing.assert_array_equal(one, data[1])
    one[...] = 1  # a chunk read is the caller's to change, as Zarr's are
    np.testing.assert_array_equal(st.read(st.Store(direct), "group/a", (0, slice(0, 4))), back[0, :4])


def test_unwritten_chunks_read_as_the_fill_value(tmp_path):
    _, direct = _twin_stores(tmp_path, "float32", "zstd", fill=np.nan)
    got = st._read_direct(st.Store(direct), "group/a", (0, slice(0, 4)))
    assert got.shape == (4, 5, 6) and np.isnan(got).all()


def test_what_is_not_whole_interior_chunks_goes_through_zarr(tmp_path):
    """Part of a chunk, an edge chunk, a broadcast value: not direct, and Zarr writes them right."""
    _, direct = _twin_stores(tmp_path, "int32", "none", shape=(3, 10, 5, 6), chunks=(1, 4, 5, 6), fill=-1)
    store = st.Store(direct)
    part = np.ones((1, 2, 5, 6), dtype=np.int32)
    assert not st._write_direct(store, "group/a", (slice(0, 1), slice(0, 2)), part)
    edge = np.full((1, 2, 5, 6), 7, dtype=np.int32)  # neurons 8..9: the last chunk holds 2 of 4
    assert not st._write_direct(store, "group/a", (slice(0, 1), slice(8, 10)), edge)
    assert not st._write_direct(store, "group/a", (slice(0, 1), slice(0, 4)), np.int32(3))
    st.write(store, "group/a", (slice(0, 1), slice(8, 10)), edge)  # through Zarr
    st.write(store, "group/a", (slice(1, 2), slice(0, 4)), np.full((1, 4, 5, 6), 5, dtype=np.int32))  # direct
    back = zarr.open_array(f"{direct}/group/a", mode="r")[...]
    assert (back[0, 8:] == 7).all() and (back[1, :4] == 5).all() and (back[2] == -1).all()
    np.testing.assert_array_equal(st.read(st.Store(direct), "group/a"), back)  # the edge chunk read directly
    assert {"group/a/c/0/2/0/0", "group/a/c/1/0/0/0"} <= set(store.written_chunks())  # both paths recorded


def test_attributes_follow_the_file(tmp_path):
    """The root attributes are parsed once per process while zarr.json is unchanged, and read
    afresh once it changes; a damaged zarr.json is a one-line error."""
    path = str(tmp_path / "s.zarr")
    zarr.open_group(path, mode="w", zarr_format=3).attrs.update({"a": 1})
    store = st.Store(path)
    assert store.attrs == {"a": 1}
    zarr.open_group(path, mode="r+").attrs.update({"a": 2, "b": [1, 2]})
    assert store.attrs == {"a": 2, "b": [1, 2]} and st.Store(path).attrs == {"a": 2, "b": [1, 2]}
    meta = json.loads(open(f"{path}/zarr.json").read())
    open(f"{path}/zarr.json", "w").write(json.dumps(meta)[:-5])
    with pytest.raises(UserError, match="zarr.json is damaged"):
        st.Store(path).attrs


def test_token_rows_equal_zarrs_orthogonal_selection(tmp_path):
    from neuron_embeddings.storage import schema

    path = str(tmp_path / "s.zarr")
    g = zarr.open_group(path, mode="w", zarr_format=3)
    tokens = np.arange(23 * 7, dtype=np.int32).reshape(23, 7)
    g.create_array(schema.TOKENS.path, shape=tokens.shape, chunks=(5, 7), dtype="int32", fill_value=0)[...] = tokens
    rows = np.array([0, 4, 5, 6, 14, 20, 22])
    np.testing.assert_array_equal(st.read_token_rows(st.Store(path), rows), tokens[rows])
    np.testing.assert_array_equal(st.read_token_rows(st.Store(path), rows[:0]), tokens[:0])
